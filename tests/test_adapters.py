"""Several adapters on one base: the segmented kernel, named adapters, combinations, mixed
batches, the multi-adapter save layout.

- lora.functional.mixed_forward against a NumPy float64 loop over rows (lora/_reference.py),
  for both dtypes, mixed ranks (row kernels and, from rank 32, the GEMM path), leading
  dims, bias/residual, fan_in_fan_out, packed and quantized weights, and bad arguments.
- Named adapters on lora.nn models: several active ones sum; only the active ones train; a
  mixed batch equals each row run alone with its adapter; deletion, merging, save/load.
- Against PEFT on the same torch model and adapters (skipped without torch/peft): each named
  adapter's outputs, several active at once (outputs and gradients), a mixed batch through
  PEFT's adapter_names=, each deterministic combination type of add_weighted_adapter, and
  the multi-adapter directory both ways.
- The causal LM: a mixed batch's logits and generate(adapter_names=) equal each row alone.
"""

import os

import numpy as np
import pytest

import lora
from lora import _reference as ref
from lora import functional as F
from lora import nn
from lora.models import LlamaForCausalLM
from lora.models.llama import LlamaConfig

# ------------------------------------------------------------------ the segmented kernel


def _case(rng, n, d_in, d_out, ranks, dtype, lead=()):
    x = rng.standard_normal((*lead, n, d_in)).astype(dtype)
    W = rng.standard_normal((d_out, d_in)).astype(dtype)
    A = [rng.standard_normal((r, d_in)).astype(dtype) for r in ranks]
    B = [rng.standard_normal((d_out, r)).astype(dtype) for r in ranks]
    scales = [float(rng.uniform(-2, 2)) for _ in ranks]
    return x, W, A, B, scales


def _twin(x, W, A, B, scales, ids, bias=None):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return ref.mixed_forward(f(x), f(W), [f(a) for a in A], [f(b) for b in B], scales, ids,
                             None if bias is None else f(bias))


def _close(got, want, dtype):
    tol = 1e-12 if dtype == np.float64 else 3e-6
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d_in,d_out,ranks", [
    (1, 8, 5, [2]),                   # one row, one adapter
    (16, 64, 48, [8, 16, 3]),          # decode-like: a row or two per adapter
    (300, 256, 128, [8, 16, 1, 31]),   # segments over several tiles and both threads
    (130, 100, 90, [40, 8]),           # a rank from 32: the GEMM path, mixed with a small one
    (500, 33, 17, [4] * 100),          # 100 adapters, odd sizes
])
@pytest.mark.parametrize("order", ["random", "sorted", "one adapter"])
def test_mixed_forward_matches_twin(dtype, n, d_in, d_out, ranks, order):
    rng = np.random.default_rng(n + len(ranks))
    x, W, A, B, scales = _case(rng, n, d_in, d_out, ranks, dtype)
    bias = rng.standard_normal(d_out).astype(dtype)
    ids = rng.integers(-1, len(ranks), n)
    if order == "sorted":  # segments of consecutive rows: computed in place, no gather
        ids = np.sort(ids)
    elif order == "one adapter":
        ids[:] = len(ranks) - 1
    got = F.mixed_forward(x, W, A, B, scales, ids, bias)
    assert got.dtype == dtype and got.shape == (n, d_out)
    want = _twin(x, W, A, B, scales, ids, bias)
    _close(got, want, dtype)
    Bt = [np.ascontiguousarray(b.T) for b in B]  # the layout a decode loop keeps
    _close(F.mixed_forward(x, W, A, Bt, scales, ids, bias, b_transposed=True), want, dtype)


def test_mixed_forward_equals_linear_forward_per_adapter():
    rng = np.random.default_rng(1)
    x, W, A, B, scales = _case(rng, 40, 32, 24, [4, 6], np.float64)
    ids = np.array([0, 1] * 20)
    got = F.mixed_forward(x, W, A, B, scales, ids)
    for a in (0, 1):
        want, _ = F.linear_forward(x[ids == a], W, A[a], B[a], scales[a])
        np.testing.assert_allclose(got[ids == a], want, rtol=1e-13, atol=1e-12)


def test_mixed_forward_leading_dims_residual_fan_in_fan_out():
    rng = np.random.default_rng(2)
    x, W, A, B, scales = _case(rng, 7, 20, 12, [3, 5], np.float32, lead=(3,))
    ids = rng.integers(-1, 2, (3, 7))
    res = rng.standard_normal((3, 7, 12)).astype(np.float32)
    want = _twin(x, W, A, B, scales, ids) + res
    got = F.mixed_forward(x, W, A, B, scales, ids, residual=res)
    assert got.shape == (3, 7, 12)
    _close(got, want, np.float32)
    got_t = F.mixed_forward(x, np.ascontiguousarray(W.T), A, B, scales, ids, residual=res,
                            fan_in_fan_out=True)
    _close(got_t, want, np.float32)


def test_mixed_forward_edge_batches():
    rng = np.random.default_rng(3)
    x, W, A, B, scales = _case(rng, 9, 16, 8, [2], np.float32)
    base = F.dense_forward(x, W)
    np.testing.assert_array_equal(F.mixed_forward(x, W, A, B, scales, np.full(9, -1)), base)
    np.testing.assert_array_equal(F.mixed_forward(x, W, [], [], [], np.full(9, -1)), base)
    empty = F.mixed_forward(x[:0], W, A, B, scales, np.zeros(0, np.int64))
    assert empty.shape == (0, 8)
    # non-contiguous adapters and ids of another integer type are taken as they come
    At = [np.asfortranarray(a) for a in A]
    ids = np.arange(9, dtype=np.int8) % 2 - 1
    _close(F.mixed_forward(x, W, At, B, scales, ids), _twin(x, W, A, B, scales, ids), np.float32)


@pytest.mark.parametrize("kind", ["packed", "Q8_0"])
def test_mixed_forward_over_packed_and_quantized_weights(kind):
    rng = np.random.default_rng(4)
    x, W, A, B, scales = _case(rng, 6, 64, 32, [4, 8], np.float32)
    ids = np.array([0, 1, -1, 1, 0, 0])
    if kind == "packed":
        weight, dense = F.PackedWeight(W), W
    else:
        q = lora.quant.quantize(W, kind)
        weight, dense = F.QuantWeight(q.data, kind, W.shape), q.dequantize()
    _close(F.mixed_forward(x, weight, A, B, scales, ids), _twin(x, dense, A, B, scales, ids),
           np.float32)


def test_mixed_forward_refuses_bad_arguments():
    rng = np.random.default_rng(5)
    x, W, A, B, scales = _case(rng, 4, 8, 6, [2, 3], np.float32)
    ids = np.array([0, 1, -1, 0])
    bad = [
        (dict(adapter_ids=np.array([0, 2, -1, 0])), ValueError, r"\[-1, 2\)"),
        (dict(adapter_ids=np.array([0, -2, 0, 0])), ValueError, "flat index 1"),
        (dict(adapter_ids=np.array([0, 1, 0])), ValueError, "x.shape"),
        (dict(adapter_ids=np.array([0.0, 1, 0, 0])), TypeError, "integers"),
        (dict(B=[B[0]]), ValueError, "one array per adapter"),
        (dict(B=[B[0], B[0]]), ValueError, r"'B\[1\]' must have shape"),
        (dict(b_transposed=True), ValueError, r"'B\[0\]' must have shape \(r, d_out\)"),
        (dict(A=[A[0], A[1][:, :7]]), ValueError, r"'A\[1\]' must have shape"),
        (dict(A=[A[0], A[1].astype(np.float64)]), TypeError, r"'A\[1\]' must have dtype"),
        (dict(A=(A[0], "no")), TypeError, r"'A\[1\]' must be a numpy.ndarray"),
        (dict(A=A[0]), TypeError, "list or tuple"),
        (dict(scales=[1.0]), ValueError, "one value per adapter"),
        (dict(scales=[1.0, float("nan")]), ValueError, r"scales\[1\]"),
        (dict(A=[A[0], np.zeros((0, 8), np.float32)], B=[B[0], np.zeros((6, 0), np.float32)]),
         ValueError, "rank"),
    ]
    args = dict(x=x, weight=W, A=A, B=B, scales=scales, adapter_ids=ids)
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            F.mixed_forward(**{**args, **change})
    F.mixed_forward(**args)


# ------------------------------------------------------------------ named adapters (lora.nn)


class MLP(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.embed = nn.Embedding(20, 12, rng=rng)
        self.fc1 = nn.Linear(12, 16, rng=rng)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(16, 5, rng=rng)

    def forward(self, ids):
        return self.fc2(self.act(self.fc1(self.embed(ids))))

    def backward(self, dout):
        return self.embed.backward(self.fc1.backward(self.act.backward(self.fc2.backward(dout))))


IDS = np.array([[1, 4, 0, 19, 7], [3, 3, 12, 0, 5], [2, 9, 9, 1, 0], [6, 5, 4, 3, 2]])


def _two_adapters(seed=0):
    rng = np.random.default_rng(seed)
    model = MLP(rng)
    lora.wrap(model, target_modules=["embed", "fc1", "fc2"], r=4, lora_alpha=8,
              init_lora_weights=False, seed=1)
    lora.add_adapter(model, "other", target_modules=["fc1"], r=2, lora_alpha=3,
                     use_rslora=True, init_lora_weights=False, seed=2)
    return model.eval()


def test_named_adapters_switch_and_sum():
    model = _two_adapters()
    assert lora.list_adapters(model) == ["default", "other"]
    assert lora.active_adapters(model) == ["default"]
    y_default = model(IDS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".other" not in n for n in trainable) and len(trainable) == 6
    lora.set_adapter(model, "other")
    y_other = model(IDS)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fc1.lora_A.other", "fc1.lora_B.other"]
    assert model.lora_config.r == 2
    with lora.disable_adapters(model):
        y_base = model(IDS)
    # "other" only touches fc1, so its output differs from the base's there alone
    fc1 = model.fc1
    assert fc1.scaling == pytest.approx(3 / np.sqrt(2))
    lora.set_adapter(model, ["default", "other"])
    y_both = model(IDS)
    assert len([p for p in model.parameters() if p.requires_grad]) == 8
    # the sum: fc1's two updates add (checked on the layer, where it is linear)
    x = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    both = fc1(x)
    lora.set_adapter(model, "default")
    only_d = fc1(x)
    lora.set_adapter(model, "other")
    only_o = fc1(x)
    with lora.disable_adapters(model):
        base = fc1(x)
    np.testing.assert_allclose(both, only_d + only_o - base, atol=2e-6)
    for a, b in [(y_default, y_other), (y_default, y_both), (y_other, y_base)]:
        assert np.abs(a - b).max() > 1e-3


def test_training_several_active_adapters_matches_finite_differences():
    model = _two_adapters()
    model.astype(np.float64)
    lora.set_adapter(model, ["default", "other"])
    model.train()
    rng = np.random.default_rng(7)
    g = rng.standard_normal((4, 5, 5))
    model.zero_grad()
    model(IDS)
    model.backward(g)
    for name in ("fc1.lora_A.other", "fc1.lora_B", "fc1.lora_B.other", "embed.lora_embedding_A"):
        p = dict(model.named_parameters())[name]
        idx = tuple(rng.integers(0, s) for s in p.shape)
        old = p.data[idx]
        p.data[idx] = old + 1e-6
        up = (model(IDS) * g).sum()
        p.data[idx] = old - 1e-6
        down = (model(IDS) * g).sum()
        p.data[idx] = old
        assert p.grad[idx] == pytest.approx((up - down) / 2e-6, rel=1e-6, abs=1e-9), name


def test_mixed_batch_equals_each_row_alone():
    model = _two_adapters()
    names = ["other", "__base__", "default", "other"]
    with lora.adapter_names(model, names):
        mixed = model(IDS)
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapters(model):
                want = model(IDS[i:i + 1])
        else:
            lora.set_adapter(model, name)
            want = model(IDS[i:i + 1])
        np.testing.assert_allclose(mixed[i:i + 1], want, rtol=1e-6, atol=1e-6)
    # the context is left as it was
    lora.set_adapter(model, "default")
    np.testing.assert_array_equal(model(IDS), model(IDS))


def test_mixed_batch_refuses_what_it_cannot_do():
    model = _two_adapters()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        with lora.adapter_names(model, ["nope"] * 4):
            pass
    with pytest.raises(TypeError, match="one adapter name per row"):
        with lora.adapter_names(model, "default"):
            pass
    with pytest.raises(ValueError, match="3 adapter names for a batch of 4"):
        with lora.adapter_names(model, ["default"] * 3):
            model(IDS)
    model.train()
    with lora.adapter_names(model, ["default", "other"] * 2):
        y = model(IDS)
    with pytest.raises(RuntimeError, match="forward only"):
        model.backward(np.ones_like(y))
    lora.merge_adapter(model)
    with pytest.raises(ValueError, match="merged"):
        with lora.adapter_names(model, ["default"] * 4):
            pass


def test_named_adapter_errors_and_deletion():
    model = _two_adapters()
    with pytest.raises(ValueError, match="already has an adapter named 'other'"):
        lora.add_adapter(model, "other", target_modules=["fc2"])
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lora.set_adapter(model, "x")
    with pytest.raises(ValueError, match="adapter name"):
        lora.add_adapter(model, "a.b", target_modules=["fc2"])
    with pytest.raises(ValueError, match="first adapter"):
        lora.add_adapter(model, "c", target_modules=["fc2"], modules_to_save=["fc1"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.wrap(model, target_modules=["fc2"])
    lora.set_adapter(model, "other")
    lora.delete_adapter(model, "other")
    assert lora.list_adapters(model) == ["default"]
    assert lora.active_adapters(model) == ["default"]
    assert not any(".other" in n for n, _ in model.named_parameters())
    # an adapter alone on a layer: deleting it gives the plain layer back
    lora.add_adapter(model, "solo", target_modules=["fc2"], r=2)
    lora.delete_adapter(model, "default")
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.fc1, nn.Linear)
    assert lora.active_adapters(model) == ["solo"]
    plain = lora.delete_adapter(model, "solo")
    assert not lora.lora_layers(plain) and "lora_config" not in plain.__dict__


def test_merge_chosen_adapters():
    model = _two_adapters()
    lora.set_adapter(model, ["default", "other"])
    y = model(IDS)
    lora.merge_adapter(model)
    assert model.fc1.merged_adapters == ["default", "other"]
    np.testing.assert_allclose(model(IDS), y, atol=1e-5)
    lora.unmerge_adapter(model)
    lora.set_adapter(model, "other")
    y_other = model(IDS)
    plain = lora.merge_and_unload(_two_adapters(), adapter_names=["other"])
    np.testing.assert_allclose(plain(IDS), y_other, atol=1e-5)


def test_save_and_load_several_adapters(tmp_path):
    model = _two_adapters()
    lora.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json",
                                            "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    fresh = MLP(np.random.default_rng(0)).eval()
    lora.load_adapter(fresh, tmp_path)
    lora.load_adapter(fresh, tmp_path / "other", adapter_name="other")
    assert lora.active_adapters(fresh) == ["default"]
    assert not fresh.fc1.adapter("other").A.requires_grad  # loaded for inference, as PEFT
    for names in ("default", "other", ["default", "other"]):
        lora.set_adapter(model, names)
        lora.set_adapter(fresh, names)
        np.testing.assert_array_equal(fresh(IDS), model(IDS))
    with lora.adapter_names(model, ["other", "default", "__base__", "other"]):
        want = model(IDS)
    with lora.adapter_names(fresh, ["other", "default", "__base__", "other"]):
        np.testing.assert_array_equal(fresh(IDS), want)
    # selected_adapters writes only those; the subdirectory of another is left in place
    lora.save_adapter(model, tmp_path / "only", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "only")) == ["other"]
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lora.save_adapter(model, tmp_path / "bad", selected_adapters=["x"])
    assert not (tmp_path / "bad").exists()


def test_load_into_an_existing_adapter_checks_first(tmp_path):
    model = _two_adapters()
    lora.save_adapter(model, tmp_path)
    before = model.fc1.adapter("other").A.data.copy()
    with pytest.raises(lora.AdapterFormatError):
        lora.load_adapter(model, tmp_path, adapter_name="other")  # default's layers, not its
    np.testing.assert_array_equal(model.fc1.adapter("other").A.data, before)
    assert lora.list_adapters(model) == ["default", "other"]


def test_weighted_adapters_dare_and_ties_properties():
    model = _two_adapters()
    lora.add_adapter(model, "third", target_modules=["embed", "fc1", "fc2"], r=4,
                     init_lora_weights=False, seed=3)
    A1, A3 = model.fc1.adapter("default").A.data, model.fc1.adapter("third").A.data
    lora.add_weighted_adapter(model, ["default", "third"], [1.0, 1.0], "dare",
                              combination_type="dare_linear", density=1.0)
    lora.add_weighted_adapter(model, ["default", "third"], [1.0, 1.0], "lin",
                              combination_type="linear")
    np.testing.assert_allclose(model.fc1.adapter("dare").A.data, model.fc1.adapter("lin").A.data,
                               rtol=1e-6)
    lora.add_weighted_adapter(model, ["default", "third"], [1.0, 1.0], "d0",
                              combination_type="dare_ties", density=0.0, seed=0)
    assert not model.fc1.adapter("d0").A.data.any()
    lora.add_weighted_adapter(model, ["default", "third"], [1.0, 1.0], "half",
                              combination_type="dare_linear", density=0.5, seed=0)
    got = model.fc1.adapter("half").A.data
    s = np.sqrt(2.0)  # sqrt(weight * scaling), scaling 8/4
    kept = [np.isclose(got, 2 * s * a, rtol=1e-5) for a in (A1, A3)]
    assert 0.3 < np.mean(got != 0) < 0.95 and np.any(kept[0] | kept[1])
    with pytest.raises(ValueError, match="one rank"):
        lora.add_weighted_adapter(model, ["default", "other"], [1, 1], "x",
                                  combination_type="linear")
    with pytest.raises(ValueError, match="density"):
        lora.add_weighted_adapter(model, ["default", "third"], [1, 1], "x",
                                  combination_type="ties")
    lora.add_weighted_adapter(model, ["default"], [2.0], "twice", combination_type="svd")
    lora.set_adapter(model, "twice")
    y2 = model(IDS)
    lora.add_weighted_adapter(model, ["default", "default"], [1.0, 1.0], "cat2",
                              combination_type="cat")
    lora.set_adapter(model, "cat2")
    np.testing.assert_allclose(model(IDS), y2, atol=1e-5)


# ------------------------------------------------------------------ against PEFT

def _peft():
    t = pytest.importorskip("torch")
    p = pytest.importorskip("peft")
    return t, p


def _torch_mlp(t):
    class TorchMLP(t.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = t.nn.Embedding(20, 12)
            self.fc1 = t.nn.Linear(12, 16)
            self.act = t.nn.Tanh()
            self.fc2 = t.nn.Linear(16, 5)

        def forward(self, ids):
            return self.fc2(self.act(self.fc1(self.embed(ids))))

    return TorchMLP


PEFT_ADAPTERS = {
    "default": dict(r=4, lora_alpha=8, target_modules=["embed", "fc1", "fc2"]),
    "other": dict(r=2, lora_alpha=3, target_modules=["fc1"], use_rslora=True),
    "third": dict(r=4, lora_alpha=2, target_modules=["fc1", "fc2"]),
}


def _peft_pair(tmp_path):
    """A PEFT model with three adapters, every B non-zero, and our MLP loaded with the same
    base weights and, from PEFT's save, the same adapters."""
    t, peft = _peft()
    t.manual_seed(0)
    base = _torch_mlp(t)()
    ours = MLP(np.random.default_rng(0))
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in base.state_dict().items()})
    pm = None
    for name, kw in PEFT_ADAPTERS.items():
        config = peft.LoraConfig(**kw, init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(base, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    pm.save_pretrained(tmp_path)
    lora.load_adapter(ours, tmp_path)
    for name in ("other", "third"):
        lora.load_adapter(ours, tmp_path / name, adapter_name=name)
    return t, peft, pm.eval(), ours.eval()


def _run(t, pm, ids=IDS, **kw):
    with t.no_grad():
        return pm(t.from_numpy(ids), **kw).numpy()


def test_peft_named_adapters_and_several_active(tmp_path):
    t, peft, pm, ours = _peft_pair(tmp_path)
    for name in PEFT_ADAPTERS:
        pm.set_adapter(name)
        lora.set_adapter(ours, name)
        np.testing.assert_allclose(ours(IDS), _run(t, pm), rtol=1e-5, atol=1e-6)
    pm.base_model.set_adapter(["default", "other", "third"])
    lora.set_adapter(ours, ["default", "other", "third"])
    np.testing.assert_allclose(ours(IDS), _run(t, pm), rtol=1e-5, atol=1e-6)
    # training the three at once: PEFT's autograd gradients of every A and B
    pm.train()
    ours.train()
    g = np.random.default_rng(1).standard_normal((4, 5, 5)).astype(np.float32)
    (pm(t.from_numpy(IDS)) * t.from_numpy(g)).sum().backward()
    ours.zero_grad()
    ours(IDS)
    ours.backward(g)
    grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * (3 + 1 + 2)
    for path, layer in lora.lora_layers(ours):
        for name, ad in layer.adapters.items():
            for half, p in zip("AB", (ad.A, ad.B), strict=True):
                key = (f"base_model.model.{path}.lora_{half}.{name}.weight" if path != "embed"
                       else f"base_model.model.{path}.lora_embedding_{half}.{name}")
                np.testing.assert_allclose(p.grad, grads[key], rtol=1e-4, atol=1e-6)


def test_peft_mixed_batch(tmp_path):
    t, peft, pm, ours = _peft_pair(tmp_path)
    names = ["third", "__base__", "other", "default"]
    with lora.adapter_names(ours, names):
        got = ours(IDS)
    np.testing.assert_allclose(got, _run(t, pm, adapter_names=names), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,extra", [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}), ("ties_svd", {"density": 0.6}),
    ("magnitude_prune_svd", {"density": 0.5}),
])
def test_peft_weighted_adapters(tmp_path, kind, extra):
    t, peft, pm, ours = _peft_pair(tmp_path)
    adapters = ["default", "third"] if kind in ("linear", "ties", "magnitude_prune") else [
        "default", "other", "third"]
    weights = [0.7, -0.4, 1.3][: len(adapters)]
    pm.add_weighted_adapter(adapters, weights, "combo", combination_type=kind, **extra)
    lora.add_weighted_adapter(ours, adapters, weights, "combo", combination_type=kind, **extra)
    pm.set_adapter("combo")
    lora.set_adapter(ours, "combo")
    want = _run(t, pm)
    np.testing.assert_allclose(ours(IDS), want, rtol=2e-5, atol=2e-5)
    for path, layer in lora.lora_layers(ours):
        if "combo" in layer.adapters:
            target = pm.base_model.model.get_submodule(path)
            ad = layer.adapter("combo")
            delta = target.get_delta_weight("combo").detach().numpy()
            ours_delta = ad.scaling * (ad.B.data @ ad.A.data)
            np.testing.assert_allclose(ours_delta.T if path == "embed" else ours_delta, delta,
                                       rtol=1e-4, atol=2e-5)


def test_svd_clamp_bounds_the_factors():
    """svd_clamp clamps A and B at the given quantile of their entries (PEFT's rule). Which
    entries that cuts depends on the SVD's sign convention, which differs between LAPACK
    builds (torch's and NumPy's flip some singular pairs of wide matrices), so this is
    checked on our own factors (even svd_clamp=1.0 clips: the negative side is cut at minus
    the largest entry)."""
    model = _two_adapters()
    lora.add_weighted_adapter(model, ["default", "other"], [1.0, 0.5], "free",
                              combination_type="svd")
    lora.add_weighted_adapter(model, ["default", "other"], [1.0, 0.5], "clamped",
                              combination_type="svd", svd_clamp=0.8)
    free, clamped = model.fc1.adapter("free"), model.fc1.adapter("clamped")
    hi = np.quantile(np.concatenate([free.B.data.ravel(), free.A.data.ravel()]), 0.8)
    np.testing.assert_allclose(clamped.A.data, np.clip(free.A.data, -hi, hi), rtol=1e-6)
    np.testing.assert_allclose(clamped.B.data, np.clip(free.B.data, -hi, hi), rtol=1e-6)
    assert (np.abs(free.A.data) > hi).any()


def test_multi_adapter_directory_loads_in_peft(tmp_path):
    t, peft = _peft()
    model = _two_adapters()
    lora.save_adapter(model, tmp_path)
    t.manual_seed(0)
    base = _torch_mlp(t)()
    base.load_state_dict({k: t.from_numpy(v.copy()) for k, v in
                          MLP(np.random.default_rng(0)).state_dict().items()})
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    pm.eval()
    for name in ("default", "other"):
        pm.set_adapter(name)
        lora.set_adapter(model, name)
        np.testing.assert_allclose(_run(t, pm), model(IDS), rtol=1e-5, atol=1e-6)
    names = ["other", "default", "__base__", "default"]
    with lora.adapter_names(model, names):
        np.testing.assert_allclose(_run(t, pm, adapter_names=names), model(IDS), rtol=1e-5,
                                   atol=1e-6)


# ------------------------------------------------------------------ the causal LM

LLAMA = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)


def _llama_with_adapters():
    model = LlamaForCausalLM(LlamaConfig(**LLAMA), seed=0)
    lora.wrap(model, target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False, seed=1)
    lora.add_adapter(model, "code", target_modules=["q_proj", "o_proj", "down_proj"], r=8,
                     lora_alpha=32, init_lora_weights=False, seed=2)
    for _, layer in lora.lora_layers(model):  # updates large enough to change greedy tokens
        for ad in layer.adapters.values():
            ad.B.data *= 30
    return model.eval()


def test_llama_mixed_batch_logits_and_generate():
    model = _llama_with_adapters()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    names = ["code", "default", "__base__"]
    logits = model(ids, mask, adapter_names=names)
    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], adapter_names=names)
    alone = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapters(model):
                want = model(ids[i:i + 1], mask[i:i + 1])
                gen = model.generate(ids[i:i + 1], mask[i:i + 1], max_new_tokens=8,
                                     eos_token_id=[])
        else:
            lora.set_adapter(model, name)
            want = model(ids[i:i + 1], mask[i:i + 1])
            gen = model.generate(ids[i:i + 1], mask[i:i + 1], max_new_tokens=8, eos_token_id=[])
        keep = mask[i].astype(bool)
        np.testing.assert_allclose(logits[i][keep], want[0][keep], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(out[i], gen[0])
        alone.append(gen[0])
    assert len({tuple(a[6:]) for a in alone}) > 1  # the adapters do change the text


def test_bert_mixed_batch_equals_each_row_alone():
    from lora.models import BertModel
    from lora.models.bert import BertConfig

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16)
    model = BertModel(cfg, seed=0).eval()
    lora.wrap(model, target_modules=["query", "value", "word_embeddings"], r=4,
              init_lora_weights=False, seed=1)
    lora.add_adapter(model, "b", target_modules=["key", "dense"], r=6, init_lora_weights=False,
                     seed=2)
    ids = np.random.default_rng(0).integers(1, 50, (3, 7))
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    names = ["b", "default", "__base__"]
    got = model(ids, mask, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with lora.disable_adapters(model):
                want = model(ids[i:i + 1], mask[i:i + 1])
        else:
            lora.set_adapter(model, name)
            want = model(ids[i:i + 1], mask[i:i + 1])
        np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_lora_info_names_the_other_adapters(tmp_path):
    from lora.cli.info import describe_adapter

    lora.save_adapter(_two_adapters(), tmp_path)
    text = describe_adapter(tmp_path)
    assert "1 named adapter(s) in subdirectories: other" in text
    assert "fc1" in describe_adapter(tmp_path / "other")


def test_pickle_and_copy_keep_the_adapters():
    import copy
    import pickle

    model = _two_adapters()
    lora.set_adapter(model, ["default", "other"])
    want = model(IDS)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        np.testing.assert_array_equal(clone(IDS), want)
        assert clone.fc1.adapter("other").A is dict(clone.named_parameters())["fc1.lora_A.other"]
        with lora.adapter_names(clone, ["other", "default", "__base__", "other"]):
            clone(IDS)


def test_threads_run_their_own_mixed_batches():
    from concurrent.futures import ThreadPoolExecutor

    model = _two_adapters()
    plans = [["other", "default", "__base__", "other"], ["default"] * 4, ["__base__", "other"] * 2,
             ["other"] * 4]
    want = []
    for names in plans:
        with lora.adapter_names(model, names):
            want.append(model(IDS))

    def run(i):
        out = []
        for _ in range(30):
            with lora.adapter_names(model, plans[i]):
                out.append(model(IDS))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    for i, outs in enumerate(results):
        for got in outs:
            np.testing.assert_array_equal(got, want[i])
    assert not lora.tuners.lora.BATCH_ADAPTERS.__dict__.get("by_layer")  # left as it was
