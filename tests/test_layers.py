"""LoRALinear and LoRAEmbedding: forward against the formula, backward against finite
differences and the NumPy twin (with dropout), merge/unmerge, fan_in_fan_out, and every
init_lora_weights method."""

import numpy as np
import pytest

from gradcheck import numeric_gradient
from lora import _reference, nn
from lora.tuners import LoRAEmbedding, LoRALinear, init_lora_weights

F64 = {"dtype": np.float64}


def _lora_linear(d_in=6, d_out=5, r=3, seed=0, conv=False, **kw):
    rng = np.random.default_rng(seed)
    base = (
        nn.Conv1D(d_out, d_in, rng=rng, **F64) if conv else nn.Linear(d_in, d_out, rng=rng, **F64)
    )
    base.bias.data[:] = rng.standard_normal(d_out)
    kw.setdefault("init_lora_weights", False)
    return LoRALinear(base, r, kw.pop("lora_alpha", 6), rng=rng, **kw)


def _W(layer):
    return layer.weight.data.T if layer.fan_in_fan_out else layer.weight.data


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (1, 6)])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("conv", [False, True])
def test_linear_forward_and_gradients(shape, r, conv):
    layer = _lora_linear(r=r, conv=conv)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    A, B, W, b = layer.lora_A.data, layer.lora_B.data, _W(layer), layer.bias.data
    np.testing.assert_allclose(layer(x), x @ W.T + b + layer.scaling * (x @ A.T) @ B.T, rtol=1e-12)

    dy = rng.standard_normal(shape[:-1] + (5,))
    layer.bias.requires_grad = True
    layer(x)
    dx = layer.backward(dy)
    assert layer.weight.grad is None  # frozen: never computed

    def f():
        return float((layer(x) * dy).sum())

    for name, arr, grad in [
        ("x", x, dx),
        ("A", A, layer.lora_A.grad),
        ("B", B, layer.lora_B.grad),
        ("bias", b, layer.bias.grad),
    ]:
        np.testing.assert_allclose(grad, numeric_gradient(f, arr), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_linear_trainable_base_weight_gets_gradient():
    layer = _lora_linear(conv=True)
    layer.weight.requires_grad = True
    x, dy = np.ones((2, 6)), np.arange(10.0).reshape(2, 5)
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, (dy.T @ x).T)  # stored (in, out)


def test_dropout_masks_are_fresh_and_replayed_in_backward():
    layer = _lora_linear(lora_dropout=0.4)
    x = np.random.default_rng(2).standard_normal((8, 6))
    y1, y2 = layer(x), layer(x)
    assert np.abs(y1 - y2).max() > 1e-3  # a new mask per forward
    kind, _variant, _x, (xa, p, seed, *_) = layer.__dict__["_cache"]
    assert kind == "variant"
    assert p == 0.4
    dy = np.ones_like(y2)
    dx = layer.backward(dy)
    A, B = layer.lora_A.data, layer.lora_B.data
    ref = _reference.linear_backward(
        dy, x, xa, _W(layer), A, B, layer.scaling, dropout=0.4, seed=seed
    )
    np.testing.assert_allclose(dx, ref[0], rtol=1e-12)
    np.testing.assert_allclose(layer.lora_A.grad, ref[1], rtol=1e-12)
    np.testing.assert_allclose(layer.lora_B.grad, ref[2], rtol=1e-12)
    layer.eval()
    W, b = _W(layer), layer.bias.data
    np.testing.assert_allclose(layer(x), x @ W.T + b + layer.scaling * (x @ A.T) @ B.T, rtol=1e-12)


@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge_idempotent(conv):
    layer = _lora_linear(conv=conv).eval()
    x = np.random.default_rng(3).standard_normal((4, 6))
    w0, y0 = layer.weight.data.copy(), layer(x)
    layer.merge()
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer(x), y0, rtol=1e-12)
    delta = layer.scaling * layer.lora_B.data @ layer.lora_A.data
    np.testing.assert_allclose(layer.weight.data, w0 + (delta.T if conv else delta), rtol=1e-12)
    layer.train()
    layer(x)
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(np.ones((4, 5)))
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.weight.data, w0, atol=1e-14)


def test_safe_merge_refuses_non_finite():
    layer = _lora_linear()
    layer.lora_B.data[0, 0] = np.inf
    w0 = layer.weight.data.copy()
    with pytest.raises(ValueError, match="finite"):
        layer.merge(safe_merge=True)
    np.testing.assert_array_equal(layer.weight.data, w0)
    assert not layer.merged


def test_float32_merge_within_rounding():
    rng = np.random.default_rng(4)
    layer = LoRALinear(nn.Linear(64, 48, rng=rng), 8, 16, init_lora_weights=False, rng=rng).eval()
    x = rng.standard_normal((10, 64)).astype(np.float32)
    y = layer(x)
    layer.merge()
    assert layer(x).dtype == np.float32
    assert np.abs(layer(x) - y).max() < 1e-5


def test_scaling_and_rslora():
    base = nn.Linear(4, 4)
    assert LoRALinear(base, 4, 8).scaling == 2.0
    assert LoRALinear(nn.Linear(4, 4), 4, 8, use_rslora=True).scaling == 4.0
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), 0)
    with pytest.raises(TypeError):
        LoRALinear(nn.ReLU())


def test_init_methods():
    rng = np.random.default_rng(5)
    base = nn.Linear(400, 300, rng=rng)
    layer = LoRALinear(base, 16, 32, rng=rng)  # True
    assert np.all(layer.lora_B.data == 0)
    assert np.abs(layer.lora_A.data).max() <= 1 / 20 and np.abs(layer.lora_A.data).max() > 0.049
    x = rng.standard_normal((3, 400)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), base(x))  # a fresh adapter is a no-op
    init_lora_weights(layer, "gaussian")
    assert np.all(layer.lora_B.data == 0)
    assert layer.lora_A.data.std() == pytest.approx(1 / 16, rel=0.02)
    init_lora_weights(layer, False)
    assert np.abs(layer.lora_B.data).max() > 0.2 and np.abs(layer.lora_B.data).max() <= 0.25
    with pytest.raises(ValueError):
        init_lora_weights(layer, "loftq")


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("conv", [False, True])
def test_pissa_olora_keep_the_function(method, conv):
    layer = _lora_linear(d_in=8, d_out=6, r=3, conv=conv)
    w0 = _W(layer).copy()
    x = np.random.default_rng(6).standard_normal((5, 8))
    y0 = x @ w0.T + layer.bias.data
    init_lora_weights(layer, method)
    np.testing.assert_allclose(layer.eval()(x), y0, rtol=1e-10, atol=1e-12)
    A, B = layer.lora_A.data, layer.lora_B.data
    if method == "pissa":  # the top-3 singular directions moved into the adapter
        S = np.linalg.svd(w0, compute_uv=False)
        np.testing.assert_allclose(np.diag(A @ A.T), S[:3] / layer.scaling, rtol=1e-10)
        np.testing.assert_allclose(
            np.linalg.svd(_W(layer), compute_uv=False)[:3], S[3:6], rtol=1e-8
        )
    else:  # B has orthonormal columns
        np.testing.assert_allclose(B.T @ B, np.eye(3), atol=1e-12)
    layer.merge()
    np.testing.assert_allclose(_W(layer), w0, atol=1e-12)


def test_embedding_forward_backward_merge():
    rng = np.random.default_rng(7)
    base = nn.Embedding(12, 5, padding_idx=0, rng=rng, **F64)
    layer = LoRAEmbedding(base, 3, 6, init_lora_weights=False, rng=rng)
    A, B = layer.lora_embedding_A.data, layer.lora_embedding_B.data
    assert A.shape == (3, 12) and B.shape == (5, 3)
    ids = np.array([[0, 3, 3, 11], [5, 0, 1, 2]])
    y = layer(ids)
    np.testing.assert_allclose(y, base.weight.data[ids] + 2.0 * A.T[ids] @ B.T, rtol=1e-12)
    dy = rng.standard_normal(y.shape)
    assert layer.backward(dy) is None
    assert layer.weight.grad is None
    ids_flat, dy_flat = ids.reshape(-1), dy.reshape(-1, 5)
    dB = 2.0 * dy_flat.T @ A.T[ids_flat]
    dAT = np.zeros((12, 3))
    for i, row in zip(ids_flat, 2.0 * dy_flat @ B, strict=True):
        if i != 0:  # torch gives the padding row no gradient
            dAT[i] += row
    np.testing.assert_allclose(layer.lora_embedding_B.grad, dB, rtol=1e-12)
    np.testing.assert_allclose(layer.lora_embedding_A.grad, dAT.T, rtol=1e-12)
    layer.eval().merge()
    np.testing.assert_allclose(layer(ids), y, rtol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data[ids], base.weight.data[ids])


def test_embedding_init():
    rng = np.random.default_rng(8)
    layer = LoRAEmbedding(nn.Embedding(50, 40, rng=rng), 8, rng=rng)
    assert np.all(layer.lora_embedding_A.data == 0)
    assert layer.lora_embedding_B.data.std() == pytest.approx(1.0, rel=0.1)
    init_lora_weights(layer, False)
    assert layer.lora_embedding_A.data.std() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("merged", [False, True])
def test_no_input_grad_skips_dx_but_not_the_parameter_gradients(merged):
    rng = np.random.default_rng(5)
    x, dout = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    grads = {}
    for need in (True, False):
        layer = _lora_linear(seed=1)
        if merged:
            layer.lora_A.requires_grad = layer.lora_B.requires_grad = False
            layer.merge()
        layer.need_input_grad = need
        layer.train()
        layer(x)
        dx = layer.backward(dout)
        assert (dx is None) == (not need)
        grads[need] = [None if p.grad is None else p.grad.copy() for p in layer.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    base = nn.Linear(6, 5, rng=rng, dtype=np.float64)
    base.need_input_grad = False
    base(x)
    assert base.backward(dout) is None and base.weight.grad is not None
