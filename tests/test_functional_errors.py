"""Bad input to lora.functional: one test per class of invalid argument. Each asserts the
exception, that its message names the function and the argument, and that no array changed.
Then reference counts and memory over many calls, and a property-based sweep."""

import gc
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora import _reference as ref
from lora import functional as F


def lora_args(dtype=np.float32, n=4, d_in=6, d_out=5, r=2, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((n, d_in)).astype(dtype),
        weight=rng.standard_normal((d_out, d_in)).astype(dtype),
        A=rng.standard_normal((r, d_in)).astype(dtype),
        B=rng.standard_normal((d_out, r)).astype(dtype),
    )


def snapshot(arrays):
    return {k: v.copy() for k, v in arrays.items() if isinstance(v, np.ndarray)}


def assert_unchanged(arrays, before):
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=f"argument {k!r} was modified")


def expect(exc, func, arg, call, arrays):
    before = snapshot(arrays)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert f"lora.functional.{func}" in msg, msg
    assert f"'{arg}'" in msg, msg
    assert_unchanged(arrays, before)
    return msg


def forward(a, **kw):
    return lambda: F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5, **kw)


# ---------------------------------------------------------------- types and dtypes

@pytest.mark.parametrize("arg", ["x", "weight", "A", "B"])
def test_not_an_array(arg):
    a = lora_args()
    b = dict(a, **{arg: a[arg].tolist()})
    expect(TypeError, "linear_forward", arg, forward(b), a)


@pytest.mark.parametrize("bad", [np.int32, np.float16, np.complex64])
def test_unsupported_dtype(bad):
    a = lora_args()
    b = dict(a, A=a["A"].astype(bad))
    msg = expect(TypeError, "linear_forward", "A", forward(b), a)
    assert "float32 or float64" in msg


def test_mixed_dtypes():
    a = lora_args()
    b = dict(a, B=a["B"].astype(np.float64))
    msg = expect(TypeError, "linear_forward", "B", forward(b), a)
    assert "float32" in msg and "float64" in msg


def test_bias_dtype():
    a = lora_args()
    expect(TypeError, "linear_forward", "bias",
           forward(a, bias=np.zeros(5, dtype=np.float64)), a)


# ---------------------------------------------------------------- ndim and shapes

def test_wrong_ndim():
    a = lora_args()
    expect(ValueError, "linear_forward", "A", forward(dict(a, A=a["A"][None])), a)
    expect(ValueError, "linear_forward", "weight", forward(dict(a, weight=a["weight"][0])), a)
    expect(ValueError, "linear_forward", "x", forward(dict(a, x=np.array(1.0, np.float32))), a)


@pytest.mark.parametrize("arg,shape", [("A", (2, 5)), ("B", (5, 3)), ("B", (4, 2)),
                                       ("x", (4, 7))])
def test_shape_mismatch(arg, shape):
    a = lora_args()
    b = dict(a, **{arg: np.zeros(shape, np.float32)})
    msg = expect(ValueError, "linear_forward", arg, forward(b), a)
    assert str(shape) in msg


def test_shape_message_is_precise():
    a = lora_args(r=8, d_in=512, d_out=4)
    b = dict(a, A=np.zeros((8, 511), np.float32))
    with pytest.raises(ValueError) as info:
        forward(b)()
    assert str(info.value) == (
        "lora.functional.linear_forward: argument 'A' must have shape (r, d_in) = (8, 512), "
        "got (8, 511)")


def test_bias_shape():
    a = lora_args()
    expect(ValueError, "linear_forward", "bias", forward(a, bias=np.zeros(4, np.float32)), a)


def test_empty_rank_and_empty_features():
    a = lora_args()
    expect(ValueError, "linear_forward", "A", forward(dict(a, A=np.zeros((0, 6), np.float32),
                                                           B=np.zeros((5, 0), np.float32))), a)
    expect(ValueError, "linear_forward", "weight",
           forward(dict(a, weight=np.zeros((5, 0), np.float32), x=np.zeros((4, 0), np.float32),
                        A=np.zeros((2, 0), np.float32))), a)


def test_backward_shapes():
    a = lora_args()
    y, xa = F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5)
    a.update(dy=np.ones_like(y), xa=xa)

    def call(**over):
        b = dict(a, **over)
        return lambda: F.linear_backward(b["dy"], b["x"], b["xa"], b["weight"], b["A"], b["B"],
                                         0.5)

    expect(ValueError, "linear_backward", "dy", call(dy=np.ones((3, 5), np.float32)), a)
    expect(ValueError, "linear_backward", "xa", call(xa=np.ones((4, 3), np.float32)), a)
    expect(TypeError, "linear_backward", "xa", call(xa=xa.astype(np.float64)), a)


def test_sizes_beyond_blas_int():
    # A broadcast view of 2**31 rows costs no memory; it must be refused before any copy.
    a = lora_args()
    huge = np.broadcast_to(a["x"][:1], (2**31, 6))
    with pytest.raises(ValueError, match="rows of x is 2147483648, beyond what BLAS takes"):
        forward(dict(a, x=huge))()
    wide = np.broadcast_to(np.float32(0), (2, 2**31))
    with pytest.raises(ValueError, match="beyond what BLAS takes"):
        F.merge(np.zeros((2, 2), np.float32), wide, np.zeros((2, 2), np.float32), 1.0)


# ---------------------------------------------------------------- in-place arguments

def merge_args():
    a = lora_args()
    return dict(weight=a["weight"], A=a["A"], B=a["B"])


def call_merge(a, **kw):
    return lambda: F.merge(a["weight"], a["A"], a["B"], 0.5, **kw)


def test_inplace_readonly_rejected():
    a = merge_args()
    a["weight"].flags.writeable = False
    msg = expect(ValueError, "merge", "weight", call_merge(a), a)
    assert "writeable" in msg


def test_inplace_noncontiguous_rejected():
    a = merge_args()
    big = np.zeros((5, 12), np.float32)
    a["weight"] = big[:, ::2]
    msg = expect(ValueError, "merge", "weight", call_merge(a), a)
    assert "C-contiguous" in msg
    a["weight"] = np.asfortranarray(np.ones((5, 6), np.float32))
    expect(ValueError, "merge", "weight", call_merge(a), a)


def test_inplace_byteswapped_rejected():
    a = merge_args()
    a["weight"] = a["weight"].astype(">f4")
    msg = expect(ValueError, "merge", "weight", call_merge(dict(a, A=a["A"], B=a["B"])), a)
    assert "byte order" in msg


def test_inplace_misaligned_rejected():
    buf = np.zeros(5 * 6 * 4 + 1, np.uint8)
    W = np.frombuffer(buf.data, dtype=np.float32, count=30, offset=1).reshape(5, 6)
    W.flags.writeable = True  # frombuffer of a writeable buffer
    a = dict(merge_args(), weight=W)
    msg = expect(ValueError, "merge", "weight", call_merge(a), a)
    assert "aligned" in msg


def test_merge_aliasing_rejected():
    W = np.zeros((6, 6), np.float32)
    a = dict(weight=W, A=W[:2], B=np.ones((6, 2), np.float32))
    msg = expect(ValueError, "merge", "A", call_merge(a), a)
    assert "shares memory" in msg
    a = dict(weight=W, A=np.ones((2, 6), np.float32), B=W[::-1, 3:5])
    expect(ValueError, "merge", "B", call_merge(a), a)


def test_merge_fan_in_fan_out_shape():
    a = merge_args()
    msg = expect(ValueError, "merge", "weight", call_merge(a, fan_in_fan_out=True), a)
    assert "fan_in_fan_out" in msg


# ---------------------------------------------------------------- Adam

def adam_args(dtype=np.float32):
    rng = np.random.default_rng(1)
    return dict(param=rng.standard_normal(10).astype(dtype),
                grad=rng.standard_normal(10).astype(dtype),
                m=np.zeros(10, dtype), v=np.zeros(10, dtype))


def adam(a, **kw):
    kw = dict(dict(step=1, lr=1e-3), **kw)
    return lambda: F.adam_step(a["param"], a["grad"], a["m"], a["v"], **kw)


@pytest.mark.parametrize("arg,value,exc", [
    ("step", 0, ValueError), ("step", -3, ValueError), ("step", 1.5, TypeError),
    ("lr", -1e-3, ValueError), ("lr", float("nan"), ValueError), ("lr", "big", TypeError),
    ("beta1", 1.0, ValueError), ("beta2", -0.1, ValueError), ("beta1", float("nan"), ValueError),
    ("eps", -1e-8, ValueError), ("weight_decay", -0.01, ValueError),
    ("weight_decay", float("inf"), ValueError)])
def test_adam_hyperparameters(arg, value, exc):
    a = adam_args()
    expect(exc, "adam_step", arg, adam(a, **{arg: value}), a)


@pytest.mark.parametrize("arg", ["param", "m", "v"])
def test_adam_state_must_be_inplace_capable(arg):
    a = adam_args()
    b = dict(a)
    b[arg] = np.zeros(20, np.float32)[::2]
    expect(ValueError, "adam_step", arg, adam(b), a)
    b[arg] = a[arg].copy()
    b[arg].flags.writeable = False
    expect(ValueError, "adam_step", arg, adam(b), a)


def test_adam_shapes_dtypes_aliasing():
    a = adam_args()
    expect(ValueError, "adam_step", "grad", adam(dict(a, grad=np.zeros(9, np.float32))), a)
    expect(TypeError, "adam_step", "m", adam(dict(a, m=np.zeros(10))), a)
    msg = expect(ValueError, "adam_step", "v", adam(dict(a, v=a["m"])), a)
    assert "shares memory" in msg
    expect(ValueError, "adam_step", "grad", adam(dict(a, grad=a["param"])), a)


def test_adam_requires_step_and_lr():
    a = adam_args()
    with pytest.raises(TypeError, match="'step' and 'lr'"):
        F.adam_step(a["param"], a["grad"], a["m"], a["v"], lr=1.0)


# ---------------------------------------------------------------- scalars and dropout

@pytest.mark.parametrize("kw,arg", [
    (dict(dropout=1.0, seed=1), "dropout"), (dict(dropout=-0.1, seed=1), "dropout"),
    (dict(dropout=float("nan"), seed=1), "dropout"), (dict(dropout=0.1), "seed"),
    (dict(dropout=0.1, seed=-1), "seed"), (dict(dropout=0.1, seed=2**64), "seed"),
    (dict(dropout=0.1, seed=1.0), "seed")])
def test_dropout_arguments(kw, arg):
    a = lora_args()
    expect((ValueError, TypeError), "linear_forward", arg, forward(a, **kw), a)


def test_scale_must_be_finite():
    a = lora_args()
    expect(ValueError, "linear_forward", "scale",
           lambda: F.linear_forward(a["x"], a["weight"], a["A"], a["B"], float("nan")), a)
    expect(TypeError, "merge", "scale",
           lambda: F.merge(a["weight"], a["A"], a["B"], None), a)


# ---------------------------------------------------------------- residual and add_dx_to

def with_residual(fn, a):
    if fn == "linear_forward":
        return lambda res: F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5, residual=res)
    return lambda res: F.dense_forward(a["x"], a["weight"], residual=res)


@pytest.mark.parametrize("fn", ["linear_forward", "dense_forward"])
def test_residual_bad_input(fn):
    a = lora_args()
    call = with_residual(fn, a)
    msg = expect(ValueError, fn, "residual", lambda: call(np.zeros((4, 6), np.float32)), a)
    assert "(..., d_out)" in msg and "(4, 5)" in msg
    expect(TypeError, fn, "residual", lambda: call(np.zeros((4, 5))), a)
    expect(TypeError, fn, "residual", lambda: call([[0.0] * 5] * 4), a)


def with_add_dx_to(fn, a):
    if fn == "linear_backward":
        return lambda acc, **kw: F.linear_backward(a["dy"], a["x"], a["xa"], a["weight"], a["A"],
                                                   a["B"], 0.5, add_dx_to=acc, **kw)
    return lambda acc, **kw: F.dense_backward(a["dy"], a["x"], a["weight"], add_dx_to=acc, **kw)


@pytest.mark.parametrize("fn", ["linear_backward", "dense_backward"])
def test_add_dx_to_bad_input(fn):
    a = lora_args()
    a["dy"], a["xa"] = F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5)
    a["acc"] = np.ones((4, 6), np.float32)
    call = with_add_dx_to(fn, a)
    msg = expect(ValueError, fn, "add_dx_to", lambda: call(np.ones((4, 5), np.float32)), a)
    assert "(..., d_in)" in msg
    expect(TypeError, fn, "add_dx_to", lambda: call(np.ones((4, 6))), a)
    msg = expect(ValueError, fn, "add_dx_to", lambda: call(np.ones((6, 4), np.float32).T), a)
    assert "C-contiguous" in msg
    ro = np.ones((4, 6), np.float32)
    ro.flags.writeable = False
    assert "writeable" in expect(ValueError, fn, "add_dx_to", lambda: call(ro), a)
    msg = expect(ValueError, fn, "add_dx_to", lambda: call(a["acc"], need_dx=False), a)
    assert "need_dx" in msg
    msg = expect(ValueError, fn, "add_dx_to", lambda: call(a["x"]), a)
    assert "shares memory with argument 'x'" in msg
    buf = np.zeros(44, np.float32)
    a["dy"] = buf[:20].reshape(4, 5)
    call(buf[20:].reshape(4, 6))  # separate halves of one buffer: fine
    msg = expect(ValueError, fn, "add_dx_to", lambda: call(buf[10:34].reshape(4, 6)), a)
    assert "shares memory with argument 'dy'" in msg


# ---------------------------------------------------------------- references and memory

def run_all_ok(a, y_shape):
    y, xa = F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5, dropout=0.1, seed=3)
    F.linear_backward(y, a["x"], xa, a["weight"], a["A"], a["B"], 0.5, dropout=0.1, seed=3)
    F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5, residual=y)
    F.linear_backward(y, a["x"], xa, a["weight"], a["A"], a["B"], 0.5, add_dx_to=a["acc"])
    F.dense_forward(a["x"], a["weight"], residual=y)
    F.dense_backward(y, a["x"], a["weight"], add_dx_to=a["acc"])
    F.merge(a["W2"], a["A"], a["B"], 0.5)
    F.unmerge(a["W2"], a["A"], a["B"], 0.5)
    F.dense_backward(y, a["x"], a["weight"])
    F.adam_step(a["A2"], a["A"], a["m"], a["v"], step=1, lr=1e-3)
    y, xa = F.linear_forward(a["x"], a["pw"], a["A"], a["B"], 0.5)
    F.linear_backward(y, a["x"], xa, a["pw"], a["A"], a["B"], 0.5)
    F.dense_backward(y, a["x"], a["pw"])


def run_all_bad(a):
    for call in (
        lambda: F.linear_forward(a["x"], a["weight"], a["A"].T, a["B"], 0.5),
        lambda: F.linear_backward(a["x"], a["x"], a["x"], a["weight"], a["A"], a["B"], 0.5),
        lambda: F.merge(a["ro"], a["A"], a["B"], 0.5),
        lambda: F.adam_step(a["A2"], a["A"], a["m"], a["v"], step=0, lr=1e-3),
        lambda: F.linear_forward(a["x"], a["weight"], a["A"], a["B"], 0.5, dropout=0.5),
        lambda: F.dense_forward(a["x"], a["weight"], residual=a["x"]),
        lambda: F.dense_backward(a["x"][:, :5], a["x"], a["weight"], add_dx_to=a["x"]),
        lambda: F.linear_forward(a["x"], a["pw"], a["A"].T, a["B"], 0.5),
        lambda: F.PackedWeight(a["x"][0]),
    ):
        try:
            call()
        except (TypeError, ValueError):
            pass
        else:
            raise AssertionError("bad call did not raise")


def test_refcounts_and_memory_flat_over_10000_calls():
    a = lora_args()
    x_strided = np.repeat(a["x"], 2, axis=1)[:, ::2]  # forces the copy path
    a.update(W2=a["weight"].copy(), A2=a["A"].copy(), m=np.zeros_like(a["A"]),
             v=np.zeros_like(a["A"]), ro=a["weight"].copy(), acc=np.zeros_like(a["x"]),
             pw=F.PackedWeight(a["weight"]))
    a["ro"].flags.writeable = False
    a["xs"] = x_strided
    for fn in (run_all_ok, run_all_bad):  # warm up caches and interned objects
        fn(a, None) if fn is run_all_ok else fn(a)
    gc.collect()
    counts = {k: sys.getrefcount(v) for k, v in a.items()}
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(10_000):
        run_all_ok(a, None)
        run_all_bad(a)
        F.linear_forward(a["xs"], a["weight"], a["A"], a["B"], 0.5)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert {k: sys.getrefcount(v) for k, v in a.items()} == counts
    assert grown < 64 * 1024, f"memory grew by {grown} bytes over 10,000 calls"


# ---------------------------------------------------------------- property-based

@st.composite
def lora_case(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(0, 9))
    d_in, d_out, r = (draw(st.integers(1, 12)) for _ in range(3))
    lead = draw(st.sampled_from([(n,), (1, n), (n, 1)]))
    values = st.floats(-4, 4, allow_nan=False, width=32)

    def arr(shape, strided):
        data = np.array(draw(st.lists(values, min_size=int(np.prod(shape)),
                                      max_size=int(np.prod(shape)))), dtype=dtype).reshape(shape)
        if strided and data.ndim >= 1 and data.shape[-1] > 0:
            spread = np.zeros(data.shape[:-1] + (data.shape[-1] * 2,), dtype)
            spread[..., ::2] = data
            data = spread[..., ::2]
        return data

    strided = draw(st.booleans())
    # Occasionally a wrong shape, dtype or value: the call must then raise, never crash.
    fault = draw(st.sampled_from([None] * 6 + ["shape", "dtype", "dropout", "seed"]))
    case = dict(x=arr((*lead, d_in), strided), weight=arr((d_out, d_in), strided),
                A=arr((r, d_in), False), B=arr((d_out, r), strided),
                dropout=draw(st.sampled_from([0.0, 0.5])), seed=draw(st.integers(0, 2**64 - 1)),
                dtype=dtype, fault=fault, packed=draw(st.booleans()))
    if fault == "shape":
        case["B"] = arr((d_out, r + 1), False)
    elif fault == "dtype":
        case["A"] = case["A"].astype(np.float64 if dtype == np.float32 else np.float32)
    elif fault == "dropout":
        case["dropout"] = 1.5
    elif fault == "seed":
        case["dropout"], case["seed"] = 0.5, None
    return case


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lora_case())
def test_property_never_crashes_and_matches_twin(c):
    before = snapshot(c)
    # the weight as an array, or packed (PackedWeight): the same results either way
    w = F.PackedWeight(c["weight"]) if c["packed"] else c["weight"]
    try:
        y, xa = F.linear_forward(c["x"], w, c["A"], c["B"], 0.5,
                                 dropout=c["dropout"], seed=c["seed"])
        dx, dA, dB = F.linear_backward(np.ones_like(y), c["x"], xa, w, c["A"], c["B"],
                                       0.5, dropout=c["dropout"], seed=c["seed"])
    except (TypeError, ValueError) as e:
        assert c["fault"] is not None, f"valid input raised: {e}"
        assert str(e).startswith("lora.functional.linear_")
        assert_unchanged(c, before)
        return
    assert c["fault"] is None, "invalid input was accepted"
    assert_unchanged(c, before)
    as64 = {k: c[k].astype(np.float64) for k in ("x", "weight", "A", "B")}
    y_ref, xa_ref = ref.linear_forward(as64["x"], as64["weight"], as64["A"], as64["B"], 0.5,
                                       dropout=c["dropout"], seed=c["seed"])
    g_ref = ref.linear_backward(np.ones(y_ref.shape), as64["x"], xa_ref, as64["weight"],
                                as64["A"], as64["B"], 0.5, dropout=c["dropout"], seed=c["seed"])
    tol = 1e-3 if c["dtype"] == np.float32 else 1e-10
    for got, want in zip((y, xa, dx, dA, dB), (y_ref, xa_ref, *g_ref), strict=True):
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max(initial=0)))


# ---------------------------------------------------------------- integers and float32 range

def _adam_arrays(dtype=np.float32):
    return [np.ones(4, dtype) for _ in range(4)]


@pytest.mark.parametrize("call, error, message", [
    (lambda: F.adam_step(*_adam_arrays(), step=2**70, lr=0.1), ValueError,
     r"adam_step: argument 'step' must be an int in \[1, "),
    (lambda: F.adam_step(*_adam_arrays(), step=1.0, lr=0.1), TypeError,
     "adam_step: argument 'step' must be an int, got 1.0"),
    (lambda: F.set_num_threads(2**70), ValueError,
     r"set_num_threads: argument 'n' must be an int in \[1, 4096\]"),
    (lambda: F.set_num_threads(1.0), TypeError, "set_num_threads: argument 'n' must be an int"),
    (lambda: F.linear_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32),
                              np.ones((1, 3), np.float32), np.ones((4, 1), np.float32), 1.0,
                              dropout=0.1, seed=np.array(0.5)), TypeError,
     "linear_forward: argument 'seed' must be an int"),
    (lambda: F.merge(np.ones((4, 3), np.float32), np.ones((1, 3), np.float32),
                     np.ones((4, 1), np.float32), 1e39), ValueError,
     "merge: argument 'scale' must be a number float32 holds"),
    (lambda: F.adam_step(*_adam_arrays(), step=1, lr=1e39), ValueError,
     "adam_step: argument 'lr' must be a number float32 holds"),
])
def test_integer_and_float32_range_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_float64_takes_what_float32_cannot():
    w = np.zeros((4, 3))
    F.merge(w, np.ones((1, 3)), np.full((4, 1), 1e-300), 1e39)
    assert np.isfinite(w).all() and w[0, 0] == pytest.approx(1e-261)
    F.adam_step(*_adam_arrays(np.float64), step=np.int64(3), lr=0.1)  # NumPy ints are ints


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_keeps_moments_finite_for_an_infinite_parameter(decoupled):
    """Without weight decay the L2 term is not computed (torch skips it), so an infinite
    parameter does not make m and v NaN (0 * inf)."""
    p = np.array([np.inf, -np.inf, 1.0], np.float32)
    g, m, v = np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32)
    F.adam_step(p, g, m, v, step=1, lr=0.1, weight_decay=0.0, decoupled=decoupled)
    assert np.isfinite(m).all() and np.isfinite(v).all()
    np.testing.assert_array_equal(p[:2], [np.inf, -np.inf])
