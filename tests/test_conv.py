"""The 2-D convolution: im2col/col2im against their NumPy twins, lora.nn.Conv2d against
torch.nn.Conv2d and finite differences, and Conv2d LoRA (lora/tuners/conv.py) against PEFT's
on the same torch model: outputs, gradients, merge, files both ways and `lora merge`."""

import numpy as np
import pytest

import lora
from lora import _reference as ref
from lora import functional as F
from lora import nn

from gradcheck import numeric_gradient

# (kernel_size, stride, padding, dilation)
GEOMETRIES = [(3, 1, 1, 1), ((2, 3), (2, 1), (0, 2), (1, 2)), (1, 1, 0, 1), (5, 2, 2, 1),
              ((3, 1), 3, (1, 0), (2, 1)), (7, 1, 0, 1)]


def _geo(g):
    k, s, p, d = g
    return k, {"stride": s, "padding": p, "dilation": d}


# ------------------------------------------------------------------ the kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g", GEOMETRIES)
def test_im2col_and_col2im_match_twins(dtype, g):
    k, kw = _geo(g)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 9)).astype(dtype)
    cols = F.im2col(x, k, **kw)
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, ref.im2col(x, k, **kw))
    g_cols = rng.standard_normal(cols.shape).astype(dtype)
    dx = F.col2im(g_cols, x.shape, k, **kw)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, ref.col2im(g_cols, x.shape, k, **kw), rtol=tol, atol=tol)
    # col2im is im2col's adjoint: <im2col(x), g> = <x, col2im(g)>
    lhs = float((cols.astype(np.float64) * g_cols).sum())
    assert lhs == pytest.approx(float((x.astype(np.float64) * dx).sum()), rel=tol, abs=tol)


def test_im2col_reads_views_and_leaves_inputs_alone():
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 10))
    view = x[:, :, :, ::2]  # not contiguous
    before = x.copy()
    np.testing.assert_array_equal(F.im2col(view, 3, padding=1), ref.im2col(view, 3, padding=1))
    np.testing.assert_array_equal(x, before)


def test_conv_kernels_refuse_bad_arguments():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match="'x' must be 4-D, got 3-D"):
        F.im2col(np.zeros((2, 5, 5)), 3)
    with pytest.raises(ValueError, match="'stride' must be an int in"):
        F.im2col(x, 3, stride=0)
    with pytest.raises(ValueError, match="'padding' must be an int in"):
        F.im2col(x, 3, padding=-1)
    with pytest.raises(TypeError, match="'kernel_size' must be an int"):
        F.im2col(x, 2.5)
    with pytest.raises(ValueError, match="'kernel_size' must be an int or a pair"):
        F.im2col(x, (1, 2, 3))
    with pytest.raises(ValueError, match="larger than the padded image"):
        F.im2col(x, 3, dilation=3)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.im2col(x.astype(np.int32), 3)
    with pytest.raises(ValueError, match="every dimension at least 1"):
        F.im2col(np.zeros((0, 2, 5, 5)), 3)
    with pytest.raises(ValueError, match=r"'cols' must have shape \(n \* oh \* ow"):
        F.col2im(np.zeros((9, 17)), (1, 2, 5, 5), 3)
    with pytest.raises(ValueError, match="'image_shape' must be a tuple"):
        F.col2im(np.zeros((9, 18)), (2, 5, 5), 3)
    with pytest.raises(ValueError, match="beyond what BLAS takes"):
        F.im2col(np.zeros((1, 1, 1, 1)), 1, padding=2**30)


# ------------------------------------------------------------------ lora.nn.Conv2d


def _numeric_conv(layer, x, g):
    """Finite differences of sum(conv(x) * g) in x, the weight and the bias."""
    def loss():
        return float((layer.eval()(x) * g).sum())
    return (numeric_gradient(loss, x), numeric_gradient(loss, layer.weight.data),
            numeric_gradient(loss, layer.bias.data))


@pytest.mark.parametrize("g", GEOMETRIES[:4])
def test_conv2d_matches_finite_differences(g):
    k, kw = _geo(g)
    rng = np.random.default_rng(2)
    layer = nn.Conv2d(3, 4, k, kw["stride"], kw["padding"], kw["dilation"], dtype=np.float64,
                      rng=rng)
    layer.weight.requires_grad = True
    x = rng.standard_normal((2, 3, 7, 8))
    y = layer.train()(x)
    g_y = rng.standard_normal(y.shape)
    dx = layer.backward(g_y)
    want_dx, want_dw, want_db = _numeric_conv(layer, x, g_y)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(layer.weight.grad, want_dw, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(layer.bias.grad, want_db, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g", GEOMETRIES)
def test_conv2d_matches_torch(dtype, g):
    torch = pytest.importorskip("torch")
    k, kw = _geo(g)
    rng = np.random.default_rng(3)
    layer = nn.Conv2d(3, 5, k, kw["stride"], kw["padding"], kw["dilation"], dtype=dtype, rng=rng)
    layer.weight.requires_grad = True
    t = torch.nn.Conv2d(3, 5, k, **kw).to(torch.float32 if dtype == np.float32 else torch.float64)
    t.load_state_dict({"weight": torch.tensor(layer.weight.data),
                       "bias": torch.tensor(layer.bias.data)})
    x = rng.standard_normal((2, 3, 8, 9)).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    y = layer.train()(x)
    g_y = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.tensor(g_y))
    dx = layer.backward(g_y)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for got, want in ((y, yt), (dx, xt.grad), (layer.weight.grad, t.weight.grad),
                      (layer.bias.grad, t.bias.grad)):
        want = want.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_conv2d_single_image_same_padding_and_errors():
    rng = np.random.default_rng(4)
    layer = nn.Conv2d(2, 3, 3, padding="same", rng=rng)
    x = rng.standard_normal((2, 6, 5)).astype(np.float32)
    y = layer.train()(x)
    assert y.shape == (3, 6, 5)
    np.testing.assert_allclose(y, layer.eval()(x[None])[0], rtol=1e-6)
    layer.train()(x)
    assert layer.backward(np.ones_like(y)).shape == x.shape
    with pytest.raises(ValueError, match=r"x must be \(n, 2, h, w\)"):
        layer(np.zeros((1, 3, 6, 5)))
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        nn.Conv2d(2, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        nn.Conv2d(2, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        nn.Conv2d(2, 4, 0)
    layer.train()(x[None])
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        layer.backward(np.ones((1, 3, 6, 4)))


# ------------------------------------------------------------------ Conv2d LoRA


class CNN(nn.Module):
    """conv(3->8, 3x3, pad 1) -> ReLU -> conv(8->4, (3, 2), stride 2) -> ReLU -> Linear."""

    def __init__(self, rng, dtype=np.float64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype, rng=rng)
        self.conv2 = nn.Conv2d(8, 4, (3, 2), stride=2, dtype=dtype, rng=rng)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4 * 3 * 4, 5, dtype=dtype, rng=rng)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        object.__setattr__(self, "_shape", h.shape)
        return self.fc(h.reshape(h.shape[0], -1))

    def backward(self, dout):
        d = self.fc.backward(dout).reshape(self._shape)
        return self.conv1.backward(self.act1.backward(self.conv2.backward(self.act2.backward(d))))


X = np.random.default_rng(5).standard_normal((2, 3, 7, 8))


def _torch_cnn(torch, model):
    class TorchCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 4, (3, 2), stride=2)
            self.fc = torch.nn.Linear(48, 5)

        def forward(self, x):
            h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(h.flatten(1))

    t = TorchCNN().double()
    t.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    return t


def _peft_cnn(tmp_path, **config):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = CNN(np.random.default_rng(6))
    pm = peft.get_peft_model(_torch_cnn(torch, base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc"], init_lora_weights=False,
        **config))
    pm.save_pretrained(str(tmp_path))
    ours = lora.load_adapter(CNN(np.random.default_rng(6)), tmp_path)
    return torch, peft, pm, ours


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "bias": "lora_only"}],
                         ids=["plain", "rslora-bias"])
def test_peft_conv_adapter_outputs_gradients_and_merge(tmp_path, config):
    torch, peft, pm, ours = _peft_cnn(tmp_path / "peft", **config)
    assert [type(m).__name__ for _, m in lora.lora_layers(ours)] == [
        "LoRAConv2d", "LoRAConv2d", "LoRALinear"]
    pm.train()
    xt = torch.tensor(X, requires_grad=True)
    yt = pm(xt)
    y = ours.train()(X)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = np.random.default_rng(7).standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    params = dict(pm.named_parameters())
    for path, layer in lora.lora_layers(ours):
        for ours_p, key in ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")):
            want = params[f"base_model.model.{path}.{key}.default.weight"].grad.numpy()
            np.testing.assert_allclose(ours_p.grad.reshape(want.shape), want, rtol=1e-10,
                                       atol=1e-12, err_msg=f"{path}.{key}")
        if config.get("bias") == "lora_only":
            want = params[f"base_model.model.{path}.base_layer.bias"].grad.numpy()
            np.testing.assert_allclose(layer.bias.grad, want, rtol=1e-10, atol=1e-12)
    # PEFT loads what we save and computes our outputs
    lora.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_torch_cnn(torch, CNN(np.random.default_rng(6))),
                                          str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(back(torch.tensor(X)).detach().numpy(), ours.eval()(X),
                               rtol=1e-10, atol=1e-12)
    merged = lora.merge_and_unload(ours)
    assert isinstance(merged.conv1, nn.Conv2d)
    for k, v in pm.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(merged.state_dict()[k], v.detach().numpy(), rtol=1e-12,
                                   atol=1e-13, err_msg=k)


def test_peft_conv_adapter_merged_by_lora_merge(tmp_path):
    from safetensors.numpy import load_file, save_file

    torch, peft, pm, ours = _peft_cnn(tmp_path / "adapter")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({k: np.ascontiguousarray(v) for k, v in CNN(np.random.default_rng(6))
               .state_dict().items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    stats = lora.merge_checkpoint(base, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert stats["tensors_merged"] == 3
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in pm.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(got[k], v.detach().numpy(), rtol=1e-12, atol=1e-13,
                                   err_msg=k)
    from lora.cli import describe_adapter
    assert "conv2d" in describe_adapter(str(tmp_path / "adapter"))


def _wrapped(seed=8, dtype=np.float64, **config):
    model = CNN(np.random.default_rng(seed), dtype)
    return lora.wrap(model, r=3, lora_alpha=6, target_modules=["conv1", "conv2"],
                     init_lora_weights=False, seed=seed, **config)


def test_conv_lora_matches_finite_differences():
    model = _wrapped()
    rng = np.random.default_rng(9)
    g = rng.standard_normal((2, 5))
    x = X.copy()

    def loss():
        return float((model.eval()(x) * g).sum())

    model.train()(x)
    dx = model.backward(g)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for path, layer in lora.lora_layers(model):
        for p in (layer.lora_A, layer.lora_B):
            np.testing.assert_allclose(p.grad, numeric_gradient(loss, p.data), rtol=1e-6,
                                       atol=1e-8, err_msg=path)


def test_conv_lora_merge_round_trip_single_image_and_save_load(tmp_path):
    model = _wrapped(dtype=np.float32)
    layer = model.conv1
    assert layer.lora_A.shape == (3, 27) and layer.lora_B.shape == (8, 3)
    y = model.eval()(X.astype(np.float32))
    w0 = layer.weight.data.copy()
    layer.merge()
    np.testing.assert_allclose(model(X.astype(np.float32)), y, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, w0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer(X[0].astype(np.float32)), layer(X[:1].astype(np.float32))[0])
    lora.save_adapter(model, tmp_path)
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.conv1.lora_A.weight"].shape == (3, 3, 3, 3)
    assert saved["base_model.model.conv1.lora_B.weight"].shape == (8, 3, 1, 1)
    back = lora.load_adapter(CNN(np.random.default_rng(8), np.float32), tmp_path)
    np.testing.assert_array_equal(back.eval()(X.astype(np.float32)), y)


def test_conv_lora_mixed_batch_equals_each_row_alone():
    model = _wrapped()
    lora.add_adapter(model, "other", lora.LoraConfig(r=2, target_modules=["conv2"],
                                                     init_lora_weights=False), seed=3)
    names = ["other", "default", "__base__"]
    x = np.random.default_rng(10).standard_normal((3, 3, 7, 8))
    with lora.adapter_names(model, names):
        y = model.eval()(x)
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapters(model):
                want = model(x[i:i + 1])
        else:
            lora.set_adapter(model, name)
            want = model(x[i:i + 1])
        np.testing.assert_allclose(y[i:i + 1], want, rtol=1e-10, atol=1e-12, err_msg=name)


def test_conv_lora_trains_a_small_cnn():
    rng = np.random.default_rng(11)
    model = _wrapped(seed=12, dtype=np.float32)
    x = rng.standard_normal((32, 3, 7, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 32)
    opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    frozen = model.conv1.weight.data.copy()
    losses = []
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss, d = nn.cross_entropy(model(x), labels)
        model.backward(d)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.7 * losses[0]
    np.testing.assert_array_equal(model.conv1.weight.data, frozen)


def test_conv_lora_refusals(tmp_path):
    with pytest.raises(ValueError, match="does not adapt conv2d layers"):
        _wrapped(use_dora=True)
    with pytest.raises(ValueError, match="does not adapt conv2d layers"):
        lora.wrap(CNN(np.random.default_rng(0)), lora.VeraConfig(r=4, target_modules=["conv1"]))
    model = _wrapped()
    lora.save_adapter(model, tmp_path)
    other = CNN(np.random.default_rng(0))
    other.conv1 = nn.Conv2d(3, 8, 5, padding=2, dtype=np.float64)  # a 5x5 kernel now
    with pytest.raises(lora.AdapterFormatError, match=r"conv1.*\(3, 3, 3, 3\).*\(3, 3, 5, 5\)"):
        lora.load_adapter(other, tmp_path)


def test_conv_lora_training_forward_keeps_the_images_not_the_patches():
    model = _wrapped()
    layer = model.conv1
    x = np.random.default_rng(13).standard_normal((4, 3, 16, 16))
    y = layer.train()(x)
    patches = 4 * 16 * 16 * 27 * 8  # bytes the patches take (float64)

    def held(v):
        if isinstance(v, np.ndarray):
            return v.nbytes
        return sum(held(u) for u in v) if isinstance(v, (tuple, list)) else 0

    assert held(layer.__dict__["_cache"]) < patches / 4
    g = np.random.default_rng(14).standard_normal(y.shape)
    dx = layer.backward(g)
    layer.zero_grad()
    layer.train()(x)
    np.testing.assert_array_equal(layer.backward(g), dx)  # the same gradient every time
    with pytest.raises(RuntimeError, match="no forward pass cached"):
        layer.backward(g)
