"""Generation tests (see below)."""

import numpy as np
import pytest

from lora import _reference as ref
from lora import functional as F

# ------------------------------------------------------------------ attention with a KV cache


def close(a, b, dtype, scale=1.0):
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * scale)


def cache_case(rng, b, cap, s, length, heads, kv, d, dtype):
    """q for the last s of `length` positions, and k, v caches of `cap` rows whose rows
    beyond `length` are NaN (never to be read)."""
    q = rng.standard_normal((b, s, heads * d)).astype(dtype)
    k = np.full((b, cap, kv * d), np.nan, dtype)
    v = np.full((b, cap, kv * d), np.nan, dtype)
    k[:, :length] = rng.standard_normal((b, length, kv * d))
    v[:, :length] = rng.standard_normal((b, length, kv * d))
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,cap,s,length,heads,kv,d", [
    (1, 8, 1, 1, 1, 1, 4),       # the first decoding step
    (2, 40, 1, 23, 9, 3, 64),    # decode, GQA, SmolLM2's head shape
    (3, 200, 1, 150, 4, 2, 8),   # decode over several key tiles
    (2, 50, 7, 30, 6, 2, 16),    # a chunk of 7 rows after 23 cached ones
    (2, 100, 70, 90, 2, 1, 8),   # a chunk longer than a query tile
    (2, 12, 12, 12, 4, 4, 4),    # the cache full, no extra rows
    (0, 5, 1, 3, 2, 1, 4), (2, 5, 0, 3, 2, 1, 4)])
def test_cached_attention_matches_twin(dtype, b, cap, s, length, heads, kv, d):
    rng = np.random.default_rng(10)
    q, k, v = cache_case(rng, b, cap, s, length, heads, kv, d, dtype)
    full = np.ones((b, cap), bool)
    left = full.copy()
    left[::2, : length // 2] = False
    holes = rng.random((b, cap)) > 0.3
    for mask in [None, full, left, holes, left[:, :length].astype(np.int64)]:
        ctx, lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=mask, kv_len=length)
        assert ctx.shape == q.shape and ctx.dtype == dtype and lse.shape == (b, heads, s)
        assert np.isfinite(ctx).all()
        ctx_ref, lse_ref = ref.causal_attention_forward(
            q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), heads, kv,
            key_mask=mask, kv_len=length)
        close(ctx, ctx_ref, dtype)
        fin = np.isfinite(lse_ref)
        assert np.array_equal(fin, np.isfinite(lse))
        close(lse[fin], lse_ref[fin], dtype, 10)


def test_cached_rows_equal_the_full_attention():
    """Each chunk of a sequence, attended against the cache filled up to its end, gives the
    rows of the uncached call on the whole sequence (the twin's spec, checked on C alone)."""
    rng = np.random.default_rng(11)
    b, n, heads, kv, d = 2, 37, 6, 2, 16
    q, k, v = (rng.standard_normal((b, n, w * d)).astype(np.float32) for w in (heads, kv, kv))
    mask = np.ones((b, n), bool)
    mask[1, :5] = False
    want, want_lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=mask)
    cache_k, cache_v = np.zeros((b, 64, kv * d), np.float32), np.zeros((b, 64, kv * d), np.float32)
    cache_mask = np.ones((b, 64), bool)
    cache_mask[:, :n] = mask
    start = 0
    for chunk in (10, 1, 1, 20, 5):
        end = start + chunk
        cache_k[:, start:end], cache_v[:, start:end] = k[:, start:end], v[:, start:end]
        ctx, lse = F.causal_attention_forward(q[:, start:end], cache_k, cache_v, heads, kv,
                                              key_mask=cache_mask, kv_len=end)
        np.testing.assert_allclose(ctx, want[:, start:end], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, want_lse[:, :, start:end], rtol=1e-5, atol=1e-6)
        start = end
    assert start == n


def test_cached_attention_bad_input():
    rng = np.random.default_rng(12)
    q, k, v = cache_case(rng, 2, 10, 3, 6, 4, 2, 4, np.float64)
    with pytest.raises(ValueError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=2)  # fewer keys than queries
    with pytest.raises(ValueError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=11)
    with pytest.raises(TypeError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6.0)
    with pytest.raises(ValueError, match="'k' must have shape.*kv_seq >= seq"):
        F.causal_attention_forward(q, k[:, :2], v[:, :2], 4, 2)
    with pytest.raises(ValueError, match="'v'"):
        F.causal_attention_forward(q, k, v[:, :9], 4, 2, kv_len=6)
    with pytest.raises(ValueError, match="'key_mask'.*kv_len"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6, key_mask=np.ones((2, 7), bool))
    with pytest.raises(TypeError, match="'key_mask'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6, key_mask=np.ones((2, 6)))
    with pytest.raises(TypeError, match="'k'"):
        F.causal_attention_forward(q, k.astype(np.float32), v, 4, 2, kv_len=6)
    # no backward for a cached call: k longer than q is refused by name
    ctx, lse = F.causal_attention_forward(q, k, v, 4, 2, kv_len=6)
    with pytest.raises(ValueError, match="only the forward takes a KV cache"):
        F.causal_attention_backward(ctx, q, k, v, ctx, lse, 4, 2)
    with pytest.raises(TypeError, match="kv_len"):
        F.causal_attention_backward(ctx, q, k, v, ctx, lse, 4, 2, kv_len=6)
