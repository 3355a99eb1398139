"""The Llama-family kernels of lora.functional (rms_norm, rope, swiglu, causal GQA attention)
against their NumPy twins in lora._reference, finite differences, torch, and bad input."""

import numpy as np
import pytest
from gradcheck import numeric_gradient

from lora import _reference as ref
from lora import functional as F

DTYPES = [np.float32, np.float64]


def close(a, b, dtype, scale=1.0):
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * scale)


def as64(*arrays):
    return [a.astype(np.float64) for a in arrays]


# ------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d", [((5,), 16), ((2, 3), 7), ((1,), 1), ((0,), 4), ((), 33),
                                    ((3, 70), 130)])
def test_rms_norm_matches_twin(dtype, lead, d):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal(lead + (d,))).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    y, rstd = F.rms_norm_forward(x, w, eps=1e-5)
    y_ref, rstd_ref = ref.rms_norm_forward(*as64(x, w), eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape and rstd.shape == lead
    close(y, y_ref, dtype, 10)
    close(rstd, rstd_ref, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw = F.rms_norm_backward(dy, x, rstd, w)
    dx_ref, dw_ref = ref.rms_norm_backward(*as64(dy, x), rstd_ref, w.astype(np.float64))
    close(dx, dx_ref, dtype, 10)
    close(dw, dw_ref, dtype, 10 * max(1, np.prod(lead)))
    dx2, none = F.rms_norm_backward(dy, x, rstd, w, need_dweight=False)
    assert none is None and np.array_equal(dx, dx2)


def test_rms_norm_matches_torch_and_finite_differences():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 6)), rng.standard_normal(6)
    y, rstd = F.rms_norm_forward(x, w, eps=1e-6)
    want = torch.nn.functional.rms_norm(torch.from_numpy(x), (6,), torch.from_numpy(w), 1e-6)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-12, atol=1e-14)
    dy = rng.standard_normal(x.shape)
    dx, dw = F.rms_norm_backward(dy, x, rstd, w)

    def f():
        return float((F.rms_norm_forward(x, w, eps=1e-6)[0] * dy).sum())

    np.testing.assert_allclose(dx, numeric_gradient(f, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numeric_gradient(f, w), rtol=1e-6, atol=1e-8)


def test_rms_norm_bad_input():
    x, w = np.ones((2, 4)), np.ones(4)
    with pytest.raises(ValueError, match="'weight' must have shape"):
        F.rms_norm_forward(x, np.ones(3))
    with pytest.raises(TypeError, match="'weight'"):
        F.rms_norm_forward(x, w.astype(np.float32))
    with pytest.raises(ValueError, match="eps"):
        F.rms_norm_forward(x, w, eps=-1.0)
    y, rstd = F.rms_norm_forward(x, w)
    with pytest.raises(ValueError, match="'rstd'"):
        F.rms_norm_backward(x, x, rstd[:1], w)


# ------------------------------------------------------------------ RoPE


def tables(rng, shape, dtype):
    """cos/sin of random angles, halves equal, as every RoPE table has."""
    ang = rng.uniform(-10, 10, shape[:-1] + (shape[-1] // 2,))
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,heads,d,per_item", [
    (2, 5, 3, 8, False), (2, 5, 3, 8, True), (1, 1, 1, 2, False), (3, 7, 2, 6, True),
    (0, 4, 2, 4, False), (2, 130, 4, 64, False)])
def test_rope_matches_twin_in_place(dtype, b, s, heads, d, per_item):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, s, heads * d)).astype(dtype)
    cos, sin = tables(rng, ((b,) if per_item else ()) + (s, d), dtype)
    want = ref.rope_forward(*as64(x, cos, sin), heads)
    x0 = x.copy()
    out = F.rope_forward(x, cos, sin, heads)
    assert out is x  # rotated in place
    close(x, want, dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    g_want = ref.rope_backward(*as64(g, cos, sin), heads)
    F.rope_backward(g, cos, sin, heads)
    close(g, g_want, dtype)
    F.rope_backward(x, cos, sin, heads)  # the inverse rotation: back to x0
    close(x, x0, dtype, 10)


def test_rope_backward_is_the_transpose_and_matches_transformers():
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 4, 12))
    cos, sin = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 6))  # any tables
    rx = F.rope_forward(x.copy(), cos, sin, 2)
    gt = F.rope_backward(g.copy(), cos, sin, 2)
    assert abs((rx * g).sum() - (x * gt).sum()) < 1e-12  # <R x, g> = <x, R^T g>

    def f():
        return float((ref.rope_forward(x, cos, sin, 2) * g).sum())

    np.testing.assert_allclose(gt, numeric_gradient(f, x), rtol=1e-6, atol=1e-8)
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    t = torch.from_numpy(x).reshape(2, 4, 2, 6).transpose(1, 2)
    q, _ = llama.apply_rotary_pos_emb(t, t, torch.from_numpy(cos), torch.from_numpy(sin))
    np.testing.assert_allclose(rx, q.transpose(1, 2).reshape(2, 4, 12).numpy(), rtol=1e-12,
                               atol=1e-13)


def test_rope_bad_input():
    x, cos = np.ones((2, 3, 8)), np.ones((3, 4))
    with pytest.raises(ValueError, match="must be even"):
        F.rope_forward(x, np.ones((3, 8)), np.ones((3, 8)), 8 // 8 * 8)  # head_dim 1
    with pytest.raises(ValueError, match="'cos' must have shape"):
        F.rope_forward(x, np.ones((4, 4)), np.ones((4, 4)), 2)
    with pytest.raises(ValueError, match="'sin'"):
        F.rope_forward(x, cos, np.ones((3, 2)), 2)
    with pytest.raises(ValueError, match="num_heads"):
        F.rope_forward(x, cos, cos, 3)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'x'"):
        F.rope_forward(ro, cos, cos, 2)
    with pytest.raises(ValueError, match="'x'"):
        F.rope_forward(np.ones((2, 3, 16))[:, :, ::2], cos, cos, 2)  # strided: never copied
    with pytest.raises(ValueError, match="shares memory"):
        F.rope_forward(x, x[0, :, :4], cos, 2)
    assert (x == 1).all()  # refused calls leave it unchanged


# ------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 40000), (1,), (0, 3)])
def test_swiglu_matches_twin_and_finite_differences(dtype, shape):
    rng = np.random.default_rng(4)
    gate = (4 * rng.standard_normal(shape)).astype(dtype)
    up = rng.standard_normal(shape).astype(dtype)
    if gate.size:
        gate.reshape(-1)[0] = -95.0  # exp(-g) beyond float32's range
    y = F.swiglu_forward(gate, up)
    close(y, ref.swiglu_forward(*as64(gate, up)), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for got, want in zip(F.swiglu_backward(dy, gate, up),
                         ref.swiglu_backward(*as64(dy, gate, up)), strict=True):
        assert got.dtype == dtype and got.shape == shape
        close(got, want, dtype)
    if dtype == np.float64 and gate.size < 100:
        dg, du = F.swiglu_backward(dy, gate, up)

        def f():
            return float((F.swiglu_forward(gate, up) * dy).sum())

        np.testing.assert_allclose(dg, numeric_gradient(f, gate), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(du, numeric_gradient(f, up), rtol=1e-6, atol=1e-8)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="'up'"):
        F.swiglu_forward(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="'up'"):
        F.swiglu_forward(np.ones(3), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="'gate'"):
        F.swiglu_backward(np.ones(3), np.ones(2), np.ones(3))


# ------------------------------------------------------------------ causal GQA attention


def qkv(rng, b, s, heads, kv, d, dtype):
    return (rng.standard_normal((b, s, heads * d)).astype(dtype),
            rng.standard_normal((b, s, kv * d)).astype(dtype),
            rng.standard_normal((b, s, kv * d)).astype(dtype))


def masks(rng, b, s):
    """None, all ones, left and right padding, scattered, and an item with no key."""
    left = np.ones((b, s), bool)
    left[::2, : s // 2] = False
    right = np.ones((b, s), bool)
    right[1::2, max(1, s // 3):] = False
    scattered = rng.random((b, s)) > 0.3
    empty = scattered.copy()
    empty[-1:] = False
    return [None, np.ones((b, s), np.int64), left, right, scattered, empty]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,heads,kv,d", [
    (2, 5, 4, 2, 8), (1, 1, 1, 1, 4), (3, 9, 3, 3, 3), (2, 17, 6, 2, 2), (2, 150, 3, 1, 16),
    (1, 70, 2, 2, 64), (0, 4, 2, 1, 4), (2, 0, 2, 1, 4)])
def test_causal_attention_matches_twin(dtype, b, s, heads, kv, d):
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, b, s, heads, kv, d, dtype)
    for mask in masks(rng, b, s):
        ctx, lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=mask)
        assert ctx.shape == q.shape and ctx.dtype == dtype and lse.shape == (b, heads, s)
        ctx_ref, lse_ref = ref.causal_attention_forward(*as64(q, k, v), heads, kv, key_mask=mask)
        assert not np.isnan(ctx).any()
        close(ctx, ctx_ref, dtype)
        assert np.array_equal(np.isinf(lse), np.isinf(lse_ref))
        fin = np.isfinite(lse_ref)
        close(lse[fin], lse_ref[fin], dtype, 10)
        dctx = rng.standard_normal(q.shape).astype(dtype)
        grads = F.causal_attention_backward(dctx, q, k, v, ctx, lse, heads, kv, key_mask=mask)
        grads_ref = ref.causal_attention_backward(dctx.astype(np.float64), *as64(q, k, v),
                                                  ctx_ref, lse_ref, heads, kv, key_mask=mask)
        for g, g_ref, like in zip(grads, grads_ref, (q, k, v), strict=True):
            assert g.shape == like.shape and g.dtype == dtype
            close(g, g_ref, dtype, 10)


def test_rows_without_keys_give_zero_and_no_gradient():
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 2, 6, 2, 1, 4, np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    ctx, lse = F.causal_attention_forward(q, k, v, 2, 1, key_mask=mask)
    assert (ctx[0, :2] == 0).all() and (ctx[1] == 0).all() and np.isfinite(ctx).all()
    assert np.isneginf(lse[0, :, :2]).all() and np.isneginf(lse[1]).all()
    assert np.isfinite(lse[0, :, 2:]).all()
    dctx = rng.standard_normal(q.shape).astype(np.float32)
    dq, dk, dv = F.causal_attention_backward(dctx, q, k, v, ctx, lse, 2, 1, key_mask=mask)
    assert (dq[0, :2] == 0).all() and (dk[0, :2] == 0).all() and (dv[0, :2] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # a query sees only keys up to itself: changing the last key changes only the last row
    k2 = k.copy()
    k2[:, -1] += 1
    ctx2, _ = F.causal_attention_forward(q, k2, v, 2, 1, key_mask=mask)
    assert np.array_equal(ctx2[0, :-1], ctx[0, :-1]) and not np.allclose(ctx2[0, -1], ctx[0, -1])


@pytest.mark.parametrize("mask_kind", [0, 2, 5])
def test_causal_attention_gradients_match_finite_differences(mask_kind):
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, 2, 6, 3, 1, 4, np.float64)
    mask = masks(rng, 2, 6)[mask_kind]
    dctx = rng.standard_normal(q.shape)
    ctx, lse = F.causal_attention_forward(q, k, v, 3, 1, key_mask=mask, scale=0.7)
    grads = F.causal_attention_backward(dctx, q, k, v, ctx, lse, 3, 1, key_mask=mask, scale=0.7)

    def f():
        return float((F.causal_attention_forward(q, k, v, 3, 1, key_mask=mask,
                                                 scale=0.7)[0] * dctx).sum())

    for g, arr in zip(grads, (q, k, v), strict=True):
        np.testing.assert_allclose(g, numeric_gradient(f, arr), rtol=1e-6, atol=1e-8)


def test_causal_attention_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    b, s, heads, kv, d = 2, 100, 6, 2, 16
    q, k, v = qkv(rng, b, s, heads, kv, d, np.float32)
    ctx, _ = F.causal_attention_forward(q, k, v, heads, kv)

    def th(a, n):
        return torch.from_numpy(a).reshape(b, s, n, d).transpose(1, 2)

    want = torch.nn.functional.scaled_dot_product_attention(
        th(q, heads), th(k, kv).repeat_interleave(3, 1), th(v, kv).repeat_interleave(3, 1),
        is_causal=True)
    np.testing.assert_allclose(ctx, want.transpose(1, 2).reshape(q.shape).numpy(), atol=2e-6)


def test_causal_attention_bad_input():
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 2, 5, 4, 2, 3, np.float64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        F.causal_attention_forward(q, k, v, 4, 3)
    with pytest.raises(ValueError, match="num_heads"):
        F.causal_attention_forward(q, k, v, 5, 1)
    with pytest.raises(TypeError, match="num_heads"):
        F.causal_attention_forward(q, k, v, 4.0, 2)
    with pytest.raises(ValueError, match="'k' must have shape"):
        F.causal_attention_forward(q, k[:, :4], v, 4, 2)
    with pytest.raises(ValueError, match="'v'"):
        F.causal_attention_forward(q, k, v[..., :3], 4, 2)
    with pytest.raises(TypeError, match="'v'"):
        F.causal_attention_forward(q, k, v.astype(np.float32), 4, 2)
    with pytest.raises(ValueError, match="key_mask"):
        F.causal_attention_forward(q, k, v, 4, 2, key_mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="key_mask"):
        F.causal_attention_forward(q, k, v, 4, 2, key_mask=np.ones((2, 5)))
    ctx, lse = F.causal_attention_forward(q, k, v, 4, 2)
    with pytest.raises(ValueError, match="'lse'"):
        F.causal_attention_backward(ctx, q, k, v, ctx, lse[:, :2], 4, 2)
    with pytest.raises(ValueError, match="'ctx'"):
        F.causal_attention_backward(ctx, q, k, v, ctx[:, :2], lse, 4, 2)


def test_long_sequences_form_no_seq_by_seq_matrix():
    """seq 4096: one head's (seq x seq) float32 scores would be 64 MB; the tiled kernels'
    peak memory (measured in a fresh process) stays far below, forward and backward."""
    import subprocess
    import sys
    code = """if True:
        import resource, numpy as np
        from lora import functional as F
        s, d = 4096, 8
        rng = np.random.default_rng(0)
        q, k, v, g = (rng.standard_normal((1, s, d)).astype(np.float32) for _ in range(4))
        F.causal_attention_forward(q[:, :64], k[:, :64], v[:, :64], 1, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ctx, lse = F.causal_attention_forward(q, k, v, 1, 1)
        dq, dk, dv = F.causal_attention_backward(g, q, k, v, ctx, lse, 1, 1)
        assert np.isfinite(dq).all() and np.isfinite(dk).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) < 16 * 1024  # KiB
