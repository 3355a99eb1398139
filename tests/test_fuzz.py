"""A fuzz test of the C boundary (lora.functional) against the NumPy twins (lora._reference).

Each call draws an operation, a dtype and random shapes (n = 0 and r = 1 included), then maybe
spoils one argument: a wrong dtype, a wrong shape, a strided view, an in-place argument that
aliases an input or is read-only, NaN/Inf values, or a huge broadcast view. A call either
raises TypeError/ValueError/OverflowError/MemoryError with every array unchanged, or returns
what the twin computes (within float32/float64 rounding; positions the twin makes non-finite
are compared as non-finite). No call may crash the interpreter.

CI runs 10,000 calls; `LORA_FUZZ_CALLS=1000000 LORA_FUZZ_SEED=7 pytest tests/test_fuzz.py`
runs a long campaign locally.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lora import _reference as ref
from lora import functional as F

CALLS = int(os.environ.get("LORA_FUZZ_CALLS", "10000"))
SEED = int(os.environ.get("LORA_FUZZ_SEED", "0"))
ALLOWED = (TypeError, ValueError, OverflowError, MemoryError)
RTOL = {np.float32: 3e-4, np.float64: 1e-10}


def _dims(rng):
    n = int(rng.choice([0, 1, 2, 3, 5, 8, 17]))
    return n, int(rng.integers(1, 20)), int(rng.integers(1, 20)), int(rng.integers(1, 6))


def _case(rng, op, dtype):
    """(args, kwargs, in-place argument names, twin) for one valid call."""
    n, d_in, d_out, r = _dims(rng)

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    scale = float(rng.uniform(-2, 2))
    if op == "linear_forward":
        args = {"x": arr(n, d_in), "weight": arr(d_out, d_in), "A": arr(r, d_in),
                "B": arr(d_out, r)}
        kw = {"scale": scale, "bias": arr(d_out) if rng.random() < 0.5 else None}
        return args, kw, (), lambda a: ref.linear_forward(a["x"], a["weight"], a["A"], a["B"],
                                                          kw["scale"], kw["bias"])
    if op == "mixed_forward":  # two adapters of their own ranks, some rows on neither
        r1 = int(rng.integers(1, 6))
        args = {"x": arr(n, d_in), "weight": arr(d_out, d_in), "A0": arr(r, d_in),
                "B0": arr(d_out, r), "A1": arr(r1, d_in), "B1": arr(d_out, r1)}
        kw = {"scales": [scale, 0.5], "adapter_ids": rng.integers(-1, 2, n)}
        return args, kw, (), lambda a: ref.mixed_forward(
            a["x"], a["weight"], [a["A0"], a["A1"]], [a["B0"], a["B1"]], kw["scales"],
            kw["adapter_ids"])
    if op == "linear_backward":
        args = {"dy": arr(n, d_out), "x": arr(n, d_in), "xa": arr(n, r), "weight": arr(d_out, d_in),
                "A": arr(r, d_in), "B": arr(d_out, r)}
        kw = {"scale": scale}
        return args, kw, (), lambda a: ref.linear_backward(a["dy"], a["x"], a["xa"], a["weight"],
                                                           a["A"], a["B"], kw["scale"])
    if op in ("merge", "unmerge"):
        args = {"weight": arr(d_out, d_in), "A": arr(r, d_in), "B": arr(d_out, r)}
        kw = {"scale": scale}
        twin = getattr(ref, op)
        return args, kw, ("weight",), lambda a: twin(a["weight"], a["A"], a["B"], kw["scale"])
    if op == "dora_norm":
        args = {"weight": arr(d_out, d_in), "A": arr(r, d_in), "B": arr(d_out, r)}
        kw = {"scale": scale}
        return args, kw, (), lambda a: ref.dora_norm(a["weight"], a["A"], a["B"], kw["scale"])
    if op in ("im2col", "col2im"):  # a valid geometry for a small batch of images
        k, st, pad, dil = (int(v) for v in rng.integers(1, 4, 4))
        pad -= 1
        hw = [int(rng.integers(dil * (k - 1) + 1, 12)) for _ in range(2)]
        shape = (max(n, 1), r, *hw)
        kw = {"kernel_size": k, "stride": st, "padding": pad, "dilation": dil}
        if op == "im2col":
            return {"x": arr(*shape)}, kw, (), lambda a: ref.im2col(a["x"], **kw)
        rows = len(ref.im2col(np.zeros(shape), **kw))
        kw["image_shape"] = shape
        geo = {k: v for k, v in kw.items() if k not in ("image_shape", "kernel_size")}
        return ({"cols": arr(rows, r * k * k)}, kw, (),
                lambda a: ref.col2im(a["cols"], shape, k, **geo))
    if op == "dense_forward":
        args = {"x": arr(n, d_in), "weight": arr(d_out, d_in)}
        kw = {"bias": arr(d_out) if rng.random() < 0.5 else None}
        return args, kw, (), lambda a: ref.dense_forward(a["x"], a["weight"], kw["bias"])
    if op == "dense_backward":
        args = {"dy": arr(n, d_out), "x": arr(n, d_in), "weight": arr(d_out, d_in)}
        return args, {}, (), lambda a: ref.dense_backward(a["dy"], a["x"], a["weight"])
    if op == "gelu_forward":
        args = {"x": arr(n, d_in)}
        return args, {}, (), lambda a: ref.gelu_forward(a["x"])
    if op == "gelu_backward":
        args = {"dy": arr(n, d_in), "x": arr(n, d_in)}
        return args, {}, (), lambda a: ref.gelu_backward(a["dy"], a["x"])
    if op == "layer_norm_forward":
        args = {"x": arr(n, d_in), "weight": arr(d_in)}
        kw = {"bias": arr(d_in) if rng.random() < 0.5 else None}
        return args, kw, (), lambda a: ref.layer_norm_forward(a["x"], a["weight"], kw["bias"])
    if op == "adam_step":
        args = {"param": arr(n, d_in), "grad": arr(n, d_in), "m": arr(n, d_in),
                "v": np.abs(arr(n, d_in))}
        kw = {"step": int(rng.integers(1, 100)), "lr": float(rng.uniform(0, 0.1)),
              "weight_decay": float(rng.choice([0.0, 0.01])), "decoupled": bool(rng.random() < .5)}

        def twin(a):
            p, m, v = (a[k].astype(np.float64) for k in ("param", "m", "v"))
            ref.adam_step(p, a["grad"].astype(np.float64), m, v, **kw)
            return p, m, v

        return args, kw, ("param", "m", "v"), twin
    raise AssertionError(op)


OPS = ["linear_forward", "linear_backward", "merge", "unmerge", "dense_forward",
       "dense_backward", "gelu_forward", "gelu_backward", "layer_norm_forward", "adam_step",
       "mixed_forward", "dora_norm", "im2col", "col2im"]
SPOILS = ["none", "none", "none", "dtype", "shape", "strided", "alias", "readonly", "nonfinite",
          "huge", "not_array", "scalar"]


GEMM_OPS = ("linear_forward", "linear_backward", "merge", "unmerge", "dense_forward",
            "dense_backward", "mixed_forward", "dora_norm")


def _spoil(rng, op, kind, args, kw, inplace, dtype):
    """Spoil one argument; returns whether the call must still succeed."""
    name = str(rng.choice(list(args)))
    a = args[name]
    if kind == "none":
        return True
    if kind == "dtype":
        other = np.float64 if dtype == np.float32 else np.float32  # wrong only beside others
        choices = [np.float16, np.int32, np.complex64] + ([other] if len(args) > 1 else [])
        args[name] = a.astype(rng.choice(choices))
        return False
    if kind == "shape":
        if a.ndim == 0:
            return True
        axis = int(rng.integers(a.ndim))
        shape = list(a.shape)
        shape[axis] += 1
        args[name] = rng.standard_normal(shape).astype(dtype)
        return None  # some dims are free (n, or d_out without a bias): refused or computed
    if kind == "strided":  # a view with gaps: fine for inputs (copied), refused in place
        big = np.empty((*a.shape[:-1], 2 * a.shape[-1]) if a.ndim else (2,), dtype)
        view = big[..., ::2] if a.ndim else big[::2][0]
        view[...] = a
        args[name] = view
        return name not in inplace or view.flags.c_contiguous  # size-1 and empty dims are
    if kind == "alias":  # an in-place argument that is also an input
        if not inplace or len(args) < 2:
            return True
        target = str(rng.choice(list(inplace)))
        others = [k for k in args if k != target and args[k].shape == args[target].shape]
        if not others:
            return True
        args[str(rng.choice(others))] = args[target]
        return None if args[target].size == 0 else False  # empty arrays share no memory
    if kind == "readonly":
        a = a.copy()
        a.flags.writeable = False
        args[name] = a
        return name not in inplace
    if kind == "nonfinite":
        if a.size:
            a.flat[int(rng.integers(a.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return None  # may succeed or not; checked for no crash and no damage
    if kind == "huge":  # past BLAS's int: the GEMM ops must refuse before allocating
        if op not in GEMM_OPS or 0 in a.shape:
            return True
        shape = list(a.shape) or [1]
        shape[int(rng.integers(len(shape)))] = 2**31 + 3
        args[name] = np.broadcast_to(np.zeros((), dtype), shape)
        return False
    if kind == "not_array":
        args[name] = a.tolist()
        return False
    if kind == "scalar":
        key = str(rng.choice(["scale", "lr", "step", "weight_decay"]))
        if key in kw:
            kw[key] = rng.choice([np.nan, np.inf, 2**70, "x", None, 1e39])
            return None
        return True
    raise AssertionError(kind)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    bad = ~np.isfinite(want)
    np.testing.assert_array_equal(~np.isfinite(got[bad]), True)
    ok = ~bad
    scale = max(1.0, float(np.abs(want[ok]).max(initial=0.0)))
    assert np.abs(got[ok] - want[ok]).max(initial=0.0) <= RTOL[dtype] * scale * 10


def _call(op, args, kw):
    fn = getattr(F, op)
    if op in ("merge", "unmerge", "dora_norm"):
        return fn(args["weight"], args["A"], args["B"], kw["scale"])
    if op == "adam_step":
        return fn(args["param"], args["grad"], args["m"], args["v"], **kw)
    if op == "linear_forward":
        return fn(args["x"], args["weight"], args["A"], args["B"], kw["scale"], kw["bias"])
    if op == "mixed_forward":
        return fn(args["x"], args["weight"], [args["A0"], args["A1"]], [args["B0"], args["B1"]],
                  kw["scales"], kw["adapter_ids"])
    if op == "linear_backward":
        return fn(args["dy"], args["x"], args["xa"], args["weight"], args["A"], args["B"],
                  kw["scale"])
    return fn(*args.values(), **kw)


def _snapshot(args, kw):
    arrays = [v for v in (*args.values(), *kw.values()) if isinstance(v, np.ndarray)]
    return [(a, a.copy()) for a in arrays if a.size < 10**6]  # a huge view is a zero-stride one


def test_fuzz_the_c_boundary():
    rng = np.random.default_rng(SEED)
    counts = {"ok": 0, "refused": 0}
    for i in range(CALLS):
        op = str(rng.choice(OPS))
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        args, kw, inplace, twin = _case(rng, op, dtype)
        valid_args = {k: v.copy() for k, v in args.items()}
        kind = str(rng.choice(SPOILS))
        must_succeed = _spoil(rng, op, kind, args, kw, inplace, dtype)
        before = _snapshot(args, kw)
        where = f"call {i}: {op} {np.dtype(dtype).name} spoil={kind}"
        try:
            out = _call(op, args, kw)
        except ALLOWED:
            assert must_succeed is not True, where
            for a, copy in before:  # a refused call touches nothing
                np.testing.assert_array_equal(a, copy, err_msg=where)
            counts["refused"] += 1
            continue
        assert must_succeed is not False, where
        counts["ok"] += 1
        for a, copy in before:
            if not any(a is args[k] for k in inplace):
                np.testing.assert_array_equal(a, copy, err_msg=where)
        if kind in ("nonfinite", "scalar", "shape"):
            continue
        want = twin(valid_args)
        if inplace:
            got = [args[k] for k in inplace]
            want = [valid_args[k] for k in inplace] if op in ("merge", "unmerge") else want
        else:
            got = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
            want = [w for w in (want if isinstance(want, tuple) else (want,)) if w is not None]
            if op == "layer_norm_forward":
                got, want = got[:1], want[:1]
        assert len(got) == len(want), where
        for g, w in zip(got, want, strict=True):
            _close(g, w, dtype)
    assert counts["ok"] > CALLS // 4 and counts["refused"] > CALLS // 10, counts


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_repeated_calls_leak_neither_references_nor_memory():
    """Every operation, valid and refused, 3,000 times over: the arguments' reference counts
    end where they started and resident memory stays flat (a leaked 1 KiB scratch or output
    per call would show as 3 MB)."""
    import sys

    rng = np.random.default_rng(1)
    cases = []
    for op in OPS:
        for dtype in (np.float32, np.float64):
            args, kw, inplace, _ = _case(rng, op, dtype)
            bad = dict(args)
            bad[next(iter(bad))] = next(iter(args.values())).astype(np.int32)  # refused
            cases.append((op, args, kw, bad))

    def run(times):
        for _ in range(times):
            for op, args, kw, bad in cases:
                _call(op, args, kw)
                try:
                    _call(op, bad, kw)
                except ALLOWED:
                    pass

    run(200)  # warm up: the kept scratch, the thread pool, NumPy's caches
    refs = [sys.getrefcount(a) for _, args, _, _ in cases for a in args.values()]
    rss = _rss_kib()
    run(3000)
    assert [sys.getrefcount(a) for _, args, _, _ in cases for a in args.values()] == refs
    assert _rss_kib() - rss < 2048, f"RSS grew by {_rss_kib() - rss} KiB"
