"""lora.quant and QuantLinear: block formats bit for bit against the PyPI `gguf` package's
gguf.quants (and NF4 against lora._reference's NumPy twin of QLoRA's algorithm), the
quantized products against float64 on the dequantized weight, LoRA over a quantized base."""

import os
import pickle

import numpy as np
import pytest

import lora
from lora import _reference as R
from lora import functional as F
from lora import nn
from lora.quant import QTYPES, QTensor, dequantize, quantize, row_bytes

gq = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as G  # noqa: E402


def _hostile(shape, seed):
    """Normal data with what breaks quantizers: zero blocks, one huge outlier per row,
    constant blocks, tiny values, a block whose largest magnitude is negative, float16's
    overflow region."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :64] = 0.0
    if flat.shape[0] > 1:
        flat[1, 3] = 1e4
        flat[1, 40:64] = 2.5
    if flat.shape[0] > 2:
        flat[2] *= 1e-6
        flat[2, 7] = -30.0
    if flat.shape[0] > 3:
        flat[3, :32] = np.float32(7e4) * rng.standard_normal(32).astype(np.float32)
    return x


SHAPES = [(1, 64), (3, 256), (7, 3, 512), (33, 576)]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # gguf, 7e4
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gguf_bytes_and_values(qtype, shape):
    x = _hostile(shape, seed=len(shape) * 100 + shape[-1])
    ref = gq.quantize(x, G[qtype])
    qt = quantize(x, qtype)
    assert qt.data.shape == ref.shape and qt.data.dtype == np.uint8
    np.testing.assert_array_equal(qt.data, ref)
    want = gq.dequantize(ref, G[qtype])
    got = qt.dequantize()
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit


@pytest.mark.parametrize("qtype,nbytes", [("Q4_K", 144), ("Q6_K", 210), ("Q8_0", 34),
                                          ("Q4_0", 18), ("Q4_1", 20)])
def test_dequantize_any_bytes_as_gguf(qtype, nbytes):
    # every bit pattern of the quants, with float16 scales of the sizes real files hold
    rng = np.random.default_rng(nbytes)
    raw = rng.integers(0, 256, (9, 3 * nbytes * (256 // QTYPES[qtype][0])), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.02).astype(np.float16)
    at = {"Q6_K": [208], "Q4_K": [0, 2], "Q4_1": [0, 2]}.get(qtype, [0])
    for i, off in enumerate(at):
        blocks[:, off:off + 2] = scales[:, i:i + 1].view(np.uint8)
    shape = (9, raw.shape[1] // nbytes * QTYPES[qtype][0])
    want = gq.dequantize(raw, G[qtype])
    got = dequantize(raw, qtype, shape)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 64), (5, 128), (4, 3, 192)])
def test_nf4_against_reference(shape):
    x = _hostile(shape, seed=shape[-1])
    qt = quantize(x, "NF4")
    np.testing.assert_array_equal(qt.data, R.nf4_quantize(x))
    np.testing.assert_array_equal(qt.dequantize(), R.nf4_dequantize(qt.data, shape))
    # each value is the nearest code times its block's absmax
    blocks = x.reshape(-1, 64).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    err = np.abs(qt.dequantize().reshape(-1, 64) - blocks)
    gaps = np.diff(R.NF4_CODE.astype(np.float64)).max() / 2
    assert (err <= gaps * amax * (1 + 1e-6) + 1e-30).all()


def test_nf4_ties_go_to_the_lower_code():
    code = R.NF4_CODE.astype(np.float64)
    mid = ((code[1:] + code[:-1]) / 2).astype(np.float32)
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = 1.0  # absmax 1: the other values are their own normalised values
    x[0, 1:16] = mid
    q = quantize(x, "NF4").data[0, 4:]
    codes = np.empty(64, np.uint8)
    codes[0::2], codes[1::2] = q >> 4, q & 15
    np.testing.assert_array_equal(codes[1:16], np.arange(15))


# --------------------------------------------------------------------- NF4_DQ


def _dq_parts(data, K):
    """An NF4_DQ tensor's rows split as csrc/kernels/quant.c lays them out: offset (rows,),
    absmax2 (rows, groups), scale codes (rows, nb), NF4 code bytes (rows, nb, 32)."""
    nb, ng = K // 64, -(-(K // 64) // 256)
    rows = data.reshape(-1, row_bytes("NF4_DQ", K))
    offset = rows[:, :4].copy().view("<f4")[:, 0]
    absmax2 = rows[:, 4:4 + 4 * ng].copy().view("<f4")
    return (offset, absmax2, rows[:, 4 + 4 * ng:4 + 4 * ng + nb],
            rows[:, 4 + 4 * ng + nb:].reshape(-1, nb, 32))


def _dq_hostile(shape, seed):
    """_hostile's rows, then rows that stress the scales' own quantization: all zeros, every
    block the same absmax (absmax2 0), values near float32's smallest normals, and blocks
    whose absmax spans six decades."""
    x = _hostile(shape, seed)
    flat = x.reshape(-1, shape[-1])
    nb = shape[-1] // 64
    rng = np.random.default_rng(seed + 1)
    extra = [np.zeros(shape[-1], np.float32),
             np.tile(np.linspace(-1.5, 1.5, 64, dtype=np.float32), nb),
             rng.standard_normal(shape[-1]).astype(np.float32) * np.float32(1e-36),
             (rng.standard_normal(shape[-1]) * np.repeat(10.0 ** rng.uniform(-4, 2, nb), 64))
             .astype(np.float32)]
    for i, row in enumerate(extra, start=4):
        if i < len(flat):
            flat[i] = row
    return x


@pytest.mark.parametrize("shape", SHAPES + [(9, 64 * 300), (2, 64 * 256), (8, 64 * 513)])
def test_nf4dq_against_reference(shape):
    x = _dq_hostile(shape, seed=shape[-1] + 1)
    K, nb = shape[-1], shape[-1] // 64
    qt = quantize(x, "NF4_DQ")
    assert qt.data.shape == shape[:-1] + (row_bytes("NF4_DQ", K),)
    np.testing.assert_array_equal(qt.data, R.nf4dq_quantize(x))
    got = qt.dequantize()
    want = R.nf4dq_dequantize(qt.data, shape)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
    # the codes are plain NF4's (quantized against the exact absmax, as bitsandbytes does)
    offset, absmax2, scale, codes = _dq_parts(qt.data, K)
    nf4 = quantize(x, "NF4").data.reshape(-1, nb, 36)
    np.testing.assert_array_equal(codes, nf4[:, :, 4:])
    # each decoded scale is within half the map's widest step (times absmax2) of the absmax,
    # the offset the mean absmax
    absmax = nf4[:, :, :4].copy().view("<f4")[..., 0].astype(np.float64)
    a2 = np.repeat(absmax2, 256, axis=1)[:, :nb].astype(np.float64)
    decoded = R.DYNAMIC_MAP[scale].astype(np.float64) * a2 + offset[:, None]
    half_step = np.diff(R.DYNAMIC_MAP.astype(np.float64)).max() / 2  # 0.00703
    assert (np.abs(decoded - absmax) <= (half_step + 1e-6) * a2 + 1e-6 * absmax).all()
    np.testing.assert_allclose(offset, absmax.mean(axis=1), rtol=1e-6)


def test_dynamic_map_is_bitsandbytes_and_the_kernels_use_it():
    code = R.DYNAMIC_MAP
    assert code.dtype == np.float32 and code.shape == (256,) and (np.diff(code) > 0).all()
    assert code[127] == 0 and code[255] == 1 and code[0] == np.float32(-0.99296875)
    np.testing.assert_array_equal(code[:127], -code[128:255][::-1])  # symmetric but for 1
    # the kernels' table: scale codes 0..255 with absmax2 1 and offset 0, every NF4 code 1.0
    nb = 256
    row = np.zeros(row_bytes("NF4_DQ", 64 * nb), np.uint8)
    row[4:8] = np.array([1.0], "<f4").view(np.uint8)
    row[8:8 + nb] = np.arange(256)
    row[8 + nb:] = 0xFF
    vals = dequantize(row[None], "NF4_DQ", (1, 64 * nb)).reshape(nb, 64)
    np.testing.assert_array_equal(vals[:, 0].view(np.uint32), code.view(np.uint32))
    # bitsandbytes' create_dynamic_map(signed=True) builds it with torch, in float32: the
    # twin rounds each value once from float64 and lands within an ulp of it
    torch = pytest.importorskip("torch")
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    bnb = torch.tensor(sorted(values), dtype=torch.float32).numpy()
    ulps = np.abs(code.view(np.int32).astype(np.int64) - bnb.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1


def test_nf4dq_scale_ties_go_to_the_lower_code():
    # four blocks of absmax 0, 2, 1 + u and 1 - u: offset 1, absmax2 1, centred scales
    # -1, 1, u and -u exactly, u a midpoint between two codes of the map (one of the 38 for
    # which 1 + u and 1 - u are exact in float32)
    code = R.DYNAMIC_MAP.astype(np.float64)
    mid = ((code[1:] + code[:-1]) / 2).astype(np.float32)
    one = np.float32(1)
    ties = [i for i, u in enumerate(mid) if 0 < u < 1 and (one + u) - one == u
            and one - (one - u) == u]
    assert len(ties) == 38
    x = np.zeros((len(ties), 4 * 64), np.float32)
    for r, i in enumerate(ties):
        x[r, [64, 128, 192]] = 2, one + mid[i], one - mid[i]
    data = quantize(x, "NF4_DQ").data
    np.testing.assert_array_equal(data, R.nf4dq_quantize(x))
    offset, absmax2, scale, _ = _dq_parts(data, 256)
    assert (offset == 1).all() and (absmax2 == 1).all()
    np.testing.assert_array_equal(scale[:, :2], [[0, 255]] * len(ties))  # -1 has no code
    np.testing.assert_array_equal(scale[:, 2], ties)  # mid[i] goes to code i, the lower
    neg = -mid[ties]
    lower = np.searchsorted(mid, neg, side="left")
    assert np.isin(neg, mid).sum() == 37  # ties as well: all but the midpoint next to 1
    np.testing.assert_array_equal(scale[:, 3], lower)


def test_nf4dq_costs_little_accuracy_for_fewer_bytes():
    rng = np.random.default_rng(11)
    for shape, bits in [((96, 576), 4.2361), ((48, 1536), 4.1667), ((8, 64 * 300), 4.13)]:
        W = rng.standard_normal(shape).astype(np.float32)
        err = {}
        for qtype in ("NF4", "NF4_DQ"):
            qt = quantize(W, qtype)
            err[qtype] = np.linalg.norm(qt.dequantize() - W) / np.linalg.norm(W)
        # measured: 1.0001-1.0003 times NF4's on Gaussian rows
        assert err["NF4"] < err["NF4_DQ"] * 1.0005 and err["NF4_DQ"] < 1.002 * err["NF4"], err
        assert qt.nbytes * 8 / W.size == pytest.approx(bits, abs=1e-4)


def test_row_bytes_and_the_double_quant_spelling():
    from gguf.constants import GGML_QUANT_SIZES

    for qtype, (block, nbytes, _) in QTYPES.items():
        if not qtype.startswith("NF4"):
            assert GGML_QUANT_SIZES[G[qtype]] == (block, nbytes)
            assert row_bytes(qtype, 3 * block) == 3 * nbytes
    assert row_bytes("NF4", 576) == 9 * 36
    sizes = [row_bytes("NF4_DQ", K) for K in (64, 576, 4096, 64 * 256, 64 * 257)]
    assert sizes == [41, 305, 2120, 8 + 33 * 256, 12 + 33 * 257]
    W = np.random.default_rng(12).standard_normal((5, 640))
    qt = quantize(W, "NF4", double_quant=True)
    assert qt.qtype == "NF4_DQ" and qt.data.shape == (5, 8 + 33 * 10)
    np.testing.assert_array_equal(qt.data, quantize(W, "NF4_DQ").data)
    with pytest.raises(ValueError, match="double_quant applies to NF4"):
        quantize(W, "Q4_0", double_quant=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        row_bytes("NF4_DQ", 96)
    with pytest.raises(ValueError, match="qtype must be one of"):
        row_bytes("NF8", 64)


def test_nf4dq_bad_arguments_are_refused():
    x = np.random.default_rng(13).standard_normal((3, 576)).astype(np.float32)
    data = quantize(x, "NF4_DQ").data
    keep = data.copy()
    with pytest.raises(ValueError, match=r"must hold 915 bytes \(3 rows of 305 NF4_DQ bytes"):
        F.dequantize(data[:, :-1].copy(), "NF4_DQ", (3, 576))
    with pytest.raises(ValueError, match="must hold 816 bytes"):
        F.dequantize(data, "NF4_DQ", (3, 512))
    with pytest.raises(ValueError, match="must hold"):
        F.dequantize(quantize(x, "NF4").data, "NF4_DQ", (3, 576))
    with pytest.raises(ValueError, match="must hold"):
        F.QuantWeight(data, "NF4_DQ", (3, 640))
    with pytest.raises(ValueError, match="data holds"):
        QTensor(data, "NF4_DQ", (2, 576))
    with pytest.raises(ValueError, match="multiple of 64"):
        F.quantize(np.ones((2, 96), np.float32), "NF4_DQ")
    with pytest.raises(ValueError, match="multiple of 64"):
        F.dequantize(data, "NF4_DQ", (3, 600))
    bad = x.copy()
    bad[2, 7] = np.inf
    with pytest.raises(ValueError, match="finite.*element 1159"):
        F.quantize(bad, "NF4_DQ")
    np.testing.assert_array_equal(data, keep)  # nothing written
    np.testing.assert_array_equal(F.dequantize(data, "NF4_DQ", (3, 576)),
                                  R.nf4dq_dequantize(data, (3, 576)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_nf4dq_products_over_rows_of_several_groups(dtype, n):
    # 300 blocks a row: two groups of scales on the dot path (n <= 4) and in the tiles
    rng = np.random.default_rng(20 + n)
    d_out, d_in = 24, 64 * 300
    qt = quantize(_dq_hostile((d_out, d_in), 5) / 8, "NF4_DQ")
    W = qt.dequantize().astype(np.float64)
    x = rng.standard_normal((n, d_in)).astype(dtype)
    y = F.dense_forward(x, qt.kernel_weight())
    want = x.astype(np.float64) @ W.T
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=0, atol=tol * np.abs(want).max())
    dy = rng.standard_normal((n, d_out)).astype(dtype)
    dx, _ = F.dense_backward(dy, x, qt.kernel_weight(), need_dweight=False)
    want = dy.astype(np.float64) @ W
    np.testing.assert_allclose(dx, want, rtol=0, atol=tol * np.abs(want).max())


def test_quantization_errors_are_within_a_step():
    x = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    for qtype, tol in [("Q8_0", 0.006), ("Q4_0", 0.12), ("Q4_1", 0.09), ("NF4", 0.1),
                       ("NF4_DQ", 0.1)]:
        err = np.abs(quantize(x, qtype).dequantize() - x).mean() / np.abs(x).mean()
        assert err < tol, (qtype, err)


def test_bad_arguments_name_what_was_expected():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="qtype must be one of"):
        quantize(x, "Q4_K")  # read only
    with pytest.raises(ValueError, match="qtype"):
        F.quantize(x, "Q5_0")
    with pytest.raises(TypeError, match="'qtype' must be a str"):
        F.quantize(x, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize(np.ones((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(np.ones((2, 96), np.float32), "NF4")
    bad = x.copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="finite.*element 69"):
        F.quantize(bad, "Q4_0")
    with pytest.raises(TypeError, match="float32 or float64"):
        F.quantize(np.ones((2, 64), np.int32), "Q4_0")
    data = quantize(x, "Q4_0").data
    with pytest.raises(ValueError, match="must hold 72 bytes"):
        F.dequantize(data[:, :-1].copy(), "Q4_0", (2, 64))
    with pytest.raises(TypeError, match="uint8"):
        F.dequantize(data.astype(np.int16), "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="C-contiguous"):
        F.dequantize(np.asfortranarray(np.zeros((18, 4), np.uint8)), "Q4_0", (2, 64))
    with pytest.raises(TypeError, match="shape"):
        F.dequantize(data, "Q4_0", 128)
    with pytest.raises(ValueError, match="shape"):
        F.QuantWeight(data.reshape(-1), "Q4_0", (2, 64, 1))
    with pytest.raises(ValueError, match="data holds"):
        QTensor(data, "Q4_0", (3, 64))
    qw = F.QuantWeight(data, "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="fan_in_fan_out must be False with a QuantWeight"):
        F.dense_forward(np.ones((3, 64), np.float32), qw, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="d_in"):
        F.dense_forward(np.ones((3, 32), np.float32), qw)
    assert np.array_equal(data, quantize(x, "Q4_0").data)  # nothing written


# --------------------------------------------------------------------- products


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 4, 5, 70])
def test_products_against_float64(qtype, dtype, n):
    rng = np.random.default_rng(n)
    d_out, d_in = (640, 512) if n == 70 else (96, 256)  # 640 x 512 float32: two 1 MB tiles
    if qtype in ("Q4_K", "Q6_K"):  # read-only types: bytes from gguf's layout
        nbytes = QTYPES[qtype][1]
        raw = rng.integers(0, 256, (d_out, d_in // 256 * nbytes), dtype=np.uint8)
        blocks = raw.reshape(-1, nbytes)
        scales = (rng.random((len(blocks), 2)) * 0.01).astype(np.float16).view(np.uint8)
        if qtype == "Q6_K":
            blocks[:, 208:210] = scales[:, :2]
        else:  # d and dmin
            blocks[:, 0:4] = scales
        qt = QTensor(raw, qtype, (d_out, d_in))
    else:
        qt = quantize(rng.standard_normal((d_out, d_in)), qtype)
    W = qt.dequantize().astype(np.float64)
    x = rng.standard_normal((n, d_in)).astype(dtype)
    bias = rng.standard_normal(d_out).astype(dtype)
    res = rng.standard_normal((n, d_out)).astype(dtype)
    qw = qt.kernel_weight()
    y = F.dense_forward(x, qw, bias, residual=res)
    want = x.astype(np.float64) @ W.T + bias + res
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=0, atol=tol * np.abs(want).max())
    dy = rng.standard_normal((n, d_out)).astype(dtype)
    dx, dw = F.dense_backward(dy, x, qw, need_dweight=False)
    want = dy.astype(np.float64) @ W
    assert dw is None
    np.testing.assert_allclose(dx, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("n", [1, 3, 48])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_over_a_quantized_base_against_float64(n, dropout):
    rng = np.random.default_rng(7)
    d_in, d_out, r, scale = 256, 160, 8, 2.0
    qt = quantize(rng.standard_normal((d_out, d_in)) / 16, "Q4_1")
    W = qt.dequantize().astype(np.float64)
    A = rng.standard_normal((r, d_in)).astype(np.float32) / 16
    B = rng.standard_normal((d_out, r)).astype(np.float32)
    bias = rng.standard_normal(d_out).astype(np.float32)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    seed = 11 if dropout else None
    y, xa = F.linear_forward(x, qt.kernel_weight(), A, B, scale, bias, dropout=dropout,
                             seed=seed)
    x64 = [a.astype(np.float64) for a in (x, A, B, bias)]
    want, _ = R.linear_forward(x64[0], W, x64[1], x64[2], scale, x64[3], dropout=dropout,
                               seed=seed)
    np.testing.assert_allclose(y, want, rtol=0, atol=3e-6 * np.abs(want).max())
    dy = rng.standard_normal((n, d_out)).astype(np.float32)
    dx, dA, dB = F.linear_backward(dy, x, xa, qt.kernel_weight(), A, B, scale,
                                   dropout=dropout, seed=seed)
    wants = R.linear_backward(dy.astype(np.float64), x64[0], xa.astype(np.float64), W, x64[1],
                              x64[2], scale, dropout=dropout, seed=seed)
    for got, want in zip((dx, dA, dB), wants, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-6 * np.abs(want).max())


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(128, 256, rng=rng), nn.GELU(), nn.Linear(256, 64, rng=rng))


@pytest.mark.parametrize("qtype", ["NF4", "NF4_DQ"])
def test_quantize_model_and_qlora_training_and_merge(qtype):
    model = _mlp()
    float_out = model(np.random.default_rng(1).standard_normal((8, 128)))
    lora.quantize_model(model, qtype, modules_to_not_convert=["2"])
    assert model.quantized_modules == ["0"]
    assert isinstance(model[0], nn.QuantLinear) and type(model[2]) is nn.Linear
    assert not model[0].weight.requires_grad and model[0].weight.dtype == np.uint8
    assert model[0].qtype == qtype and model[0].weight.shape == (256, row_bytes(qtype, 128))
    x = np.random.default_rng(1).standard_normal((8, 128))
    y = model(x)
    assert y.dtype == np.float32
    assert np.abs(y - float_out).max() < 0.1 * np.abs(float_out).max()

    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])
    model = lora.wrap(model, cfg, seed=2)
    layer = model[0]
    assert layer.quantized and layer.lora_A.dtype == np.float32
    trainable, total = lora.print_trainable_parameters(model)
    assert total == 128 * 256 + 256 + 256 * 64 + 64 + trainable
    opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    target = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    losses = []
    for _ in range(20):
        loss, d = nn.mse_loss(model(x), target)
        opt.zero_grad()
        model.backward(d)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.8 * losses[0]
    assert layer.lora_B.grad is not None and np.abs(layer.lora_B.data).max() > 0

    with pytest.raises(ValueError, match="quantized.*merge_and_unload"):
        layer.merge()
    model.eval()
    y_lora = model(x)
    state = lora.tuners.merged_state_dict(model)
    want_w = layer.base_layer().dequantize() + layer.scaling * (layer.lora_B.data @
                                                                 layer.lora_A.data)
    np.testing.assert_allclose(state["0.weight"], want_w, rtol=0, atol=1e-6)
    merged = lora.merge_and_unload(model)
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == np.float32
    np.testing.assert_allclose(merged(x), y_lora, rtol=0, atol=2e-5 * np.abs(y_lora).max())


@pytest.mark.parametrize("qtype", ["Q4_0", "NF4_DQ"])
def test_quantized_model_pickles_and_state_dict_round_trips(qtype):
    model = lora.quantize_model(_mlp(), qtype)
    x = np.random.default_rng(4).standard_normal((3, 128)).astype(np.float32)
    y = model(x)
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again(x), y)
    other = lora.quantize_model(_mlp(seed=9), qtype)
    other.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(other(x), y)


def test_quantlinear_refuses_what_it_cannot_do():
    q = nn.QuantLinear.from_linear(nn.Linear(64, 32), "Q8_0")
    with pytest.raises(ValueError, match="not packed"):
        q.pack()
    q(np.ones((2, 64)))
    q.weight.requires_grad = True
    with pytest.raises(RuntimeError, match="cannot be trained"):
        q.backward(np.ones((2, 32), np.float32))
    with pytest.raises(TypeError, match="QTensor"):
        nn.QuantLinear(np.zeros((32, 64)))
    layer = lora.LoRALinear(nn.QuantLinear.from_linear(nn.Linear(64, 32), "Q8_0"), r=2)
    with pytest.raises(ValueError, match="quantized"):
        lora.init_lora_weights(layer, "pissa")


# --------------------------------------------------------------------- LoftQ


def test_loftq_reduces_the_error_of_plain_quantization():
    # a weight with a low-rank part, as trained weights have, plus noise
    rng = np.random.default_rng(5)
    W = (rng.standard_normal((192, 16)) @ rng.standard_normal((16, 256)) / 4
         + rng.standard_normal((192, 256)) / 8).astype(np.float32)
    for qtype in ("NF4", "NF4_DQ", "Q4_0"):
        plain = np.linalg.norm(W - quantize(W, qtype).dequantize())
        errs = []
        for it in (1, 3):
            q, A, B = lora.quant.loftq(W, 16, qtype, it, scaling=2.0)
            assert A.shape == (16, 256) and B.shape == (192, 16)
            errs.append(np.linalg.norm(W - (q.dequantize() + 2.0 * B @ A)))
        assert errs[0] < 0.9 * plain, (qtype, plain, errs)
        assert errs[1] <= errs[0] * 1.001, (qtype, errs)


@pytest.mark.parametrize("qtype", ["NF4", "NF4_DQ"])
def test_wrap_with_loftq_quantizes_the_base_and_starts_near_w(qtype):
    model = _mlp(3)
    W = model[0].weight.data.copy()
    x = np.random.default_rng(6).standard_normal((256, 128)).astype(np.float32)
    y_float = model(x)
    plain = lora.quantize_model(_mlp(3), qtype, modules_to_not_convert=[])(x)
    loftq_config = {"loftq_iter": 2} if qtype == "NF4" else {"loftq_iter": 2, "qtype": qtype}
    cfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"],
                          init_lora_weights="loftq", loftq_config=loftq_config)
    model = lora.wrap(model, cfg, seed=0)
    layer = model[0]
    assert layer.quantized and layer.base_layer().qtype == qtype
    merged = lora.tuners.merged_state_dict(model)["0.weight"]
    assert np.linalg.norm(merged - W) < np.linalg.norm(layer.base_layer().dequantize() - W)
    assert np.linalg.norm(model(x) - y_float) < np.linalg.norm(plain - y_float)
    assert lora.LoraConfig.from_dict(cfg.to_dict()).loftq_config == loftq_config
    with pytest.raises(ValueError, match="loftq_config"):
        lora.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ValueError, match="quantized already"):
        lora.wrap(lora.quantize_model(_mlp(), "Q8_0", modules_to_not_convert=[]),
                  target_modules=["0"], init_lora_weights="loftq")


# --------------------------------------------------------------------- models


def test_gguf_keep_quantized_matches_the_dequantized_model(tmp_path):
    test_gguf = pytest.importorskip("test_gguf")
    from gguf.constants import GGMLQuantizationType as T

    import lora.models.gguf
    from lora.models import LlamaForCausalLM

    cfg = dict(test_gguf.BASE)
    weights = test_gguf.random_weights(cfg, np.random.default_rng(0))
    test_gguf.write_gguf(tmp_path / "m.gguf", cfg, weights, [T.Q4_1, T.Q8_0, T.Q4_0, T.F16])
    full = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    kept = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf", keep_quantized=True)
    layers = dict(kept.named_modules())
    header = lora.models.gguf.read_header(tmp_path / "m.gguf")
    kinds = set()
    for name, info in header.tensors.items():
        path = lora.models.gguf.hf_name(name).rpartition(".")[0]
        if info.shape[-1] != cfg["hidden_size"] and "_proj" not in path or "norm" in path:
            continue
        layer = layers[path]
        kinds.add(info.type_name)
        if info.type_name in QTYPES:  # kept as the file's blocks (q and k rows un-permuted)
            assert isinstance(layer, (nn.QuantLinear, nn.QuantEmbedding)), path
            assert layer.qtype == info.type_name
            want = dict(full.named_modules())[path].weight.data
            np.testing.assert_array_equal(layer.dequantize(), want, err_msg=path)
        else:
            assert type(layer) in (nn.Linear, nn.Embedding), path
    assert kinds == {"Q4_1", "Q8_0", "Q4_0", "F16"}
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, 24))
    want = full(ids)
    np.testing.assert_allclose(kept(ids), want, rtol=0, atol=1e-5 * np.abs(want).max())
    greedy = full.generate(ids[:1, :6], max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(kept.generate(ids[:1, :6], max_new_tokens=8,
                                                eos_token_id=[]), greedy)
    # QLoRA: the LoRA gradients over the kept blocks are those over the dequantized floats
    for m in (full, kept):
        lora.wrap(m, target_modules="all-linear", r=4, lora_alpha=8, seed=0,
                  init_lora_weights=False)
        m.train()
        m(ids, labels=ids)
        m.backward()
    got = {n: p.grad for n, p in kept.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) == 2 * 7 * cfg["num_hidden_layers"]
    for n in got:
        np.testing.assert_allclose(got[n], want[n], rtol=0,
                                   atol=1e-4 * np.abs(want[n]).max(), err_msg=n)
    with pytest.raises(ValueError, match="keep_quantized applies to a GGUF"):
        LlamaForCausalLM.from_pretrained(tmp_path, keep_quantized=True)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_export_gguf_of_a_merged_model_loads_back(qtype, tmp_path):
    test_gguf = pytest.importorskip("test_gguf")
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType as T

    from lora.models import LlamaForCausalLM
    from lora.models.gguf import read_header
    from lora.models.gguf_export import export_gguf

    cfg = dict(test_gguf.BASE, tie_word_embeddings=True, rope_scaling=test_gguf.LLAMA3)
    weights = test_gguf.random_weights(cfg, np.random.default_rng(0))
    tokens = [f"t{i}" for i in range(cfg["vocab_size"])]
    src = tmp_path / "src.gguf"
    test_gguf.write_gguf(src, cfg, weights, [T.Q4_1, T.F16], tokens)
    model = LlamaForCausalLM.from_pretrained(src, keep_quantized=True)
    lora.wrap(model, target_modules="all-linear", r=4, lora_alpha=8, seed=1,
              init_lora_weights=False)  # B != 0: the merge changes every projection
    merged = lora.tuners.merged_state_dict(model)
    for path, m in model.named_modules():  # the layers kept quantized, as floats
        if isinstance(m, (nn.QuantLinear, nn.QuantEmbedding)):
            merged[path + ".weight"] = m.dequantize()
    out = tmp_path / f"out.{qtype}.gguf"
    stats = export_gguf(model, out, qtype)
    assert stats["types"].get(qtype if qtype != "F16" else "F16", 0) >= 14
    with pytest.raises(FileExistsError):
        export_gguf(model, out, qtype)
    assert not [p for p in os.listdir(tmp_path) if ".lora-export-" in p]

    h_src, h_out = read_header(src), read_header(out)
    assert h_out.metadata.pop("general.file_type") == {"Q8_0": 7, "Q4_0": 2, "F16": 1}[qtype]
    h_src.metadata.pop("general.file_type", None)
    assert h_out.metadata.keys() == h_src.metadata.keys()
    assert h_out.metadata["tokenizer.ggml.tokens"] == tokens
    assert list(h_out.tensors) == list(h_src.tensors)
    reader = GGUFReader(str(out))  # the gguf package reads it
    assert len(reader.tensors) == len(h_src.tensors)
    back = LlamaForCausalLM.from_pretrained(out)
    for name, p in back.named_parameters():
        want = merged[name]
        if p.data.ndim == 2 and qtype != "F16":
            want = quantize(want, qtype).dequantize()  # exactly what the file holds
        elif p.data.ndim == 2:
            want = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(p.data, want, err_msg=name)
    np.testing.assert_array_equal(back.model.inv_freq, model.model.inv_freq)  # rope_freqs


def test_export_gguf_refuses_a_model_without_a_gguf_source(tmp_path):
    from lora.models import LlamaForCausalLM, LlamaConfig
    from lora.models.gguf_export import export_gguf

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    with pytest.raises(ValueError, match="needs the GGUF file"):
        export_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(model, tmp_path / "x.gguf", "Q4_K")
    for qtype in ("NF4", "NF4_DQ"):
        with pytest.raises(ValueError, match="GGUF has no NF4"):
            export_gguf(model, tmp_path / "x.gguf", qtype)


def test_lora_merge_cli_writes_gguf_from_a_gguf_base(tmp_path):
    test_gguf = pytest.importorskip("test_gguf")
    from gguf.constants import GGMLQuantizationType as T

    from lora.cli.commands import main
    from lora.models import LlamaForCausalLM
    from lora.models.gguf_export import export_gguf

    cfg = dict(test_gguf.BASE)
    src = tmp_path / "src.gguf"
    test_gguf.write_gguf(src, cfg, test_gguf.random_weights(cfg, np.random.default_rng(2)),
                         [T.Q8_0])
    model = LlamaForCausalLM.from_pretrained(src)
    lora.wrap(model, target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4,
              seed=3, init_lora_weights=False)
    lora.save_adapter(model, tmp_path / "adapter")
    export_gguf(model, tmp_path / "direct.gguf", "Q4_0")
    assert main(["merge", str(src), str(tmp_path / "adapter"), "-o",
                 str(tmp_path / "cli.gguf"), "--qtype", "Q4_0", "-q"]) == 0
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "direct.gguf").read_bytes()
    assert main(["merge", str(src), str(tmp_path / "adapter"), "-o",
                 str(tmp_path / "cli.gguf"), "-q"]) == 1  # exists, no --force


@pytest.mark.parametrize("qtype", ["Q8_0", "NF4_DQ"])
def test_quant_embedding_lookup_and_lora_on_it(qtype):
    rng = np.random.default_rng(8)
    qt = quantize(rng.standard_normal((50, 128)), qtype)
    emb = nn.QuantEmbedding(qt)
    ids = rng.integers(0, 50, (3, 7))
    table = qt.dequantize()
    np.testing.assert_array_equal(emb(ids), table[ids])
    with pytest.raises(IndexError):
        emb(np.array([50]))
    layer = lora.LoRAEmbedding(emb, r=4, lora_alpha=8, init_lora_weights=False,
                               rng=np.random.default_rng(0))
    A, B = layer.lora_embedding_A.data, layer.lora_embedding_B.data
    np.testing.assert_allclose(layer(ids), table[ids] + 2.0 * (A.T[ids] @ B.T), rtol=1e-6,
                               atol=1e-6)
    layer.backward(np.ones((3, 7, 128), np.float32))
    assert layer.lora_embedding_B.grad is not None
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
