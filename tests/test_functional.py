"""The C kernels (lora.functional) against their NumPy twins (lora._reference), finite
differences and, when installed, torch.optim. Bad input lives in test_functional_errors.py."""

import os

import numpy as np
import pytest

from gradcheck import numeric_gradient
from lora import _reference as ref
from lora import functional as F

DTYPES = [np.float32, np.float64]
# Per-dtype tolerance relative to the size of the result.
RTOL = {np.float32: 2e-5, np.float64: 1e-12}

# (leading dims of x, d_in, d_out, r): r = 1, n = 1, n = 0, d_in != d_out, odd sizes,
# leading batch dims, and one size past the dropout tile (64 rows).
SHAPES = [
    ((1,), 8, 8, 1),
    ((5,), 7, 13, 3),
    ((0,), 6, 5, 2),
    ((2, 3), 17, 9, 4),
    ((3, 1, 4), 5, 11, 1),
    ((131,), 33, 19, 8),
    ((), 12, 10, 2),  # x of shape (d_in,): one token without a batch dim
    ((9,), 40, 70, 33),  # r past the tiled kernels: the GEMM path
    ((2, 300), 37, 45, 5),  # enough rows for the backward to split them over two threads
    ((1030,), 20, 70, 31),
]


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def close(got, want, dtype):
    want = np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL[dtype] * scale * 10)


def layer(rng, lead, d_in, d_out, r, dtype):
    return dict(
        x=rand(rng, (*lead, d_in), dtype),
        weight=rand(rng, (d_out, d_in), dtype),
        A=rand(rng, (r, d_in), dtype),
        B=rand(rng, (d_out, r), dtype),
        bias=rand(rng, (d_out,), dtype),
    )


def as64(d):
    return {k: v.astype(np.float64) for k, v in d.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,r", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_backward_match_twin(dtype, lead, d_in, d_out, r, dropout, with_bias):
    rng = np.random.default_rng(0)
    t = layer(rng, lead, d_in, d_out, r, dtype)
    bias = t["bias"] if with_bias else None
    seed = 1234 if dropout else None
    y, xa = F.linear_forward(t["x"], t["weight"], t["A"], t["B"], 0.7, bias,
                             dropout=dropout, seed=seed)
    t64 = as64(t)
    y_ref, xa_ref = ref.linear_forward(t64["x"], t64["weight"], t64["A"], t64["B"], 0.7,
                                       t64["bias"] if with_bias else None,
                                       dropout=dropout, seed=seed)
    assert y.shape == (*lead, d_out) and xa.shape == (*lead, r)
    assert y.dtype == dtype and xa.dtype == dtype
    close(y, y_ref, dtype)
    close(xa, xa_ref, dtype)

    dy = rand(rng, y.shape, dtype)
    dx, dA, dB = F.linear_backward(dy, t["x"], xa, t["weight"], t["A"], t["B"], 0.7,
                                   dropout=dropout, seed=seed)
    dx_ref, dA_ref, dB_ref = ref.linear_backward(dy.astype(np.float64), t64["x"], xa_ref,
                                                 t64["weight"], t64["A"], t64["B"], 0.7,
                                                 dropout=dropout, seed=seed)
    assert dx.shape == t["x"].shape and dA.shape == (r, d_in) and dB.shape == (d_out, r)
    close(dx, dx_ref, dtype)
    close(dA, dA_ref, dtype)
    close(dB, dB_ref, dtype)

    none, dA2, dB2 = F.linear_backward(dy, t["x"], xa, t["weight"], t["A"], t["B"], 0.7,
                                       need_dx=False, dropout=dropout, seed=seed)
    assert none is None
    np.testing.assert_array_equal(dA2, dA)
    np.testing.assert_array_equal(dB2, dB)


def test_dropout_mask_statistics_and_determinism():
    rng = np.random.default_rng(1)
    x = np.ones((300, 200))
    W, A, B = np.zeros((3, 200)), np.eye(200)[:1], np.zeros((3, 1))
    _, xa1 = F.linear_forward(x, W, A, B, 1.0, dropout=0.25, seed=5)
    _, xa2 = F.linear_forward(x, W, A, B, 1.0, dropout=0.25, seed=5)
    _, xa3 = F.linear_forward(x, W, A, B, 1.0, dropout=0.25, seed=6)
    np.testing.assert_array_equal(xa1, xa2)
    assert not np.array_equal(xa1, xa3)
    kept = ref.dropout_mask(5, 300, 200, 0.25)
    assert abs(kept.mean() - 0.75) < 0.01
    # xa[:, 0] is the dropped, rescaled first column of x.
    np.testing.assert_allclose(xa1[:, 0], np.where(kept[:, 0], 1 / 0.75, 0.0))
    # Rows and columns are not correlated: masks of different rows differ.
    assert len({kept[i].tobytes() for i in range(50)}) == 50
    del rng


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("lead", [(1,), (6,), (2, 3)])
def test_gradients_match_finite_differences(dropout, lead):
    rng = np.random.default_rng(2)
    t = layer(rng, lead, 7, 5, 3, np.float64)
    proj = rng.standard_normal((*lead, 5))
    seed = 99 if dropout else None
    scale = 1.3

    def loss():
        y, _ = F.linear_forward(t["x"], t["weight"], t["A"], t["B"], scale, t["bias"],
                                dropout=dropout, seed=seed)
        return float(np.sum(y * proj))

    _, xa = F.linear_forward(t["x"], t["weight"], t["A"], t["B"], scale, t["bias"],
                             dropout=dropout, seed=seed)
    dx, dA, dB = F.linear_backward(proj, t["x"], xa, t["weight"], t["A"], t["B"], scale,
                                   dropout=dropout, seed=seed)
    for name, grad in (("x", dx), ("A", dA), ("B", dB)):
        num = numeric_gradient(loss, t[name])
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_out,d_in,r", [(8, 8, 1), (13, 7, 3), (33, 65, 8), (40, 24, 9),
                                          (20, 70, 32), (50, 30, 40)])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_matches_twin_and_unmerge_restores(dtype, d_out, d_in, r, fan_in_fan_out):
    rng = np.random.default_rng(3)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    W = rand(rng, shape, dtype)
    A, B = rand(rng, (r, d_in), dtype), rand(rng, (d_out, r), dtype)
    W0 = W.copy()
    out = F.merge(W, A, B, 0.25, fan_in_fan_out=fan_in_fan_out)
    assert out is W
    want = ref.merge(W0.astype(np.float64), A.astype(np.float64), B.astype(np.float64), 0.25,
                     fan_in_fan_out=fan_in_fan_out)
    close(W, want, dtype)
    F.unmerge(W, A, B, 0.25, fan_in_fan_out=fan_in_fan_out)
    close(W, W0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out", [((1,), 9, 4), ((0,), 3, 5), ((4, 5), 6, 7),
                                             ((70,), 31, 2)])
def test_dense_matches_twin(dtype, lead, d_in, d_out):
    rng = np.random.default_rng(4)
    x, W, b = rand(rng, (*lead, d_in), dtype), rand(rng, (d_out, d_in), dtype), rand(
        rng, (d_out,), dtype)
    close(F.dense_forward(x, W, b), ref.dense_forward(x.astype(float), W.astype(float),
                                                      b.astype(float)), dtype)
    close(F.dense_forward(x, W), ref.dense_forward(x.astype(float), W.astype(float)), dtype)
    dy = rand(rng, (*lead, d_out), dtype)
    dx, dW = F.dense_backward(dy, x, W)
    dx_ref, dW_ref = ref.dense_backward(dy.astype(float), x.astype(float), W.astype(float))
    close(dx, dx_ref, dtype)
    close(dW, dW_ref, dtype)
    assert F.dense_backward(dy, x, W, need_dx=False)[0] is None
    assert F.dense_backward(dy, x, W, need_dweight=False)[1] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,r", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_residual_and_add_dx_to_match_twin(dtype, lead, d_in, d_out, r, dropout, fan_in_fan_out):
    """residual= adds a skip connection to y; add_dx_to= adds dx into a given array in place
    and returns that array. Every path of the kernels: one row (gemv), the tiled rank-r
    kernels, the GEMM path (r = 33), the threaded row pass (n >= 1024), dropout."""
    rng = np.random.default_rng(12)
    t = layer(rng, lead, d_in, d_out, r, dtype)
    W = np.ascontiguousarray(t["weight"].T) if fan_in_fan_out else t["weight"]
    seed = 99 if dropout else None
    t64 = as64(t)
    res = rand(rng, (*lead, d_out), dtype)
    y, xa = F.linear_forward(t["x"], W, t["A"], t["B"], 0.7, t["bias"], dropout=dropout, seed=seed,
                             fan_in_fan_out=fan_in_fan_out, residual=res)
    y_ref, xa_ref = ref.linear_forward(t64["x"], t64["weight"], t64["A"], t64["B"], 0.7,
                                       t64["bias"], dropout=dropout, seed=seed)
    close(y, y_ref + res, dtype)
    y0, _ = F.linear_forward(t["x"], W, t["A"], t["B"], 0.7, None, dropout=dropout, seed=seed,
                             fan_in_fan_out=fan_in_fan_out, residual=res)
    close(y0, y_ref - t64["bias"] + res, dtype)
    close(F.dense_forward(t["x"], W, t["bias"], fan_in_fan_out=fan_in_fan_out, residual=res),
          ref.dense_forward(t64["x"], t64["weight"], t64["bias"]) + res, dtype)

    dy = rand(rng, y.shape, dtype)
    acc = rand(rng, t["x"].shape, dtype)
    acc0 = acc.astype(np.float64)
    dx, dA, dB = F.linear_backward(dy, t["x"], xa, W, t["A"], t["B"], 0.7, dropout=dropout,
                                   seed=seed, fan_in_fan_out=fan_in_fan_out, add_dx_to=acc)
    dx_ref, dA_ref, dB_ref = ref.linear_backward(dy.astype(np.float64), t64["x"], xa_ref,
                                                 t64["weight"], t64["A"], t64["B"], 0.7,
                                                 dropout=dropout, seed=seed)
    assert dx is acc
    close(acc, dx_ref + acc0, dtype)
    close(dA, dA_ref, dtype)
    close(dB, dB_ref, dtype)
    acc = rand(rng, t["x"].shape, dtype)
    acc0 = acc.astype(np.float64)
    dx, dW = F.dense_backward(dy, t["x"], W, fan_in_fan_out=fan_in_fan_out, add_dx_to=acc)
    dx_dense, dW_ref = ref.dense_backward(dy.astype(np.float64), t64["x"], t64["weight"])
    assert dx is acc
    close(acc, dx_dense + acc0, dtype)
    close(dW.T if fan_in_fan_out else dW, dW_ref, dtype)


def adam_trajectory(step_fn, dtype, decoupled, weight_decay, steps=100, shape=(37, 5)):
    rng = np.random.default_rng(5)
    p = rng.standard_normal(shape).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    originals = [g.copy() for g in grads]
    for t, g in enumerate(grads, start=1):
        step_fn(p, g, m, v, step=t, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                weight_decay=weight_decay, decoupled=decoupled)
    # The gradient is read only, also for Adam's L2 term.
    for g, g0 in zip(grads, originals, strict=True):
        np.testing.assert_array_equal(g, g0)
    return p, m, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_twin_over_many_steps(dtype, decoupled, weight_decay):
    p, m, v = adam_trajectory(F.adam_step, dtype, decoupled, weight_decay)
    p_ref, m_ref, v_ref = adam_trajectory(ref.adam_step, np.float64, decoupled, weight_decay)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(p, p_ref, atol=tol)
    np.testing.assert_allclose(m, m_ref, atol=tol)
    np.testing.assert_allclose(v, v_ref, atol=tol)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_torch_optim(decoupled, weight_decay):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    p0 = rng.standard_normal((64, 9)).astype(np.float32)
    grads = [rng.standard_normal(p0.shape).astype(np.float32) for _ in range(50)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
              foreach=False)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        F.adam_step(p, g, m, v, step=t, lr=3e-3, weight_decay=weight_decay, decoupled=decoupled)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=1e-6)
    state = opt.state[tp]
    np.testing.assert_allclose(m, state["exp_avg"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), rtol=0, atol=1e-6)


def test_noncontiguous_read_only_inputs_are_accepted():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 20))[:, ::2]  # strided view
    W = np.asfortranarray(rng.standard_normal((4, 10)))
    A = rng.standard_normal((10, 2)).T  # transposed view, (2, 10)
    B = rng.standard_normal((4, 2)).astype(">f8")  # byte-swapped
    y, xa = F.linear_forward(x, W, A, B, 0.5)
    y_ref, xa_ref = ref.linear_forward(x, W, A, B.astype(float), 0.5)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(xa, xa_ref, atol=1e-12)


def test_gil_is_released_during_kernels():
    """A Python thread keeps running while a long kernel call is in C."""
    import threading
    import time

    W = np.zeros((3000, 3000), dtype=np.float32)
    A = np.ones((8, 3000), dtype=np.float32)
    B = np.ones((3000, 8), dtype=np.float32)
    stamps, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(20):
        F.merge(W, A, B, 1e-3)
    t1 = time.perf_counter()
    stop.set()
    th.join()
    inside = [s for s in stamps if t0 < s < t1]
    # With the GIL held for the whole of each call, the spinning thread could only run
    # between calls; released, it records samples throughout.
    assert len(inside) > 1000, (len(inside), t1 - t0)


def _threaded_work(rng_seed=0):
    """Calls that split over lora's threads and OpenBLAS's: a GEMM, GELU, a LoRA forward and
    backward with the threaded row pass (n >= 1024)."""
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((1100, 256)).astype(np.float32)
    W = rng.standard_normal((384, 256)).astype(np.float32)
    A = rng.standard_normal((8, 256)).astype(np.float32)
    B = rng.standard_normal((384, 8)).astype(np.float32)
    big = rng.standard_normal(1 << 19).astype(np.float32)

    def run():
        y, xa = F.linear_forward(x, W, A, B, 0.5)
        dx, dA, dB = F.linear_backward(y, x, xa, W, A, B, 0.5)
        return [F.dense_forward(x, W), F.gelu_forward(big), y, dx, dA, dB]

    return run


def test_kernels_called_from_many_threads_at_once_agree():
    """Four Python threads calling threaded kernels at once: one dispatch holds lora's thread
    pool (which also runs OpenBLAS's jobs), the others start threads of their own; every
    result is the one a lone call gives, to the bit."""
    import threading

    run = _threaded_work()
    want = run()
    got, errors = [], []

    def worker():
        try:
            for _ in range(5):
                got.append(run())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(got) == 20
    for res in got:
        for a, b in zip(res, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_scratch_kept_between_calls_serves_any_size_and_thread():
    """The kernels' scratch outlives a call (module.c, take_scratch): requests that grow and
    shrink, two at once (a packed weight's call holds two), in both dtypes, with and without
    dropout, from one thread and then from three at once, give what they give alone."""
    import threading

    rng = np.random.default_rng(11)
    calls = []
    for dtype in (np.float32, np.float64):
        W = rng.standard_normal((96, 80)).astype(dtype)
        A = rng.standard_normal((6, 80)).astype(dtype)
        B = rng.standard_normal((96, 6)).astype(dtype)
        pw = F.PackedWeight(W)
        for n in (3, 700, 40, 1500, 1, 300):
            x = rng.standard_normal((n, 80)).astype(dtype)
            for w, p in ((W, 0.0), (pw, 0.0), (W, 0.25), (pw, 0.25)):
                calls.append((x, w, A, B, p))

    def run(order):
        out = {}
        for i in order:
            x, w, A, B, p = calls[i]
            y, xa = F.linear_forward(x, w, A, B, 0.5, dropout=p, seed=i)
            out[i] = (y, xa) + F.linear_backward(y, x, xa, w, A, B, 0.5, dropout=p, seed=i)
        return out

    want = run(range(len(calls)))
    orders = [list(range(len(calls))), list(reversed(range(len(calls)))),
              list(range(0, len(calls), 2)) + list(range(1, len(calls), 2))]
    got, errors = [None] * 3, []

    def worker(k):
        try:
            got[k] = run(orders[k])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for out in got + [run(orders[1])]:
        for i, res in out.items():
            for a, b in zip(res, want[i], strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threaded_kernels_work_in_a_forked_child():
    """A child forked after the thread pool ran starts a pool of its own: its threaded calls
    finish and agree with the parent's (a pool inherited as it was would hang the child)."""
    import select

    run = _threaded_work(1)
    want = run()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        ok = False
        try:
            ok = all(np.array_equal(a, b) for a, b in zip(run(), want, strict=True))
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        if not ready:
            os.kill(pid, 9)
            pytest.fail("the forked child hung in a threaded kernel")
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_blas_info_and_threads():
    info = F.blas_info()
    assert isinstance(info["corename"], str) and info["corename"]
    before = info["num_threads"]
    F.set_num_threads(1)
    assert F.blas_info()["num_threads"] == 1
    F.set_num_threads(before)
    with pytest.raises(ValueError, match="'n'"):
        F.set_num_threads(0)


@pytest.mark.parametrize("offset", range(0, 64, 4))
def test_merge_at_every_alignment(offset):
    """The tuned kernels start their vector tiles at a cache-line boundary of W: every
    offset of W within a cache line gives the same result as the twin."""
    rng = np.random.default_rng(offset)
    d_out, d_in, r = 37, 64, 5
    buf = np.zeros(d_out * d_in + 32, np.float32)
    start = ((-buf.ctypes.data + offset) % 64) // 4
    W = buf[start:start + d_out * d_in].reshape(d_out, d_in)
    assert W.ctypes.data % 64 == offset
    W[...] = rng.standard_normal(W.shape)
    A, B = rand(rng, (r, d_in), np.float32), rand(rng, (d_out, r), np.float32)
    want = ref.merge(W.astype(np.float64), A.astype(np.float64), B.astype(np.float64), 0.5)
    F.merge(W, A, B, 0.5)
    close(W, want, np.float32)
    x = rand(rng, (9, d_in), np.float32)
    y, _ = F.linear_forward(x, np.ascontiguousarray(W[:, :d_in]), A, B, 0.5)
    y_ref, _ = ref.linear_forward(x.astype(np.float64), W.astype(np.float64),
                                  A.astype(np.float64), B.astype(np.float64), 0.5)
    close(y, y_ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_twin_and_torch(dtype):
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_normal(5000) * 3, np.linspace(-12, 12, 2001),
                        [0.0, -0.0, 1e-30, 40.0, -40.0, 7.0, -7.0]]).astype(dtype).reshape(-1, 8)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, dx = F.gelu_forward(x), F.gelu_backward(dy, x)
    y_ref = ref.gelu_forward(x.astype(np.float64))
    dx_ref = ref.gelu_backward(dy.astype(np.float64), x.astype(np.float64))
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    # float32: Phi to 1.2e-7 absolute, so |error| <= ~1.2e-7 |x| + rounding.
    tol = 1e-12 if dtype == np.float64 else 2e-7
    np.testing.assert_allclose(y, y_ref, rtol=tol * 4, atol=tol * (1 + np.abs(x)).max() / 8)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol * 4, atol=tol * 10)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).requires_grad_(True)
    torch.nn.functional.gelu(t).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_portable_gelu_loop_matches_twin(tmp_path):
    """The portable float32 GELU loop, which CPUs without AVX-512 run: forced on this machine
    by LORA_PORTABLE_GELU=1 in a child process, held to the twin like the default path."""
    import subprocess
    import sys

    rng = np.random.default_rng(10)
    x = np.concatenate([rng.standard_normal(5000) * 3, np.linspace(-12, 12, 2001),
                        [0.0, -0.0, 1e-30, 40.0, -40.0, 7.0, -7.0]]).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "dy.npy", dy)
    code = (
        "import sys, numpy as np\n"
        "from lora import functional as F\n"
        "d = sys.argv[1]\n"
        "x, dy = np.load(d + '/x.npy'), np.load(d + '/dy.npy')\n"
        "np.save(d + '/y.npy', F.gelu_forward(x))\n"
        "np.save(d + '/dx.npy', F.gelu_backward(dy, x))\n"
    )
    env = {**os.environ, "LORA_PORTABLE_GELU": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True, timeout=120)
    y, dx = np.load(tmp_path / "y.npy"), np.load(tmp_path / "dx.npy")
    tol = 2e-7
    np.testing.assert_allclose(y, ref.gelu_forward(x.astype(np.float64)), rtol=tol * 4,
                               atol=tol * (1 + np.abs(x)).max() / 8)
    np.testing.assert_allclose(dx, ref.gelu_backward(dy.astype(np.float64), x.astype(np.float64)),
                               rtol=tol * 4, atol=tol * 10)


_GELU_RANGE_CODE = """
import sys, numpy as np
from lora import functional as F
x = np.concatenate([-np.logspace(-30, 38.5, 3000), np.logspace(-30, 38.5, 3000),
                    np.linspace(-20, 20, 4001), [0.0, -0.0]]).astype(np.float32)
np.save(sys.argv[1] + "/x.npy", x)
np.save(sys.argv[1] + "/y.npy", F.gelu_forward(x))
np.save(sys.argv[1] + "/dx.npy", F.gelu_backward(np.ones_like(x), x))
"""


@pytest.mark.parametrize("portable", [False, True], ids=["default", "portable"])
def test_gelu_whole_float32_range(tmp_path, portable):
    """Every magnitude float32 holds, on both float32 paths, against float64 GELU: within
    3e-7 min(|x|, 6) of max(1, |value|), and exactly 0 where float64's result is below
    float32's range (GELU(-1e30) is -0, its gradient 0, not x times a clamped Phi)."""
    import subprocess
    import sys

    env = {**os.environ, "LORA_PORTABLE_GELU": "1" if portable else "0"}
    subprocess.run([sys.executable, "-c", _GELU_RANGE_CODE, str(tmp_path)], env=env,
                   check=True, timeout=120)
    x = np.load(tmp_path / "x.npy").astype(np.float64)
    y, dx = np.load(tmp_path / "y.npy"), np.load(tmp_path / "dx.npy")
    with np.errstate(over="ignore", invalid="ignore"):
        y_ref = ref.gelu_forward(x)
        dx_ref = ref.gelu_backward(np.ones_like(x), x)
    # Phi's fit is good to 1.2e-7 absolute (csrc/kernels/elementwise.c), which x multiplies
    # where Phi is not yet saturated (|x| < 6)
    allowed = 3e-7 * np.clip(np.abs(x), 1, 6)
    for got, want in ((y, y_ref), (dx, dx_ref)):
        assert np.isfinite(got).all()
        err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
        worst = np.argmax(err / allowed)
        assert np.all(err <= allowed), (x[worst], got[worst], want[worst])
        tiny = np.abs(want) < 1e-38
        assert np.all(np.abs(got[tiny]) < 1e-37), x[tiny][np.abs(got[tiny]) >= 1e-37][:5]


def test_gelu_bad_input():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="gelu_forward: argument 'x'"):
        F.gelu_forward(x.astype(np.int64))
    with pytest.raises(ValueError, match="gelu_backward: argument 'x' must have shape"):
        F.gelu_backward(x, x[:, :3])
    with pytest.raises(TypeError, match="gelu_backward: argument 'x' must have dtype float32"):
        F.gelu_backward(x, x.astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", [((5,), 7), ((2, 3), 384), ((0,), 4), ((), 33), ((4,), 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_twin_and_finite_differences(dtype, lead, d, with_bias):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((*lead, d)) * 3 + 1).astype(dtype)
    w, b = rand(rng, (d,), dtype), rand(rng, (d,), dtype) if with_bias else None
    y, mean, rstd = F.layer_norm_forward(x, w, b, eps=1e-5)

    def as64(a):
        return None if a is None else a.astype(np.float64)

    y_ref, mean_ref, rstd_ref = ref.layer_norm_forward(as64(x), as64(w), as64(b), eps=1e-5)
    assert y.shape == x.shape and mean.shape == lead and y.dtype == dtype
    close(y, y_ref, dtype)
    close(mean, mean_ref, dtype)
    close(rstd, rstd_ref, dtype)
    dy = rand(rng, x.shape, dtype)
    dx, dw, db = F.layer_norm_backward(dy, x, mean, rstd, w, need_dbias=with_bias)
    dx_ref, dw_ref, db_ref = ref.layer_norm_backward(as64(dy), as64(x), mean_ref, rstd_ref,
                                                     as64(w))
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    if with_bias:
        close(db, db_ref, dtype)
    else:
        assert db is None
    if dtype == np.float64 and x.size and d > 1:
        x64 = x.copy()

        def loss():
            return float(np.sum(F.layer_norm_forward(x64, w, b)[0] * dy))

        np.testing.assert_allclose(dx, numeric_gradient(loss, x64), rtol=1e-5, atol=1e-6)


def test_layer_norm_bad_input():
    x, w = np.zeros((3, 4), np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="layer_norm_forward: argument 'weight' must have shape"):
        F.layer_norm_forward(x, w[:3])
    with pytest.raises(ValueError, match="layer_norm_forward: argument 'eps'"):
        F.layer_norm_forward(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="layer_norm_forward: argument 'bias' must have dtype"):
        F.layer_norm_forward(x, w, np.zeros(4))
    y, mean, rstd = F.layer_norm_forward(x, w)
    with pytest.raises(ValueError, match="layer_norm_backward: argument 'rstd' must have shape"):
        F.layer_norm_backward(y, x, mean, rstd[:2], w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 1030])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fan_in_fan_out_reads_the_transposed_weight_in_place(dtype, n, dropout):
    """weight stored (d_in, d_out), GPT-2's Conv1D: the same results as the (d_out, d_in) call,
    through gemv (n = 1), GEMMs, and the backward's row pass (n >= 1024)."""
    rng = np.random.default_rng(11)
    t = layer(rng, (n,), 24, 40, 4, dtype)
    wt = np.ascontiguousarray(t["weight"].T)
    seed = 5 if dropout else None
    kw = dict(dropout=dropout, seed=seed)
    y, xa = F.linear_forward(t["x"], t["weight"], t["A"], t["B"], 0.7, t["bias"], **kw)
    y2, xa2 = F.linear_forward(t["x"], wt, t["A"], t["B"], 0.7, t["bias"], fan_in_fan_out=True,
                               **kw)
    close(y2, y, dtype)
    np.testing.assert_array_equal(xa2, xa)
    dy = rand(rng, y.shape, dtype)
    ref_grads = F.linear_backward(dy, t["x"], xa, t["weight"], t["A"], t["B"], 0.7, **kw)
    grads = F.linear_backward(dy, t["x"], xa, wt, t["A"], t["B"], 0.7, fan_in_fan_out=True, **kw)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        close(g, g_ref, dtype)
    close(F.dense_forward(t["x"], wt, t["bias"], fan_in_fan_out=True),
          F.dense_forward(t["x"], t["weight"], t["bias"]), dtype)
    dx, dw = F.dense_backward(dy, t["x"], wt, fan_in_fan_out=True)
    dx_ref, dw_ref = F.dense_backward(dy, t["x"], t["weight"])
    assert dw.shape == wt.shape
    close(dx, dx_ref, dtype)
    close(dw, dw_ref.T, dtype)
    # an untransposed weight: d_in is then read as 40, which A's shape contradicts
    with pytest.raises(ValueError, match=r"linear_forward: argument 'A' .* = \(4, 40\)"):
        F.linear_forward(t["x"], t["weight"], t["A"], t["B"], 0.7, fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"dense_forward: argument 'x'"):
        F.dense_forward(t["x"], t["weight"], fan_in_fan_out=True)
