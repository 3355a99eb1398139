"""lora.nn: module bookkeeping, every layer's backward against finite differences (float64),
forward/backward against torch when it is installed, and the losses."""

import copy

import numpy as np
import pytest

from gradcheck import numeric_gradient
from lora import nn


def _fd_check(module, x, *, eps=1e-6, rtol=1e-6, atol=1e-8, seed=0):
    """Compare module.backward with central differences of sum(module(x) * dy), for the input
    and every trainable parameter. float64 throughout."""
    rng = np.random.default_rng(seed)
    module.train()
    y = module(x)
    dy = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = module.backward(dy)

    def f():
        return float((module(x) * dy).sum())

    def numeric(arr):
        return numeric_gradient(f, arr, eps)

    if dx is not None:
        np.testing.assert_allclose(dx, numeric(x), rtol=rtol, atol=atol)
    for name, p in module.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad, numeric(p.data), rtol=rtol, atol=atol, err_msg=name)


F64 = {"dtype": np.float64}


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (1, 4), (0, 4)])
def test_linear_gradients(shape):
    rng = np.random.default_rng(1)
    layer = nn.Linear(4, 3, rng=rng, **F64)
    x = rng.standard_normal(shape)
    if shape[0] == 0:
        y = layer(x)
        assert y.shape == (0, 3)
        assert layer.backward(np.zeros((0, 3))).shape == (0, 4)
        np.testing.assert_array_equal(layer.weight.grad, 0)
        return
    _fd_check(layer, x)


def test_linear_without_bias_and_frozen_weight_gets_no_grad():
    rng = np.random.default_rng(2)
    layer = nn.Linear(4, 3, bias=False, rng=rng, **F64)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    layer.weight.requires_grad = False
    x = rng.standard_normal((6, 4))
    layer(x)
    dx = layer.backward(np.ones((6, 3)))
    assert layer.weight.grad is None
    np.testing.assert_allclose(dx, np.ones((6, 3)) @ layer.weight.data)


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(3)
    layer = nn.Linear(4, 3, rng=rng, **F64)
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    layer(x)
    layer.backward(dy)
    once = layer.weight.grad.copy()
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * once)
    np.testing.assert_allclose(layer.bias.grad, 2 * dy.sum(0))
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_conv1d_is_a_transposed_linear():
    rng = np.random.default_rng(4)
    conv = nn.Conv1D(3, 4, rng=rng, **F64)
    assert conv.weight.shape == (4, 3)
    conv.bias.data[:] = rng.standard_normal(3)
    x = rng.standard_normal((2, 5, 4))
    np.testing.assert_allclose(conv(x), x @ conv.weight.data + conv.bias.data)
    _fd_check(conv, x)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_gradients(affine):
    rng = np.random.default_rng(5)
    ln = nn.LayerNorm(6, eps=1e-5, elementwise_affine=affine, **F64)
    if affine:
        ln.weight.data[:] = rng.standard_normal(6)
        ln.bias.data[:] = rng.standard_normal(6)
    x = rng.standard_normal((2, 3, 6))
    y = ln(x)
    if not affine:
        np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
        np.testing.assert_allclose(y.var(-1), 1 / (1 + 1e-5 / x.var(-1)), rtol=1e-10)
    _fd_check(ln, x, rtol=1e-5)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.GELU("tanh"), nn.Tanh(), nn.SiLU()])
def test_activation_gradients(act):
    x = np.random.default_rng(6).standard_normal((3, 7)) * 3
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU away from its kink
    _fd_check(act, x)


def test_activation_values():
    x = np.array([-30.0, -1.0, 0.0, 1.0, 2.0, 30.0])
    np.testing.assert_allclose(
        nn.GELU()(x)[1:5], [-0.15865525393145707, 0.0, 0.8413447460685429, 1.9544997361036416]
    )
    np.testing.assert_allclose(nn.GELU("tanh")(x)[3], 0.8411919906082768)
    np.testing.assert_allclose(nn.SiLU()(x), x / (1 + np.exp(-x)))
    assert np.isfinite(nn.SiLU()(np.array([-1000.0, 1000.0], np.float32))).all()
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("fast")


def test_embedding_gradients_and_padding():
    rng = np.random.default_rng(7)
    emb = nn.Embedding(10, 4, padding_idx=0, rng=rng, **F64)
    np.testing.assert_array_equal(emb.weight.data[0], 0)
    ids = np.array([[1, 3, 3], [0, 9, 1]])
    y = emb(ids)
    np.testing.assert_array_equal(y, emb.weight.data[ids])
    dy = rng.standard_normal(y.shape)
    assert emb.backward(dy) is None
    expect = np.zeros((10, 4))
    for i, row in zip(ids.reshape(-1), dy.reshape(-1, 4), strict=True):
        expect[i] += row
    expect[0] = 0
    np.testing.assert_allclose(emb.weight.grad, expect)
    with pytest.raises(IndexError):
        emb(np.array([10]))
    with pytest.raises(TypeError):
        emb(np.array([1.0]))


def test_dropout_train_and_eval():
    drop = nn.Dropout(0.25, rng=np.random.default_rng(8))
    x = np.ones((200, 100), np.float32)
    y = drop(x)
    assert y.dtype == np.float32
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    np.testing.assert_array_equal(drop.backward(x), y)  # same mask in backward
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError):
        nn.Dropout(1.0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_pytorch_style_names_and_state_dict():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names[:3] == ["embed.weight", "layers.0.attn.q_proj.weight", "layers.0.attn.q_proj.bias"]
    assert "layers.1.attn.v_proj.bias" in names and names[-1] == "head.2.bias"
    assert "layers.1.norm" in dict(net.named_modules())
    assert net.get_submodule("layers.1.attn.q_proj") is net.layers[1].attn["q_proj"]
    sd = {k: v + 1 for k, v in net.state_dict().items()}
    other = Net()
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    assert sum(p.size for p in net.parameters()) == 5 * 4 + 2 * (2 * 20 + 8) + 40 + 18


def test_load_state_dict_checks_everything_first():
    net = Net()
    before = copy.deepcopy(net.state_dict())
    sd = {k: np.zeros_like(v) for k, v in before.items()}
    sd["head.2.weight"] = np.zeros((3, 8))
    with pytest.raises(ValueError, match="head.2.weight"):
        net.load_state_dict(sd)
    del sd["head.2.weight"]
    with pytest.raises(KeyError, match="head.2.weight"):
        net.load_state_dict(sd)
    for k, v in net.state_dict().items():  # nothing half-loaded
        np.testing.assert_array_equal(v, before[k])
    sd["extra"] = np.zeros(1)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["head.2.weight"] and unexpected == ["extra"]
    np.testing.assert_array_equal(net.embed.weight.data, 0)


def test_train_eval_and_backward_needs_a_training_forward():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    net.eval()
    assert not any(m.training for m in net.modules())
    net(np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="training mode"):
        net.backward(np.ones((2, 3), np.float32))
    net.train()
    assert all(m.training for m in net.modules())


def test_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(9)
    mlp = nn.Sequential(
        nn.Linear(5, 7, rng=rng, **F64),
        nn.GELU(),
        nn.LayerNorm(7, **F64),
        nn.Linear(7, 7, rng=rng, **F64),
        nn.SiLU(),
        nn.Linear(7, 3, rng=rng, **F64),
    )
    _fd_check(mlp, rng.standard_normal((4, 5)), rtol=1e-5)


def test_cross_entropy_values_and_gradient():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [0.0, 0.0, 0.0]])
    targets = np.array([0, 2, -100])
    loss, d = nn.cross_entropy(logits, targets)
    lse = np.log(np.exp(logits).sum(1))
    expect = -((logits[0, 0] - lse[0]) + (logits[1, 2] - lse[1])) / 2
    assert loss == pytest.approx(expect, rel=1e-12)
    np.testing.assert_array_equal(d[2], 0)
    eps = 1e-6
    for i, j in [(0, 0), (1, 2), (1, 1)]:
        up, down = logits.copy(), logits.copy()
        up[i, j] += eps
        down[i, j] -= eps
        fd = (nn.cross_entropy(up, targets)[0] - nn.cross_entropy(down, targets)[0]) / (2 * eps)
        assert d[i, j] == pytest.approx(fd, abs=1e-8)
    big = np.array([[1000.0, -1000.0]], np.float32)
    loss, d = nn.cross_entropy(big, np.array([1]))
    assert loss == pytest.approx(2000.0) and d.dtype == np.float32
    total, _ = nn.cross_entropy(logits[None], targets[None], reduction="sum")
    assert total == pytest.approx(2 * expect)


def test_mse_loss():
    pred, target = np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0])
    loss, d = nn.mse_loss(pred, target)
    assert loss == pytest.approx(13 / 3)
    np.testing.assert_allclose(d, 2 * (pred - target) / 3)
    assert nn.mse_loss(pred, target, reduction="sum")[0] == pytest.approx(13)


@pytest.mark.parametrize("name", ["linear", "layernorm", "gelu", "gelu_tanh", "silu", "tanh"])
def test_layers_match_torch(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    ours = {
        "linear": nn.Linear(6, 5, rng=rng),
        "layernorm": nn.LayerNorm(6),
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU("tanh"),
        "silu": nn.SiLU(),
        "tanh": nn.Tanh(),
    }[name]
    theirs = {
        "linear": torch.nn.Linear(6, 5),
        "layernorm": torch.nn.LayerNorm(6),
        "gelu": torch.nn.GELU(),
        "gelu_tanh": torch.nn.GELU("tanh"),
        "silu": torch.nn.SiLU(),
        "tanh": torch.nn.Tanh(),
    }[name]
    for n, p in ours.named_parameters():
        p.data[...] = rng.standard_normal(p.shape)
        getattr(theirs, n).data = torch.from_numpy(p.data.copy())
    x = (rng.standard_normal((2, 3, 6)) * 2).astype(np.float32)
    dy = rng.standard_normal((2, 3, 5 if name == "linear" else 6)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    ty = theirs(tx)
    ty.backward(torch.from_numpy(dy))
    y = ours(x)
    dx = ours.backward(dy)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    for n, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, getattr(theirs, n).grad.numpy(), rtol=1e-4, atol=1e-4)


def test_from_arrays_uses_the_given_arrays():
    w, b = np.arange(6.0).reshape(2, 3), np.array([1.0, -1.0])
    lin = nn.Linear.from_arrays(w, b)
    assert (lin.in_features, lin.out_features) == (3, 2)
    np.testing.assert_array_equal(lin(np.ones((1, 3))), [[4.0, 11.0]])
    assert nn.Linear.from_arrays(w).bias is None
    emb = nn.Embedding.from_arrays(w.T.copy(), padding_idx=-1)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (3, 2, 2)
    np.testing.assert_array_equal(emb(np.array([1])), [[1.0, 4.0]])
