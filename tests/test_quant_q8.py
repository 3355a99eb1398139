"""Decoding products with 8-bit activations (QuantWeight(activations="q8"),
lora.set_quant_activations): x rounded to 8 bits per block of 32 (the twin
lora._reference.q8_activations), times W's blocks, in integers."""

import numpy as np
import pytest

import lora
from lora import _reference as R
from lora import functional as F
from lora import nn
from lora.quant import quantize

Q8_TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _x(rng, n, K):
    x = rng.standard_normal((n, K)).astype(np.float32) * 3
    x[0, :32] = 0  # a block of zeros (scale 0)
    x[-1, -32:] *= 1e4  # a block of large values
    x[:, min(40, K - 1)] = 0.5  # a tie of the rounding at small scales
    return x


@pytest.mark.parametrize("qtype", Q8_TYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [32, 96, 576, 4096])
def test_q8_products_against_the_twin(qtype, n, K):
    rng = np.random.default_rng(K + n)
    d_out = 37
    t = quantize(rng.standard_normal((d_out, K)).astype(np.float32), qtype)
    x = _x(rng, n, K)
    bias = rng.standard_normal(d_out).astype(np.float32)
    res = rng.standard_normal((n, d_out)).astype(np.float32)
    y = F.dense_forward(x, t.kernel_weight("q8"), bias, residual=res)
    W = t.dequantize().astype(np.float64)
    xh = R.q8_activations(x)
    want = xh @ W.T + bias + res
    scale = np.abs(xh) @ np.abs(W).T + np.abs(bias) + np.abs(res)
    assert np.all(np.abs(y - want) <= 2e-6 * scale)
    # and within 8-bit rounding of the float path
    exact = x.astype(np.float64) @ W.T + bias + res
    assert np.abs(y - exact).max() <= 0.02 * np.abs(scale).max()


@pytest.mark.parametrize("qtype", Q8_TYPES + ["NF4"])
def test_q8_leaves_the_other_paths_in_floats(qtype):
    """5 rows or more, float64 inputs, backward and NF4 (no integer path) give the float
    path's results exactly."""
    rng = np.random.default_rng(1)
    t = quantize(rng.standard_normal((24, 128)).astype(np.float32), qtype)
    w, w8 = t.kernel_weight(), t.kernel_weight("q8")
    assert (w.activations, w8.activations) == ("float", "q8") and "q8" in repr(w8)
    x5 = rng.standard_normal((5, 128)).astype(np.float32)
    assert np.array_equal(F.dense_forward(x5, w), F.dense_forward(x5, w8))
    x1 = rng.standard_normal((1, 128))
    assert np.array_equal(F.dense_forward(x1, w), F.dense_forward(x1, w8))
    dy = rng.standard_normal((2, 24)).astype(np.float32)
    x2 = x5[:2]
    a = F.dense_backward(dy, x2, w, need_dweight=False)[0]
    b = F.dense_backward(dy, x2, w8, need_dweight=False)[0]
    assert np.array_equal(a, b)
    if qtype == "NF4":
        assert np.array_equal(F.dense_forward(x2, w), F.dense_forward(x2, w8))


def test_quantweight_refuses_unknown_activations():
    t = quantize(np.ones((4, 32), np.float32), "Q4_0")
    for bad in ("int8", "", 8, None):
        with pytest.raises(ValueError, match="'activations' must be 'float' or 'q8'"):
            F.QuantWeight(t.data, "Q4_0", t.shape, activations=bad)
    with pytest.raises(TypeError):
        F.QuantWeight(t.data, "Q4_0", t.shape, "q8")  # keyword-only


def test_set_quant_activations_on_a_lora_model():
    """Every QuantLinear of a model, LoRA-wrapped ones too, decodes with q8 once set; the LoRA
    terms stay in floats; training batches are unchanged; bad values refused."""
    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.Linear(64, 96, rng=rng), nn.ReLU(), nn.Linear(96, 32, rng=rng))
    lora.quantize_model(model, "Q4_1", modules_to_not_convert=[])
    lora.wrap(model, r=4, target_modules=["0"], seed=0)
    for p in lora.trainable_parameters(model):
        p.data[...] = rng.standard_normal(p.data.shape) * 0.1
    model.eval()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x8 = rng.standard_normal((8, 64)).astype(np.float32)
    y_float, y8_float = model(x), model(x8)
    assert lora.set_quant_activations(model, "q8") == 2
    y_q8 = model(x)
    assert not np.array_equal(y_q8, y_float)
    assert np.abs(y_q8 - y_float).max() <= 0.03 * np.abs(y_float).max()
    assert np.array_equal(model(x8), y8_float)  # more than 4 rows: floats
    # the LoRA layer by hand: W times x's 8-bit rounding, the LoRA pair on x itself
    layer = model[0]
    base = layer.base_layer()
    x64 = x.astype(np.float64)
    want = (R.q8_activations(x) @ base.dequantize().astype(np.float64).T + base.bias.data
            + layer.scaling * (x64 @ layer.lora_A.data.T) @ layer.lora_B.data.T)
    got = layer(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert lora.set_quant_activations(model, "float") == 2
    assert np.array_equal(model(x), y_float)
    with pytest.raises(ValueError, match="activations must be one of"):
        lora.set_quant_activations(model, "int4")
