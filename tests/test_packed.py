"""PackedWeight (a frozen weight packed once into the panels of lora's packed GEMM) against
the NumPy twins: its layout, every kernel that takes it, bad input, threads, and the layers'
pack() (Linear, Conv1D, LoRALinear)."""

import sys
import threading

import numpy as np
import pytest

import lora
from lora import _reference as ref
from lora import functional as F
from lora import nn
from test_functional import DTYPES, close, rand

# (rows, d_in, d_out, r): rows around the micro-tile heights (12, 8, 4, 2, 1); d_out and
# d_in off the 32/16-column panels. The GEMM copies x whole up to 1 MB and by blocks beyond
# (rows: lora_panel_block_rows, 43 tiles at most with a 2 MB L2; 2 KB of steps: 512 float32,
# 256 float64): the last three shapes take the blocked path forward (x 700 x 520: two blocks
# of rows, two or three of steps), backward (dy 300 x 900), and both (530 rows: two blocks,
# the last ending in a 2-row tile; 19-44 panels, so a thread meets more than the 8 panels of
# one chunk).
SHAPES = [
    (1, 8, 8, 1),
    (2, 7, 13, 3),
    (3, 33, 65, 2),
    (5, 40, 31, 4),
    (9, 17, 70, 2),
    (12, 64, 32, 8),
    (13, 300, 33, 5),
    (64, 257, 96, 16),
    (245, 70, 130, 3),
    (500, 20, 45, 31),
    (0, 6, 5, 2),
    (700, 520, 40, 4),
    (300, 48, 900, 2),
    (530, 700, 600, 3),
]


def twin_panels(M, width):
    """The panels of M (K, N): ceil(N / width) blocks of K x width, zero past N."""
    K, N = M.shape
    pad = np.zeros((K, -(-N // width) * width), M.dtype)
    pad[:, :N] = M
    return pad.reshape(K, -1, width).transpose(1, 0, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_panels_match_twin_and_are_a_read_only_copy(dtype, fan_in_fan_out):
    rng = np.random.default_rng(0)
    W = rand(rng, (37, 50), dtype)  # (d_out, d_in)
    stored = np.ascontiguousarray(W.T) if fan_in_fan_out else W.copy()
    pw = F.PackedWeight(stored, fan_in_fan_out=fan_in_fan_out)
    width = 128 // np.dtype(dtype).itemsize
    np.testing.assert_array_equal(pw.forward_panels, twin_panels(W.T, width))
    np.testing.assert_array_equal(pw.backward_panels, twin_panels(W, width))
    assert pw.shape == (37, 50) and pw.dtype == dtype
    assert pw.nbytes == pw.forward_panels.nbytes + pw.backward_panels.nbytes
    assert not pw.forward_panels.flags.writeable and not pw.backward_panels.flags.writeable
    assert "shape=(37, 50)" in repr(pw)
    with pytest.raises(AttributeError):
        pw.shape = (1, 1)
    stored[...] = 0  # a copy: the packed weight does not follow the array
    np.testing.assert_array_equal(pw.forward_panels, twin_panels(W.T, width))
    one_way = F.PackedWeight(W, backward=False)
    assert one_way.backward_panels is None and one_way.nbytes == pw.forward_panels.nbytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_in,d_out,r", SHAPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_kernels_on_a_packed_weight_match_twin(dtype, n, d_in, d_out, r, fan_in_fan_out):
    rng = np.random.default_rng(1)
    x, W, b = rand(rng, (n, d_in), dtype), rand(rng, (d_out, d_in), dtype), rand(rng, d_out,
                                                                                  dtype)
    A, B, dy = rand(rng, (r, d_in), dtype), rand(rng, (d_out, r), dtype), rand(rng, (n, d_out),
                                                                               dtype)
    pw = F.PackedWeight(np.ascontiguousarray(W.T) if fan_in_fan_out else W,
                        fan_in_fan_out=fan_in_fan_out)
    x64, W64, b64, A64, B64, dy64 = (a.astype(np.float64) for a in (x, W, b, A, B, dy))
    for p, seed in ((0.0, None), (0.3, 7)):
        y, xa = F.linear_forward(x, pw, A, B, 0.7, b, dropout=p, seed=seed)
        y_ref, xa_ref = ref.linear_forward(x64, W64, A64, B64, 0.7, b64, dropout=p, seed=seed)
        close(y, y_ref, dtype)
        close(xa, xa_ref, dtype)
        grads = F.linear_backward(dy, x, xa, pw, A, B, 0.7, dropout=p, seed=seed)
        refs = ref.linear_backward(dy64, x64, xa_ref, W64, A64, B64, 0.7, dropout=p, seed=seed)
        for got, want in zip(grads, refs, strict=True):
            close(got, want, dtype)
    close(F.dense_forward(x, pw, b), ref.dense_forward(x64, W64, b64), dtype)
    dx, dW = F.dense_backward(dy, x, pw)
    dx_ref, dW_ref = ref.dense_backward(dy64, x64, W64)
    close(dx, dx_ref, dtype)
    close(dW, dW_ref, dtype)
    # residual and add_dx_to, as with a plain weight
    res, acc = rand(rng, (n, d_out), dtype), rand(rng, (n, d_in), dtype)
    acc0 = acc.astype(np.float64)
    y2, _ = F.linear_forward(x, pw, A, B, 0.7, b, residual=res)
    close(y2, ref.linear_forward(x64, W64, A64, B64, 0.7, b64)[0] + res, dtype)
    out = F.dense_backward(dy, x, pw, need_dweight=False, add_dx_to=acc)[0]
    assert out is acc
    close(acc, acc0 + dx_ref, dtype)


def test_leading_dims_and_one_token():
    rng = np.random.default_rng(2)
    W, A, B = rand(rng, (20, 12), np.float32), rand(rng, (3, 12), np.float32), rand(
        rng, (20, 3), np.float32)
    pw = F.PackedWeight(W)
    for shape in [(2, 3, 12), (12,), (1, 12), (4, 0, 12)]:
        x = rand(rng, shape, np.float32)
        y, xa = F.linear_forward(x, pw, A, B, 0.5)
        y_ref, _ = F.linear_forward(x, W, A, B, 0.5)
        assert y.shape == y_ref.shape
        close(y, y_ref, np.float32)


def expect(exc, call, *words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), str(info.value)


def test_bad_input():
    rng = np.random.default_rng(3)
    x, W = rand(rng, (4, 6), np.float32), rand(rng, (5, 6), np.float32)
    A, B, dy = rand(rng, (2, 6), np.float32), rand(rng, (5, 2), np.float32), rand(
        rng, (4, 5), np.float32)
    pw, fwd_only = F.PackedWeight(W), F.PackedWeight(W, backward=False)
    before = [a.copy() for a in (x, W, A, B, dy)]
    expect(TypeError, lambda: F.PackedWeight([[1.0]]), "PackedWeight", "'weight'", "ndarray")
    expect(TypeError, lambda: F.PackedWeight(W.astype(np.int32)), "'weight'", "dtype")
    expect(ValueError, lambda: F.PackedWeight(W[0]), "'weight'", "2-D")
    expect(ValueError, lambda: F.PackedWeight(W[:0]), "'weight'", "at least 1")
    expect(TypeError, lambda: F.linear_forward(x.astype(np.float64), pw, A, B, 0.5),
           "linear_forward", "'weight'", "float64", "PackedWeight of float32")
    expect(ValueError, lambda: F.linear_forward(x, pw, A, B, 0.5, fan_in_fan_out=True),
           "linear_forward", "fan_in_fan_out")
    expect(ValueError, lambda: F.linear_forward(x, pw, A[:, :5], B, 0.5),
           "linear_forward", "'A'", "(2, 6)")
    expect(ValueError, lambda: F.linear_forward(x[:, :5], pw, A, B, 0.5), "'x'", "d_in")
    y, xa = F.linear_forward(x, fwd_only, A, B, 0.5)
    expect(ValueError, lambda: F.linear_backward(dy, x, xa, fwd_only, A, B, 0.5),
           "linear_backward", "'weight'", "backward=False")
    expect(ValueError, lambda: F.dense_backward(dy, x, fwd_only), "dense_backward",
           "backward=False")
    # without dx a forward-only packing is enough
    assert F.linear_backward(dy, x, xa, fwd_only, A, B, 0.5, need_dx=False)[0] is None
    assert F.dense_backward(dy, x, fwd_only, need_dx=False)[0] is None
    for a, b in zip((x, W, A, B, dy), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_refcounts_flat_over_many_calls():
    rng = np.random.default_rng(4)
    x, W = rand(rng, (9, 40), np.float32), rand(rng, (33, 40), np.float32)
    A, B = rand(rng, (2, 40), np.float32), rand(rng, (33, 2), np.float32)
    pw = F.PackedWeight(W)
    objs = (x, A, B, pw, pw.forward_panels, pw.backward_panels)

    def calls():
        y, xa = F.linear_forward(x, pw, A, B, 0.5)
        F.linear_backward(y, x, xa, pw, A, B, 0.5)
        F.dense_backward(y, x, pw)
        try:
            F.linear_forward(x, pw, A.T, B, 0.5)
        except ValueError:
            pass

    calls()
    counts = [sys.getrefcount(o) for o in objs]
    for _ in range(2000):
        calls()
    assert [sys.getrefcount(o) for o in objs] == counts


def test_threads_sharing_a_packed_weight_agree():
    rng = np.random.default_rng(5)
    W = rand(rng, (300, 200), np.float32)
    pw = F.PackedWeight(W)
    xs = [rand(rng, (40, 200), np.float32) for _ in range(4)]
    want = [F.dense_forward(x, pw) for x in xs]
    got, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(50):
                got[i] = F.dense_forward(xs[i], pw)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------- layers


def lora_layer(rng, d_in=48, d_out=40, conv1d=False):
    base = nn.Conv1D(d_out, d_in, rng=rng) if conv1d else nn.Linear(d_in, d_out, rng=rng)
    base.weight.requires_grad = False
    layer = lora.LoRALinear(base, r=4, lora_alpha=8, rng=rng)
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    return layer


def step(layer, x, dy):
    layer.zero_grad()
    y = layer(x)
    dx = layer.backward(dy)
    return y, dx, layer.lora_A.grad.copy(), layer.lora_B.grad.copy()


MAX_ROWS = F.PackedWeight(np.zeros((1, 1), np.float32)).max_rows


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("rows", [1, 7, MAX_ROWS + 1])
def test_packed_layer_matches_unpacked(conv1d, rows):
    rng = np.random.default_rng(6)
    layer = lora_layer(rng, conv1d=conv1d)
    x, dy = rand(rng, (rows, 48), np.float32), rand(rng, (rows, 40), np.float32)
    want = step(layer, x, dy)
    assert layer.pack() is layer and layer.packed
    for g, w in zip(step(layer, x, dy), want, strict=True):
        close(g, w, np.float32)
    layer.unpack()
    assert not layer.packed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_uses_packed_weight_up_to_max_rows(dtype):
    rng = np.random.default_rng(9)
    layer = lora_layer(rng).astype(dtype).pack()
    pw = layer._packed
    assert pw.max_rows == F.PackedWeight(layer.weight.data, backward=False).max_rows
    if dtype is np.float64:  # packed float64 tiles hold half the columns: they stop paying earlier
        assert 1 <= pw.max_rows < MAX_ROWS
    for shape in [(pw.max_rows, 48), (2, pw.max_rows // 2, 48)]:
        assert layer._weight_arg(np.zeros(shape, dtype))[0] is pw
        assert layer._weight_arg(np.zeros(shape, dtype), backward=True)[0] is pw
    for shape in [(pw.max_rows + 1, 48), (3, pw.max_rows, 48)]:
        assert layer._weight_arg(np.zeros(shape, dtype))[0] is layer.weight.data


def test_merge_unmerge_and_load_state_dict_pack_again():
    rng = np.random.default_rng(7)
    layer = lora_layer(rng).pack()
    x, dy = rand(rng, (5, 48), np.float32), rand(rng, (5, 40), np.float32)
    y0 = layer(x)
    layer.merge()  # the packed copy now holds W + s B A
    close(layer(x), y0, np.float32)
    layer.unmerge()
    close(layer(x), y0, np.float32)
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    state["weight"] += 1.0
    layer.load_state_dict(state)
    close(layer(x), y0 + x.sum(axis=1, keepdims=True), np.float32)
    layer.astype(np.float64)  # a new weight array: the packed copy is no longer used
    close(layer(x.astype(np.float64)), y0 + x.sum(axis=1, keepdims=True), np.float32)
    layer.backward(dy.astype(np.float64))


def test_pack_weights_packs_frozen_layers_only():
    rng = np.random.default_rng(8)
    frozen = nn.Linear(16, 24, rng=rng)
    frozen.weight.requires_grad = False
    trained = nn.Linear(24, 8, rng=rng)
    model = nn.Sequential(frozen, nn.ReLU(), trained)
    nbytes = lora.pack_weights(model, backward=False)
    assert frozen.packed and not trained.packed
    assert nbytes == frozen._packed.nbytes == 32 * 16 * 4  # one 32-column panel of 16 rows
    x = rand(rng, (3, 16), np.float32)
    y = model(x)
    model.backward(np.ones_like(y))  # forward-only packing: dx from the weight itself
    with pytest.raises(ValueError, match="trainable"):
        trained.pack()
    frozen.weight.requires_grad = True  # unfrozen after packing: the weight is used again
    assert frozen._weight_arg(x)[0] is frozen.weight.data
    lora.unpack_weights(model)
    assert not frozen.packed
