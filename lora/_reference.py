"""Pure-NumPy twins of the C kernels: the readable spec and the test oracle.

Slow and allocating on purpose: each function is the formula and nothing else. The tests
compare lora.functional (C) against these, computed in float64.
"""

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z):
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic, as in C)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask(seed, n, d_in, p):
    """Boolean (n, d_in) keep-mask of element index i*d_in + j, as the kernels draw it
    (csrc/kernels/elementwise.c)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(seed) ^ np.uint64(0x6A09E667F3BCC909))
        index = np.arange(n * d_in, dtype=np.uint64)
        h = _mix64(key + index * np.uint64(0x9E3779B97F4A7C15))
    threshold = np.uint64(int(p * 16777216.0))
    return ((h >> np.uint64(40)) >= threshold).reshape(n, d_in)


def _drop(x2, p, seed):
    if p == 0:
        return x2
    return np.where(dropout_mask(seed, *x2.shape, p), x2 * (1.0 / (1.0 - p)), 0.0)


def linear_forward(x, weight, A, B, scale, bias=None, *, dropout=0.0, seed=None):
    x2 = x.reshape(-1, x.shape[-1])
    xa = _drop(x2, dropout, seed) @ A.T
    y = x2 @ weight.T + scale * (xa @ B.T)
    if bias is not None:
        y = y + bias
    lead = x.shape[:-1]
    return y.reshape(*lead, weight.shape[0]), xa.reshape(*lead, A.shape[0])


def mixed_forward(x, weight, A, B, scales, adapter_ids, bias=None, *, b_transposed=False):
    """Row by row: y_i = x_i W^T + bias + scales[a] (x_i A[a]^T) B[a]^T, a = adapter_ids[i]
    (none for -1)."""
    x2 = x.reshape(-1, x.shape[-1])
    ids = np.asarray(adapter_ids).reshape(-1)
    B = [b.T for b in B] if b_transposed else B
    y = x2 @ weight.T + (0 if bias is None else bias)
    for i, a in enumerate(ids):
        if a >= 0:
            y[i] += scales[a] * ((x2[i] @ A[a].T) @ B[a].T)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear_backward(dy, x, xa, weight, A, B, scale, *, need_dx=True, dropout=0.0, seed=None):
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    xa2 = xa.reshape(-1, xa.shape[-1])
    g = dy2 @ B
    dB = scale * dy2.T @ xa2
    dA = scale * g.T @ _drop(x2, dropout, seed)
    dx = None
    if need_dx:
        dx = dy2 @ weight + scale * _drop(g @ A, dropout, seed)
        dx = dx.reshape(x.shape)
    return dx, dA, dB


def merge(weight, A, B, scale, *, fan_in_fan_out=False):
    delta = scale * (B @ A)
    weight += delta.T if fan_in_fan_out else delta
    return weight


def unmerge(weight, A, B, scale, *, fan_in_fan_out=False):
    return merge(weight, A, B, -scale, fan_in_fan_out=fan_in_fan_out)


def dora_norm(weight, A, B, scale, *, fan_in_fan_out=False, weight_sqnorm=None):
    """DoRA's per-output norm of the adapted weight, ||W + scale B A|| row by row, formed."""
    W = weight.T if fan_in_fan_out else weight
    return np.linalg.norm(W + scale * (B @ A), axis=1)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _patch_index(image_shape, kernel_size, stride, padding, dilation):
    """For every (output pixel, kernel element): the row and column it reads in the padded
    image, as im2col's cols lays them out (rows (n, oh, ow), columns (c, i, j))."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(dilation)
    ph, pw = _pair(padding)
    _, _, h, w = image_shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (np.arange(oh) * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (np.arange(ow) * sw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    return rows, cols, (oh, ow), (ph, pw)


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1):
    """The patches of x (n, c, h, w) as rows (n oh ow, c kh kw), by fancy indexing of the
    zero-padded images."""
    n, c = x.shape[:2]
    rows, cols, (oh, ow), (ph, pw) = _patch_index(x.shape, kernel_size, stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    patches = xp[:, :, rows, cols]  # (n, c, oh, ow, kh, kw)
    return patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)


def col2im(cols, image_shape, kernel_size, *, stride=1, padding=0, dilation=1):
    """The adjoint of im2col: every patch element added back (np.add.at) onto its pixel."""
    n, c, h, w = image_shape
    rows, cidx, (oh, ow), (ph, pw) = _patch_index(image_shape, kernel_size, stride, padding,
                                                  dilation)
    kh, kw = _pair(kernel_size)
    g = cols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 1, 2, 4, 5)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    r, q = np.broadcast_arrays(rows, cidx)
    np.add.at(dxp, (slice(None), slice(None), r, q), g)
    return dxp[:, :, ph:ph + h, pw:pw + w]


def dense_forward(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def dense_backward(dy, x, weight, *, need_dx=True, need_dweight=True):
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = (dy @ weight) if need_dx else None
    dw = (dy2.T @ x2) if need_dweight else None
    return dx, dw


def adam_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled=True):
    """torch.optim.AdamW (decoupled) / torch.optim.Adam (L2), one step, in place."""
    if decoupled:
        param *= 1.0 - lr * weight_decay
        g = grad
    else:
        g = grad + weight_decay * param
    m += (1.0 - beta1) * (g - m)
    v *= beta2
    v += (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    denom = np.sqrt(v) / np.sqrt(bc2) + eps
    param -= (lr / bc1) * (m / denom)


def _normal_cdf(x):
    """Phi(x) = erfc(-x / sqrt 2) / 2: unlike (1 + erf(x / sqrt 2)) / 2 it does not cancel to 0
    for x below -8, where Phi is still ~1e-16."""
    from math import erfc, sqrt

    return 0.5 * np.vectorize(erfc, otypes=[np.float64])(-x / sqrt(2.0))


def gelu_forward(x):
    """x * Phi(x), Phi the standard normal CDF (exact GELU)."""
    return x * _normal_cdf(x)


def gelu_backward(dy, x):
    from math import pi, sqrt

    return dy * (_normal_cdf(x) + x * np.exp(-0.5 * x * x) / sqrt(2.0 * pi))


def layer_norm_forward(x, weight, bias=None, *, eps=1e-5):
    mean = x.mean(axis=-1)
    rstd = 1.0 / np.sqrt(((x - mean[..., None]) ** 2).mean(axis=-1) + eps)
    y = (x - mean[..., None]) * rstd[..., None] * weight
    return (y if bias is None else y + bias), mean, rstd


def layer_norm_backward(dy, x, mean, rstd, weight, *, need_dweight=True, need_dbias=True):
    xhat = (x - mean[..., None]) * rstd[..., None]
    g = dy * weight
    dx = rstd[..., None] * (g - g.mean(axis=-1, keepdims=True)
                            - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    dw = (dy * xhat).sum(axis=rows) if need_dweight else None
    db = dy.sum(axis=rows) if need_dbias else None
    return dx, dw, db


def _heads(a, num_heads):
    """(batch, seq, hidden) -> (batch, heads, seq, head_dim) view."""
    b, s, hidden = a.shape
    return a.reshape(b, s, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)


def _drop_probs(p, dropout, seed):
    if dropout == 0:
        return p
    keep = dropout_mask(seed, p.size // p.shape[-1], p.shape[-1], dropout).reshape(p.shape)
    return np.where(keep, p * (1.0 / (1.0 - dropout)), 0.0)


def attention_forward(q, k, v, num_heads, *, key_mask=None, scale=None, dropout=0.0, seed=None):
    """Multi-head attention on (batch, seq, hidden) arrays; head h is the column block
    [h*head_dim, (h+1)*head_dim). Masked keys get probability 0; an item with no key left
    attends to every key equally."""
    scale = 1.0 / np.sqrt(q.shape[-1] // num_heads) if scale is None else scale
    s = scale * (_heads(q, num_heads) @ _heads(k, num_heads).transpose(0, 1, 3, 2))
    if key_mask is not None:
        m = np.asarray(key_mask).astype(bool)
        s = np.where(m[:, None, None, :], s, -np.inf)
        s[~m.any(axis=1)] = 0.0
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    ctx = _drop_probs(p, dropout, seed) @ _heads(v, num_heads)
    return ctx.transpose(0, 2, 1, 3).reshape(q.shape), p


def attention_backward(dctx, q, k, v, probs, num_heads, *, key_mask=None, scale=None,
                       dropout=0.0, seed=None):
    scale = 1.0 / np.sqrt(q.shape[-1] // num_heads) if scale is None else scale
    qh, kh, vh, dch = (_heads(a, num_heads) for a in (q, k, v, dctx))
    dv = _drop_probs(probs, dropout, seed).transpose(0, 1, 3, 2) @ dch
    dp = _drop_probs(dch @ vh.transpose(0, 1, 3, 2), dropout, seed)
    ds = probs * (dp - (probs * dp).sum(axis=-1, keepdims=True))
    dq, dk = scale * (ds @ kh), scale * (ds.transpose(0, 1, 3, 2) @ qh)

    def merge(a, like):
        return a.transpose(0, 2, 1, 3).reshape(like.shape)

    return merge(dq, q), merge(dk, k), merge(dv, k)


# ------------------------------------------------------------------ Llama-family operations


def rms_norm_forward(x, weight, *, eps=1e-6):
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)
    return x * rstd[..., None] * weight, rstd


def rms_norm_backward(dy, x, rstd, weight, *, need_dweight=True):
    xhat = x * rstd[..., None]
    g = dy * weight
    dx = rstd[..., None] * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dy * xhat).sum(axis=tuple(range(dy.ndim - 1))) if need_dweight else None
    return dx, dw


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_tables(cos, sin):
    """(seq, d) or (batch, seq, d) -> broadcastable against (batch, seq, heads, d)."""
    return (cos[..., None, :], sin[..., None, :])


def rope_forward(x, cos, sin, num_heads):
    """transformers' apply_rotary_pos_emb on (batch, seq, heads*head_dim); returns a new array
    (the C function rotates x in place)."""
    b, s, hidden = x.shape
    xh = x.reshape(b, s, num_heads, hidden // num_heads)
    c, sn = _rope_tables(cos, sin)
    return (xh * c + _rotate_half(xh) * sn).reshape(x.shape)


def rope_backward(dx, cos, sin, num_heads):
    """The transpose of rope_forward's linear map applied to the gradient."""
    b, s, hidden = dx.shape
    g = dx.reshape(b, s, num_heads, hidden // num_heads)
    c, sn = _rope_tables(cos, sin)
    gs = g * sn
    half = g.shape[-1] // 2
    # rotate_half^T(u) = concat(u2, -u1)
    rot_t = np.concatenate([gs[..., half:], -gs[..., :half]], axis=-1)
    return (g * c + rot_t).reshape(dx.shape)


def swiglu_forward(gate, up):
    return gate / (1.0 + np.exp(-gate)) * up


def swiglu_backward(dy, gate, up):
    s = 1.0 / (1.0 + np.exp(-gate))
    return dy * up * s * (1.0 + gate * (1.0 - s)), dy * gate * s


def _causal_scores(q, k, num_heads, num_kv_heads, key_mask, scale):
    """Scores (batch, heads, seq, kv_len) of the q rows at positions kv_len - seq ..
    kv_len - 1 against the keys k[:, :kv_len]."""
    b, s, hq = q.shape
    n = k.shape[1]
    d = hq // num_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    rep = num_heads // num_kv_heads
    kh = np.repeat(_heads(k, num_kv_heads), rep, axis=1)  # transformers' repeat_kv
    scores = scale * (_heads(q, num_heads) @ kh.transpose(0, 1, 3, 2))
    allowed = np.tril(np.ones((s, n), bool), k=n - s)[None, None]
    if key_mask is not None:
        allowed = allowed & np.asarray(key_mask)[:, :n].astype(bool)[:, None, None, :]
    return np.where(allowed, scores, -np.inf), np.broadcast_to(allowed, scores.shape), scale, rep


def causal_attention_forward(q, k, v, num_heads, num_kv_heads, *, key_mask=None, scale=None,
                             kv_len=None):
    """Causal grouped-query attention, the (seq x kv_len) way. Query head h reads kv head
    h // (num_heads // num_kv_heads); a row with no key gives ctx 0 and lse -inf. With a KV
    cache (k, v of kv_seq >= seq rows), the keys are the first kv_len (default all) and the
    q rows the last seq positions among them."""
    kv_len = k.shape[1] if kv_len is None else kv_len
    k, v = k[:, :kv_len], v[:, :kv_len]
    s, allowed, _, rep = _causal_scores(q, k, num_heads, num_kv_heads, key_mask, scale)
    any_key = allowed.any(axis=-1, keepdims=True)
    m = np.where(any_key, s.max(axis=-1, keepdims=True, initial=-np.inf), 0.0)
    e = np.where(allowed, np.exp(s - m), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = np.where(any_key, e / np.where(any_key, total, 1.0), 0.0)
    vh = np.repeat(_heads(v, num_kv_heads), rep, axis=1)
    ctx = (p @ vh).transpose(0, 2, 1, 3).reshape(q.shape)
    with np.errstate(divide="ignore"):
        lse = np.where(any_key, m + np.log(np.where(any_key, total, 1.0)), -np.inf)[..., 0]
    return ctx, lse


def causal_attention_backward(dctx, q, k, v, ctx, lse, num_heads, num_kv_heads, *,
                              key_mask=None, scale=None):
    s, allowed, scale, rep = _causal_scores(q, k, num_heads, num_kv_heads, key_mask, scale)
    b, n, _ = q.shape
    finite = np.isfinite(lse)[..., None]
    p = np.where(allowed & finite, np.exp(s - np.where(finite, lse[..., None], 0.0)), 0.0)
    do = _heads(dctx, num_heads)
    vh = np.repeat(_heads(v, num_kv_heads), rep, axis=1)
    kh = np.repeat(_heads(k, num_kv_heads), rep, axis=1)
    dv_rep = p.transpose(0, 1, 3, 2) @ do
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (do * _heads(ctx, num_heads)).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ kh)
    dk_rep = scale * (ds.transpose(0, 1, 3, 2) @ _heads(q, num_heads))

    def fold(g):  # sum the query heads of each kv head, back to (batch, seq, kv_hidden)
        g = g.reshape(b, num_kv_heads, rep, n, g.shape[-1]).sum(axis=2)
        return g.transpose(0, 2, 1, 3).reshape(k.shape)

    return dq.transpose(0, 2, 1, 3).reshape(q.shape), fold(dk_rep), fold(dv_rep)


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, chunk=None,
                         need_dhidden=True, need_dweight=False):
    """The whole (n, V) way: logits, log-softmax, the mean over counted rows and its gradient."""
    logits = hidden @ weight.T
    keep = labels != ignore_index
    m = logits.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    count = int(keep.sum())
    rows = np.flatnonzero(keep)
    loss = float((lse[rows, 0] - logits[rows, labels[rows]]).sum() / count) if count else np.nan
    g = np.exp(logits - lse)
    g[rows, labels[rows]] -= 1
    g[~keep] = 0
    g /= max(count, 1)
    return (loss, g @ weight if need_dhidden else None,
            g.T @ hidden if need_dweight else None)


# QLoRA's NF4 (Dettmers et al. 2023): blocks of 64, each scaled by its absmax to [-1, 1]
# and rounded to the nearest of 16 NormalFloat codes (a tie to the lower one); lora's block
# layout (csrc/kernels/quant.c): float32 absmax, then 32 bytes, element 2i in the high
# nibble of byte i and 2i + 1 in the low one.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def nf4_quantize(x):
    """The NF4 blocks (uint8, x.shape[:-1] + (K / 64 * 36,)) of float32 x (..., K)."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax == 0, np.float32(0), np.float32(1) / absmax).astype(np.float32)
    v = blocks * inv[:, None]
    c = NF4_CODE.astype(np.float64)
    mid = ((c[1:] + c[:-1]) / 2).astype(np.float32)
    q = (v[:, :, None] > mid).sum(axis=2).astype(np.uint8)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    out = np.concatenate([absmax.astype("<f4")[:, None].view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 64 * 36)


def nf4_dequantize(data, shape):
    """float32 values of NF4 blocks, as `shape`."""
    blocks = np.ascontiguousarray(data).reshape(-1, 36)
    absmax = blocks[:, :4].copy().view("<f4").astype(np.float32)
    q = np.empty((blocks.shape[0], 64), np.uint8)
    q[:, 0::2], q[:, 1::2] = blocks[:, 4:] >> 4, blocks[:, 4:] & 15
    return (NF4_CODE[q] * absmax).reshape(shape)


def q8_activations(x):
    """x (..., K) float32 as the q8 decode path sees it: each block of 32 rounded to 8 bits,
    q = rint(x * (127 / amax)) (ties to even), value q * (amax / 127), all in float32 as the
    kernel computes them; an all-zero block stays zero. float64 of x's shape."""
    x = np.asarray(x, np.float32)
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    safe = np.where(amax == 0, np.float32(1), amax)
    inv = np.where(amax == 0, np.float32(0), np.float32(127) / safe).astype(np.float32)
    q = np.rint(b * inv)
    d = (amax / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * d).reshape(x.shape)


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True), 7 exponent
    bits), float32, ascending: 0, 1 and for i = 0..6 the midpoints of linspace(0.1, 1,
    2^i + 1) times +-10^(i-6). Built in float64 and rounded once (torch builds it in float32
    and lands within an ulp of these)."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2
        values += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    return np.sort(np.array(values)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()


# QLoRA's double quantization (NF4_DQ), per row: the NF4 blocks' absmax values less their mean
# (the offset) in groups of 256, each scaled by its largest magnitude (absmax2) to [-1, 1] and
# rounded to the nearest DYNAMIC_MAP code (a tie to the lower one). Row layout
# (csrc/kernels/quant.c): float32 offset, float32 absmax2 per group, a uint8 code per block,
# then each block's 32 NF4 code bytes. A block's scale is code * absmax2 + offset.
def nf4dq_row_bytes(K):
    nb = K // 64
    return 4 + 4 * -(-nb // 256) + 33 * nb


def nf4dq_quantize(x):
    """The NF4_DQ rows (uint8, x.shape[:-1] + (nf4dq_row_bytes(K),)) of float32 x (..., K)."""
    x = np.asarray(x, np.float32)
    K = x.shape[-1]
    nb, ng = K // 64, -(-(K // 64) // 256)
    blocks = x.reshape(-1, nb, 64)
    nf4 = nf4_quantize(x).reshape(-1, nb, 36)  # the codes are plain NF4's
    absmax = np.abs(blocks).max(axis=2)
    # the mean: a float64 sum in block order (cumsum is sequential), rounded to float32
    offset = (np.cumsum(absmax.astype(np.float64), axis=1)[:, -1] / nb).astype(np.float32)
    centred = absmax - offset[:, None]
    code = DYNAMIC_MAP.astype(np.float64)
    mid = ((code[1:] + code[:-1]) / 2).astype(np.float32)
    absmax2 = np.empty((len(blocks), ng), np.float32)
    q = np.empty((len(blocks), nb), np.uint8)
    for g in range(ng):
        c = centred[:, 256 * g:256 * (g + 1)]
        absmax2[:, g] = np.abs(c).max(axis=1)
        with np.errstate(divide="ignore"):
            inv = np.where(absmax2[:, g] == 0, np.float32(0), np.float32(1) / absmax2[:, g])
        v = c * inv.astype(np.float32)[:, None]
        q[:, 256 * g:256 * (g + 1)] = np.searchsorted(mid, v, side="left")  # mids below v
    out = np.concatenate([offset.astype("<f4")[:, None].view(np.uint8),
                          absmax2.astype("<f4").view(np.uint8), q,
                          nf4[:, :, 4:].reshape(len(blocks), -1)], axis=1)
    return out.reshape(*x.shape[:-1], nf4dq_row_bytes(K))


def nf4dq_dequantize(data, shape):
    """float32 values of NF4_DQ rows, as `shape`."""
    K = shape[-1]
    nb, ng = K // 64, -(-(K // 64) // 256)
    rows = np.ascontiguousarray(data).reshape(-1, nf4dq_row_bytes(K))
    offset = rows[:, :4].copy().view("<f4").astype(np.float32)
    absmax2 = rows[:, 4:4 + 4 * ng].copy().view("<f4").astype(np.float32)
    q = rows[:, 4 + 4 * ng:4 + 4 * ng + nb]
    codes = rows[:, 4 + 4 * ng + nb:].reshape(len(rows), nb, 32)
    scale = DYNAMIC_MAP[q] * np.repeat(absmax2, 256, axis=1)[:, :nb] + offset
    nib = np.empty((len(rows), nb, 64), np.uint8)
    nib[:, :, 0::2], nib[:, :, 1::2] = codes >> 4, codes & 15
    return (NF4_CODE[nib] * scale[:, :, None]).reshape(shape)
