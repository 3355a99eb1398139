"""lora.functional.attention_forward/backward against their NumPy twin, finite differences and
torch's scaled_dot_product_attention; dropout, key masks and bad input."""

import sys
import tracemalloc

import numpy as np
import pytest
from gradcheck import numeric_gradient

from lora import _reference as ref
from lora import functional as F

DTYPES = [np.float32, np.float64]


def qkv(rng, b, sq, sk, hidden, dtype):
    return (rng.standard_normal((b, sq, hidden)).astype(dtype),
            rng.standard_normal((b, sk, hidden)).astype(dtype),
            rng.standard_normal((b, sk, hidden)).astype(dtype))


def masks(rng, b, sk):
    """None, all ones, right-padded, scattered, and scattered with one item fully masked."""
    padded = np.ones((b, sk), bool)
    padded[::2, max(1, sk // 2):] = False
    scattered = rng.random((b, sk)) > 0.4
    scattered[:, 0] = True
    empty = scattered.copy()
    empty[:1] = False
    return [None, np.ones((b, sk), np.int64), padded, scattered, empty]


def close(a, b, dtype):
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,sq,sk,heads,head_dim", [
    (2, 5, 7, 3, 4), (3, 16, 16, 2, 8), (1, 1, 1, 1, 1), (2, 9, 3, 1, 5), (0, 4, 4, 2, 2),
    (2, 0, 5, 2, 3)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_twin(dtype, b, sq, sk, heads, head_dim, dropout):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, b, sq, sk, heads * head_dim, dtype)
    for mask in masks(rng, b, sk):
        kw = dict(key_mask=mask, dropout=dropout, seed=7 if dropout else None)
        ctx, probs = F.attention_forward(q, k, v, heads, **kw)
        assert ctx.shape == q.shape and ctx.dtype == dtype
        assert probs.shape == (b, heads, sq, sk) and probs.dtype == dtype
        as64 = [a.astype(np.float64) for a in (q, k, v)]
        ctx_ref, probs_ref = ref.attention_forward(*as64, heads, **kw)
        close(ctx, ctx_ref, dtype)
        close(probs, probs_ref, dtype)
        dctx = rng.standard_normal(q.shape).astype(dtype)
        grads = F.attention_backward(dctx, q, k, v, probs, heads, **kw)
        grads_ref = ref.attention_backward(dctx.astype(np.float64), *as64, probs_ref, heads, **kw)
        for g, g_ref, like in zip(grads, grads_ref, (q, k, v), strict=True):
            assert g.shape == like.shape and g.dtype == dtype
            close(g, g_ref, dtype)


def test_masked_keys_get_nothing_and_empty_items_attend_evenly():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 3, 4, 6, 8, np.float64)
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
    _, probs = F.attention_forward(q, k, v, 2, key_mask=mask)
    assert (probs[:2][~np.broadcast_to(mask[:2, None, None, :], probs[:2].shape)] == 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(probs[2], 1 / 6, rtol=1e-12)
    dctx = rng.standard_normal(q.shape)
    _, dk, dv = F.attention_backward(dctx, q, k, v, probs, 2, key_mask=mask)
    assert (dk[0, 3:] == 0).all() and (dv[0, 3:] == 0).all()
    assert (dk[1, [0, 2, 5]] == 0).all() and (dv[1, [0, 2, 5]] == 0).all()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("mask_kind", [0, 2, 3])
def test_gradients_match_finite_differences(dropout, mask_kind):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 2, 3, 4, 6, np.float64)
    mask = masks(rng, 2, 4)[mask_kind]
    kw = dict(key_mask=mask, scale=0.7, dropout=dropout, seed=11)
    dctx = rng.standard_normal(q.shape)
    ctx, probs = F.attention_forward(q, k, v, 2, **kw)
    grads = F.attention_backward(dctx, q, k, v, probs, 2, **kw)

    def loss():
        return float(np.sum(F.attention_forward(q, k, v, 2, **kw)[0] * dctx))

    for g, a in zip(grads, (q, k, v), strict=True):
        np.testing.assert_allclose(g, numeric_gradient(loss, a), rtol=1e-6, atol=1e-8)


def test_dropout_mask_is_seeded_and_regenerated():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 4, 32, 32, 16, np.float32)
    a = F.attention_forward(q, k, v, 2, dropout=0.5, seed=1)[0]
    b = F.attention_forward(q, k, v, 2, dropout=0.5, seed=1)[0]
    c = F.attention_forward(q, k, v, 2, dropout=0.5, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the mask keeps about 1 - p of the probabilities, each scaled by 1 / (1 - p)
    probs = F.attention_forward(q, k, v, 2)[1]
    keep = ref.dropout_mask(1, probs.size // 32, 32, 0.5)
    assert abs(keep.mean() - 0.5) < 0.01
    ones = np.ones_like(v)
    ctx = F.attention_forward(q, k, ones, 2, dropout=0.5, seed=1)[0]
    kept = (probs.reshape(keep.shape) * keep * 2).reshape(probs.shape).sum(-1)
    np.testing.assert_allclose(ctx[..., 0], kept[:, 0], rtol=1e-5)


@pytest.mark.parametrize("mask_kind", [0, 2, 3])
def test_matches_torch_sdpa(mask_kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, s, heads, d = 3, 10, 4, 8
    q, k, v = qkv(rng, b, s, s, heads * d, np.float32)
    mask = masks(rng, b, s)[mask_kind]
    dctx = rng.standard_normal(q.shape).astype(np.float32)
    ctx, probs = F.attention_forward(q, k, v, heads, key_mask=mask)
    dq, dk, dv = F.attention_backward(dctx, q, k, v, probs, heads, key_mask=mask)

    def heads_of(a):
        return torch.from_numpy(a).reshape(b, -1, heads, d).transpose(1, 2).requires_grad_(True)

    tq, tk, tv = heads_of(q), heads_of(k), heads_of(v)
    tmask = None if mask is None else torch.from_numpy(mask.astype(bool))[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
    out = out.transpose(1, 2).reshape(q.shape)
    out.backward(torch.from_numpy(dctx))
    np.testing.assert_allclose(ctx, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    for g, t in ((dq, tq), (dk, tk), (dv, tv)):
        np.testing.assert_allclose(g, t.grad.transpose(1, 2).reshape(g.shape).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_noncontiguous_inputs_are_accepted():
    rng = np.random.default_rng(6)
    big = rng.standard_normal((2, 5, 24))
    q, k, v = big[..., :8], big[..., 8:16], big[..., 16:]
    ctx, probs = F.attention_forward(q, k, v, 2)
    ctx_ref, _ = ref.attention_forward(q, k, v, 2)
    close(ctx, ctx_ref, np.float64)


# ---------------------------------------------------------------- bad input

def args(dtype=np.float32):
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 2, 3, 4, 6, dtype)
    probs = F.attention_forward(q, k, v, 2)[1]
    return dict(q=q, k=k, v=v, dctx=np.ones_like(q), probs=probs)


def expect(exc, func, arg, call, a):
    before = {n: x.copy() for n, x in a.items()}
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert f"lora.functional.{func}" in msg and f"'{arg}'" in msg, msg
    for n, x in a.items():
        np.testing.assert_array_equal(x, before[n], err_msg=f"{n} was modified")
    return msg


def fwd(a, heads=2, **kw):
    return lambda: F.attention_forward(a["q"], a["k"], a["v"], heads, **kw)


def bwd(a, heads=2, **kw):
    return lambda: F.attention_backward(a["dctx"], a["q"], a["k"], a["v"], a["probs"], heads,
                                        **kw)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_bad_arrays(arg):
    a = args()
    expect(TypeError, "attention_forward", arg, fwd(dict(a, **{arg: a[arg].tolist()})), a)
    if arg != "q":
        expect(TypeError, "attention_forward", arg,
               fwd(dict(a, **{arg: a[arg].astype(np.float64)})), a)
    expect(ValueError, "attention_forward", arg, fwd(dict(a, **{arg: a[arg][0]})), a)
    expect(ValueError, "attention_forward", arg if arg != "q" else "k",
           fwd(dict(a, **{arg: a[arg][..., :4]})), a)
    expect(TypeError, "attention_forward", arg, fwd(dict(a, **{arg: a[arg].astype(np.int32)})), a)


def test_bad_shapes_between_arguments():
    a = args()
    expect(ValueError, "attention_forward", "v", fwd(dict(a, v=a["v"][:, :3])), a)
    expect(ValueError, "attention_forward", "k", fwd(dict(a, k=a["k"][:1])), a)
    expect(ValueError, "attention_forward", "k", fwd(dict(a, k=a["k"][:, :0], v=a["v"][:, :0])),
           a)
    expect(ValueError, "attention_backward", "dctx", bwd(dict(a, dctx=a["dctx"][:, :2])), a)
    expect(ValueError, "attention_backward", "probs", bwd(dict(a, probs=a["probs"][:, :1])), a)
    expect(TypeError, "attention_backward", "probs",
           bwd(dict(a, probs=a["probs"].astype(np.float64))), a)


@pytest.mark.parametrize("heads,exc", [(4, ValueError), (0, ValueError), (-2, ValueError),
                                       (7, ValueError), (2.0, TypeError), ("2", TypeError),
                                       (2**80, ValueError)])
def test_bad_num_heads(heads, exc):
    a = args()
    expect(exc, "attention_forward", "num_heads", fwd(a, heads=heads), a)
    expect(exc, "attention_backward", "num_heads", bwd(a, heads=heads), a)


def test_bad_key_mask():
    a = args()
    expect(TypeError, "attention_forward", "key_mask", fwd(a, key_mask=np.ones((2, 4))), a)
    expect(TypeError, "attention_forward", "key_mask", fwd(a, key_mask=[[1] * 4] * 2), a)
    expect(ValueError, "attention_forward", "key_mask",
           fwd(a, key_mask=np.ones((2, 3), bool)), a)
    expect(ValueError, "attention_backward", "key_mask",
           bwd(a, key_mask=np.ones((4,), bool)), a)


def test_bad_hyperparameters():
    a = args()
    expect(ValueError, "attention_forward", "dropout", fwd(a, dropout=1.0, seed=1), a)
    expect(ValueError, "attention_forward", "dropout", fwd(a, dropout=-0.1, seed=1), a)
    expect(ValueError, "attention_forward", "dropout", fwd(a, dropout=float("nan"), seed=1), a)
    expect(ValueError, "attention_forward", "seed", fwd(a, dropout=0.1), a)
    expect(ValueError, "attention_backward", "seed", bwd(a, dropout=0.1), a)
    expect(ValueError, "attention_forward", "seed", fwd(a, dropout=0.1, seed=-1), a)
    expect(ValueError, "attention_forward", "scale", fwd(a, scale=float("inf")), a)
    expect(TypeError, "attention_forward", "scale", fwd(a, scale="big"), a)


def test_references_and_memory_stay_flat():
    a = args()
    mask = np.ones((2, 4), bool)
    mask[0, 2:] = False
    refs = [sys.getrefcount(x) for x in (*a.values(), mask)]
    tracemalloc.start()
    for i in range(2000):
        ctx, probs = F.attention_forward(a["q"], a["k"], a["v"], 2, key_mask=mask, dropout=0.1,
                                         seed=i)
        F.attention_backward(a["dctx"], a["q"], a["k"], a["v"], probs, 2, key_mask=mask,
                             dropout=0.1, seed=i)
        if i == 100:
            base = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 64 << 10, grown
    assert [sys.getrefcount(x) for x in (*a.values(), mask)] == refs
