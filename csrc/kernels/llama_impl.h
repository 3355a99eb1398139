/* kernels/llama_impl.h: the type-generic bodies of llama.c, INCLUDED TWICE by it (through
 * instantiate.h), once with T = float and once with T = double; FN(name) makes name_f32 /
 * name_f64, SQRT and EXP are the type's. Not a header to include anywhere else. */

#define AVL (64 / sizeof(T))
#define TK (4 * AVL) /* ATTN_TILE_K(sizeof(T)) */
#define TQ ATTN_TILE_Q

/* ------------------------------------------------------------------ RMSNorm
 * x, y (rows, d), weight (d), rstd (rows); row-major. Llama's RMSNorm (Zhang & Sennrich
 * 2019; transformers' LlamaRMSNorm): y = (x rstd) w with rstd = 1 / sqrt(mean(x^2) + eps),
 * eps inside the root, computed in T (what LlamaRMSNorm does for float32 input). y and rstd
 * are overwritten. */
typedef struct {
    T *y, *rstd, *dx, *dw;
    const T *x, *w, *dy;
    double eps;
    size_t rows, d;
} FN(RmsArgs);

static LORA_CLONES void FN(rms_norm_rows)(void *arg, size_t begin, size_t end) {
    const FN(RmsArgs) *a = arg;
    const size_t d = a->d;
    const T *restrict w = a->w;
    for (size_t i = begin; i < end; i++) {
        const T *restrict xi = a->x + i * d;
        T *restrict yi = a->y + i * d;
        T sq = 0;
#pragma omp simd reduction(+ : sq)
        for (size_t j = 0; j < d; j++) sq += xi[j] * xi[j];
        const T rs = (T)1 / SQRT(sq / (T)d + (T)a->eps);
        a->rstd[i] = rs;
#pragma omp simd
        for (size_t j = 0; j < d; j++) yi[j] = (xi[j] * rs) * w[j];
    }
}

void FN(rms_norm_forward)(T *y, T *rstd, const T *x, const T *w, double eps, size_t rows,
                          size_t d) {
    FN(RmsArgs) a = {y, rstd, NULL, NULL, x, w, NULL, eps, rows, d};
    lora_parallel_for(rows, (1 << 16) / (d + 1) + 1, 1, FN(rms_norm_rows), &a);
}

/* Backward of rms_norm_forward: with xhat = x rstd and g = dy w,
 *   dx = rstd (g - xhat mean(g xhat))      (overwritten)
 *   dw += sum over rows of dy xhat        (accumulated; NULL: not computed)
 * dx goes by rows and dw by columns, each split over lora's threads. */
static LORA_CLONES void FN(rms_norm_dx_rows)(void *arg, size_t begin, size_t end) {
    const FN(RmsArgs) *a = arg;
    const size_t d = a->d;
    const T *restrict w = a->w;
    for (size_t i = begin; i < end; i++) {
        const T *restrict xi = a->x + i * d, *restrict gi = a->dy + i * d;
        T *restrict dxi = a->dx + i * d;
        const T rs = a->rstd[i];
        T sum_gx = 0;
#pragma omp simd reduction(+ : sum_gx)
        for (size_t j = 0; j < d; j++) sum_gx += (gi[j] * w[j]) * (xi[j] * rs);
        const T mgx = sum_gx / (T)d;
#pragma omp simd
        for (size_t j = 0; j < d; j++) dxi[j] = rs * (gi[j] * w[j] - (xi[j] * rs) * mgx);
    }
}

static LORA_CLONES void FN(rms_norm_dw_cols)(void *arg, size_t begin, size_t end) {
    const FN(RmsArgs) *a = arg;
    const size_t d = a->d;
    T *restrict dw = a->dw;
    for (size_t i = 0; i < a->rows; i++) {
        const T *restrict xi = a->x + i * d, *restrict gi = a->dy + i * d;
        const T rs = a->rstd[i];
#pragma omp simd
        for (size_t j = begin; j < end; j++) dw[j] += gi[j] * (xi[j] * rs);
    }
}

void FN(rms_norm_backward)(T *dx, T *dw, const T *dy, const T *x, const T *rstd, const T *w,
                           size_t rows, size_t d) {
    FN(RmsArgs) a = {NULL, (T *)rstd, dx, dw, x, w, dy, 0, rows, d};
    lora_parallel_for(rows, (1 << 16) / (d + 1) + 1, 1, FN(rms_norm_dx_rows), &a);
    if (dw)
        lora_parallel_for(d, rows >= (1 << 16) / (d + 1) ? 64 : d, 16, FN(rms_norm_dw_cols), &a);
}

/* ------------------------------------------------------------------ RoPE
 * x (batch, seq, heads*head_dim), rotated in place; cos, sin (seq, head_dim) shared by every
 * item, or (batch, seq, head_dim) when per_item (left-padded batches, whose positions differ
 * by item). transformers' rotate_half convention (apply_rotary_pos_emb): element i pairs with
 * i + half, half = head_dim / 2,
 *   forward:  y_i = x_i cos_i - x_{i+half} sin_i,   y_{i+half} = x_{i+half} cos_{i+half} + x_i sin_{i+half}
 * and the backward applies the transpose of that map to the gradient (the inverse rotation
 * when the two halves of cos/sin agree, as they do for every RoPE table):
 *   dx_i = dy_i cos_i + dy_{i+half} sin_{i+half},   dx_{i+half} = dy_{i+half} cos_{i+half} - dy_i sin_i */
typedef struct {
    T *x;
    const T *cos, *sin;
    size_t seq, heads, head_dim;
    int per_item, transpose;
} FN(RopeArgs);

static LORA_CLONES void FN(rope_rows)(void *arg, size_t begin, size_t end) {
    const FN(RopeArgs) *a = arg;
    const size_t D = a->head_dim, half = D / 2, hid = a->heads * D;
    for (size_t row = begin; row < end; row++) {
        const size_t t = a->per_item ? row : row % a->seq;
        const T *restrict c = a->cos + t * D, *restrict s = a->sin + t * D;
        for (size_t h = 0; h < a->heads; h++) {
            T *restrict x1 = a->x + row * hid + h * D, *restrict x2 = x1 + half;
            if (!a->transpose) {
#pragma omp simd
                for (size_t i = 0; i < half; i++) {
                    const T u = x1[i], v = x2[i];
                    x1[i] = u * c[i] - v * s[i];
                    x2[i] = v * c[i + half] + u * s[i + half];
                }
            } else {
#pragma omp simd
                for (size_t i = 0; i < half; i++) {
                    const T u = x1[i], v = x2[i];
                    x1[i] = u * c[i] + v * s[i + half];
                    x2[i] = v * c[i + half] - u * s[i];
                }
            }
        }
    }
}

static void FN(rope_apply)(T *x, const T *cos, const T *sin, size_t batch, size_t seq,
                           size_t heads, size_t head_dim, int per_item, int transpose) {
    FN(RopeArgs) a = {x, cos, sin, seq, heads, head_dim, per_item, transpose};
    lora_parallel_for(batch * seq, (1 << 15) / (heads * head_dim + 1) + 1, 1, FN(rope_rows), &a);
}

void FN(rope_forward)(T *x, const T *cos, const T *sin, size_t batch, size_t seq, size_t heads,
                      size_t head_dim, int per_item) {
    FN(rope_apply)(x, cos, sin, batch, seq, heads, head_dim, per_item, 0);
}

void FN(rope_backward)(T *dx, const T *cos, const T *sin, size_t batch, size_t seq,
                       size_t heads, size_t head_dim, int per_item) {
    FN(rope_apply)(dx, cos, sin, batch, seq, heads, head_dim, per_item, 1);
}

/* ------------------------------------------------------------------ SwiGLU
 * gate, up, y (n elements): y = silu(gate) up, silu(g) = g sigmoid(g) (Shazeer 2020, the
 * Llama MLP's act_fn(gate_proj(x)) * up_proj(x)); backward, with s = sigmoid(g),
 *   dgate = dy up s (1 + g (1 - s)),   dup = dy g s          (overwritten). */
typedef struct {
    T *y, *dgate, *dup;
    const T *dy, *gate, *up;
} FN(SwigluArgs);

static LORA_CLONES LORA_FMA void FN(swiglu_forward_range)(void *arg, size_t begin, size_t end) {
    const FN(SwigluArgs) *a = arg;
    T *restrict y = a->y;
    const T *restrict g = a->gate, *restrict u = a->up;
#pragma omp simd
    for (size_t i = begin; i < end; i++) y[i] = g[i] / ((T)1 + EXP(-g[i])) * u[i];
}

static LORA_CLONES LORA_FMA void FN(swiglu_backward_range)(void *arg, size_t begin,
                                                           size_t end) {
    const FN(SwigluArgs) *a = arg;
    T *restrict dg = a->dgate, *restrict du = a->dup;
    const T *restrict dy = a->dy, *restrict g = a->gate, *restrict u = a->up;
#pragma omp simd
    for (size_t i = begin; i < end; i++) {
        const T s = (T)1 / ((T)1 + EXP(-g[i]));
        dg[i] = dy[i] * u[i] * s * ((T)1 + g[i] * ((T)1 - s));
        du[i] = dy[i] * g[i] * s;
    }
}

void FN(swiglu_forward)(T *y, const T *gate, const T *up, size_t n) {
    FN(SwigluArgs) a = {y, NULL, NULL, NULL, gate, up};
    lora_parallel_for(n, 1 << 15, 16, FN(swiglu_forward_range), &a);
}

void FN(swiglu_backward)(T *dgate, T *dup, const T *dy, const T *gate, const T *up, size_t n) {
    FN(SwigluArgs) a = {NULL, dgate, dup, dy, gate, up};
    lora_parallel_for(n, 1 << 15, 16, FN(swiglu_backward_range), &a);
}

/* ------------------------------------------------------------------ causal GQA attention
 * q, ctx (batch, seq, heads*head_dim), k, v (batch, kv_seq, kv_heads*head_dim): the layout
 * the projections write. Query head h reads kv head h / (heads / kv_heads) (transformers'
 * repeat_kv). lse (batch, heads, seq). The forward also takes a KV cache: k and v hold
 * kv_seq >= kv_len rows per item, of which keys [0, kv_len) are read, and query row i sits
 * at position kv_len - seq + i (seq = 1: one decoding step, a row of scores per head). The
 * backward has kv_seq = kv_len = seq.
 *
 *   forward:  S = scale q k^T, masked where key j > query i or key j is padding,
 *             P = softmax(S) per row, ctx = P v, lse = log sum_j exp(S_ij)
 *   backward: P = exp(S - lse) recomputed,  dv = P^T dctx,  dP = dctx v^T,
 *             dS = P (dP - rowsum(dctx * ctx)),  dq = scale dS k,  dk = scale dS^T q
 *
 * FlashAttention-2's loop (Dao 2023, Algorithms 1 and 2): tiles of TQ query rows by TK keys,
 * an online softmax (running max and sum per row, the accumulated row rescaled when the max
 * grows), so no seq x seq matrix exists; only lse is kept for the backward, which recomputes
 * each tile's probabilities from it. Tiles wholly above the diagonal or outside an item's
 * unmasked keys are skipped. A row with no key left (a left-padded query position) gives
 * ctx = 0, lse = -inf and no gradient.
 *
 * The forward splits (item, head) pairs over threads (a decoding step: (item, kv head)
 * groups); the backward (item, kv head) groups, so that each thread owns the dk, dv rows it
 * accumulates into. */
typedef struct {
    T *ctx, *lse, *dq, *dk, *dv;
    char *scratch;
    const T *q, *k, *v, *dctx, *o, *lse_in;
    const unsigned char *key_mask;
    const size_t *lo, *hi;
    T scale;
    size_t parts;
    LoraGqaDims d;
} FN(Causal);

/* kt (D x TK) = rows [0, n) of k (row stride ld) transposed, columns n.. zero. */
static void FN(load_kt)(T *restrict kt, const T *restrict k, size_t ld, size_t n, size_t D) {
    for (size_t j = 0; j < n; j++)
        for (size_t e = 0; e < D; e++) kt[e * TK + j] = k[j * ld + e];
    if (n < TK)
        for (size_t e = 0; e < D; e++) memset(kt + e * TK + n, 0, (TK - n) * sizeof(T));
}

/* S (R x TK, row stride TK) = alpha Q (R x D, row stride ldq) kt. Four rows by AVL columns
 * of S at a time (64 bytes each), accumulated while e runs over D: four accumulators and one
 * load of kt, which fit AVX2's sixteen registers. Written as fixed-length `omp simd` loops
 * over local arrays, which GCC keeps in registers at every clone's width; the 64-byte
 * vector type, lowered for AVX2, went through the stack at a sixth of the speed. */
static LORA_CLONES LORA_FMA void FN(tile_scores)(T *restrict S, const T *restrict Q, size_t ldq,
                                                 const T *restrict kt, size_t R, size_t D,
                                                 T alpha) {
    size_t r = 0;
    for (; r + 4 <= R; r += 4) {
        const T *q0 = Q + r * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
        for (size_t c = 0; c < TK; c += AVL) {
            T a0[AVL] = {0}, a1[AVL] = {0}, a2[AVL] = {0}, a3[AVL] = {0};
            for (size_t e = 0; e < D; e++) {
                const T *restrict kr = kt + e * TK + c;
                const T x0 = q0[e], x1 = q1[e], x2 = q2[e], x3 = q3[e];
#pragma omp simd
                for (size_t l = 0; l < AVL; l++) {
                    a0[l] += x0 * kr[l];
                    a1[l] += x1 * kr[l];
                    a2[l] += x2 * kr[l];
                    a3[l] += x3 * kr[l];
                }
            }
            T *s0 = S + r * TK + c;
#pragma omp simd
            for (size_t l = 0; l < AVL; l++) {
                s0[l] = alpha * a0[l];
                s0[TK + l] = alpha * a1[l];
                s0[2 * TK + l] = alpha * a2[l];
                s0[3 * TK + l] = alpha * a3[l];
            }
        }
    }
    for (; r < R; r++) {
        const T *q0 = Q + r * ldq;
        for (size_t c = 0; c < TK; c += AVL) {
            T a0[AVL] = {0};
            for (size_t e = 0; e < D; e++) {
                const T *restrict kr = kt + e * TK + c;
                const T x0 = q0[e];
#pragma omp simd
                for (size_t l = 0; l < AVL; l++) a0[l] += x0 * kr[l];
            }
            T *s0 = S + r * TK + c;
#pragma omp simd
            for (size_t l = 0; l < AVL; l++) s0[l] = alpha * a0[l];
        }
    }
}

/* Out (R x D, row stride ldo) += alpha P (R x n, row stride TK) V (n x D, row stride ldv). */
static LORA_CLONES LORA_FMA void FN(tile_pv)(T *restrict out, size_t ldo, const T *restrict P,
                                             const T *restrict V, size_t ldv, size_t R,
                                             size_t n, size_t D, T alpha) {
    for (size_t r = 0; r < R; r++) {
        T *restrict o = out + r * ldo;
        const T *p = P + r * TK;
        for (size_t j = 0; j < n; j++) {
            const T w = alpha * p[j];
            if (w == 0) continue;
            const T *restrict vj = V + j * ldv;
#pragma omp simd
            for (size_t e = 0; e < D; e++) o[e] += w * vj[e];
        }
    }
}

/* Out (n x D, row stride ldo) += alpha P^T (P: R x n, row stride TK) X (R x D, stride ldx). */
static LORA_CLONES LORA_FMA void FN(tile_ptx)(T *restrict out, size_t ldo, const T *restrict P,
                                              const T *restrict X, size_t ldx, size_t R,
                                              size_t n, size_t D, T alpha) {
    for (size_t j = 0; j < n; j++) {
        T *restrict o = out + j * ldo;
        for (size_t r = 0; r < R; r++) {
            const T w = alpha * P[r * TK + j];
            if (w == 0) continue;
            const T *restrict xr = X + r * ldx;
#pragma omp simd
            for (size_t e = 0; e < D; e++) o[e] += w * xr[e];
        }
    }
}

/* The scores of tile (rows i0.., keys j0..j0+n) that a query may not see set to -inf:
 * keys after the query, and padding keys. */
static void FN(mask_tile)(T *S, size_t i0, size_t R, size_t j0, size_t n,
                          const unsigned char *mask) {
    if (!mask && j0 + n <= i0 + 1) return; /* wholly at or below the diagonal */
    for (size_t r = 0; r < R; r++) {
        T *s = S + r * TK;
        for (size_t j = 0; j < n; j++)
            if (j0 + j > i0 + r || (mask && !mask[j0 + j])) s[j] = -INFINITY;
    }
}

static LORA_CLONES LORA_FMA void FN(causal_forward_parts)(void *arg, size_t part0,
                                                          size_t part1) {
    const FN(Causal) *a = arg;
    const size_t H = a->d.heads, KV = a->d.kv_heads, D = a->d.head_dim, Sq = a->d.seq;
    const size_t hq = H * D, hk = KV * D, pairs = a->d.batch * H, rep = H / KV;
    const size_t Sk = a->d.kv_seq, off = a->d.kv_len - Sq; /* query row i is key off + i */
    /* A decoding step (Sq = 1) takes the rep query heads that read one kv head as the rows
     * of one tile, all at position off: each key tile is transposed once for the group
     * instead of once per head. Masking row r as if at position off + r changes nothing
     * there, since every key read is at or before off. */
    const int grouped = Sq == 1;
    const size_t units = grouped ? a->d.batch * KV : pairs;
    for (size_t part = part0; part < part1; part++) {
        char *base = a->scratch + part * causal_part_bytes(&a->d, sizeof(T));
        T *kt = (T *)base;
        T *S = (T *)(base + round64(D * TK * sizeof(T)));
        T *acc = (T *)((char *)S + 2 * round64(TQ * TK * sizeof(T)));
        T *mx = (T *)((char *)acc + round64(TQ * D * sizeof(T)));
        T *sum = (T *)((char *)mx + round64(TQ * sizeof(T)));
        for (size_t u = units * part / a->parts; u < units * (part + 1) / a->parts; u++) {
            /* rows: the item's Sq query positions of head h, or the group's rep heads */
            const size_t b = grouped ? u / KV : u / H, h = grouped ? u % KV * rep : u % H;
            const size_t g = h / rep, rows = grouped ? rep : Sq, ld = grouped ? D : hq;
            const size_t lo = a->lo[b], hi = a->hi[b];
            const unsigned char *mask = a->key_mask ? a->key_mask + b * a->d.mask_ld : NULL;
            const T *qh = a->q + b * Sq * hq + h * D;
            const T *kh = a->k + b * Sk * hk + g * D, *vh = a->v + b * Sk * hk + g * D;
            T *ch = a->ctx + b * Sq * hq + h * D, *lse = a->lse + (b * H + h) * Sq;
            for (size_t i0 = 0; i0 < rows; i0 += TQ) {
                const size_t R = rows - i0 < TQ ? rows - i0 : TQ;
                const size_t pos = grouped ? off : off + i0; /* the tile's first row */
                const size_t last = grouped ? off + 1 : off + i0 + R;
                const size_t jend = last < hi ? last : hi;
                for (size_t r = 0; r < R; r++) {
                    mx[r] = -INFINITY;
                    sum[r] = 0;
                }
                memset(acc, 0, R * D * sizeof(T));
                for (size_t j0 = lo; j0 < jend; j0 += TK) {
                    const size_t n = jend - j0 < TK ? jend - j0 : TK;
                    FN(load_kt)(kt, kh + j0 * hk, hk, n, D);
                    FN(tile_scores)(S, qh + i0 * ld, ld, kt, R, D, a->scale);
                    FN(mask_tile)(S, pos, R, j0, n, mask);
                    for (size_t r = 0; r < R; r++) {
                        T *s = S + r * TK, m = mx[r];
#pragma omp simd reduction(max : m)
                        for (size_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
                        if (m == -INFINITY) { /* no key of this row so far */
                            memset(s, 0, n * sizeof(T));
                            continue;
                        }
                        /* exp(-inf) is written as 0: exp_f32 clamps its argument */
                        const T corr = mx[r] == -INFINITY ? 0 : EXP(mx[r] - m);
                        T add = 0;
#pragma omp simd reduction(+ : add)
                        for (size_t j = 0; j < n; j++) {
                            const T e = EXP(s[j] - m);
                            s[j] = s[j] == -INFINITY ? 0 : e;
                            add += s[j];
                        }
                        sum[r] = sum[r] * corr + add;
                        mx[r] = m;
                        if (corr != 1) {
                            T *ar = acc + r * D;
#pragma omp simd
                            for (size_t e = 0; e < D; e++) ar[e] *= corr;
                        }
                    }
                    FN(tile_pv)(acc, D, S, vh + j0 * hk, hk, R, n, D, 1);
                }
                for (size_t r = 0; r < R; r++) {
                    T *cr = ch + (i0 + r) * ld;
                    const T *ar = acc + r * D;
                    if (sum[r] == 0) { /* every key masked */
                        memset(cr, 0, D * sizeof(T));
                        lse[i0 + r] = -INFINITY;
                        continue;
                    }
                    const T inv = (T)1 / sum[r];
                    for (size_t e = 0; e < D; e++) cr[e] = ar[e] * inv;
                    lse[i0 + r] = mx[r] + (T)log((double)sum[r]);
                }
            }
        }
    }
}

static LORA_CLONES LORA_FMA void FN(causal_backward_parts)(void *arg, size_t part0,
                                                           size_t part1) {
    const FN(Causal) *a = arg;
    const size_t H = a->d.heads, KV = a->d.kv_heads, D = a->d.head_dim, Sq = a->d.seq;
    const size_t hq = H * D, hk = KV * D, groups = a->d.batch * KV, rep = H / KV;
    for (size_t part = part0; part < part1; part++) {
        char *base = a->scratch + part * causal_part_bytes(&a->d, sizeof(T));
        T *kt = (T *)base;
        T *P = (T *)(base + round64(D * TK * sizeof(T)));
        T *dS = (T *)((char *)P + round64(TQ * TK * sizeof(T)));
        T *rowdot = (T *)((char *)dS + round64(TQ * TK * sizeof(T)) +
                          round64(TQ * D * sizeof(T)) + 2 * round64(TQ * sizeof(T)));
        for (size_t grp = groups * part / a->parts; grp < groups * (part + 1) / a->parts; grp++) {
            const size_t b = grp / KV, g = grp % KV;
            const size_t lo = a->lo[b], hi = a->hi[b];
            const unsigned char *mask = a->key_mask ? a->key_mask + b * a->d.mask_ld : NULL;
            const T *kh = a->k + b * Sq * hk + g * D, *vh = a->v + b * Sq * hk + g * D;
            T *dkh = a->dk + b * Sq * hk + g * D, *dvh = a->dv + b * Sq * hk + g * D;
            for (size_t j = 0; j < Sq; j++) {
                memset(dkh + j * hk, 0, D * sizeof(T));
                memset(dvh + j * hk, 0, D * sizeof(T));
            }
            for (size_t h = g * rep; h < (g + 1) * rep; h++) {
                const T *qh = a->q + b * Sq * hq + h * D, *doh = a->dctx + b * Sq * hq + h * D;
                const T *oh = a->o + b * Sq * hq + h * D, *lse = a->lse_in + (b * H + h) * Sq;
                T *dqh = a->dq + b * Sq * hq + h * D;
                for (size_t i = 0; i < Sq; i++) memset(dqh + i * hq, 0, D * sizeof(T));
                for (size_t i0 = 0; i0 < Sq; i0 += TQ) {
                    const size_t R = Sq - i0 < TQ ? Sq - i0 : TQ;
                    const size_t jend = i0 + R < hi ? i0 + R : hi;
                    for (size_t r = 0; r < R; r++) {
                        const T *dor = doh + (i0 + r) * hq, *orow = oh + (i0 + r) * hq;
                        T dot = 0;
#pragma omp simd reduction(+ : dot)
                        for (size_t e = 0; e < D; e++) dot += dor[e] * orow[e];
                        rowdot[r] = dot;
                    }
                    for (size_t j0 = lo; j0 < jend; j0 += TK) {
                        const size_t n = jend - j0 < TK ? jend - j0 : TK;
                        FN(load_kt)(kt, kh + j0 * hk, hk, n, D);
                        FN(tile_scores)(P, qh + i0 * hq, hq, kt, R, D, a->scale);
                        FN(mask_tile)(P, i0, R, j0, n, mask);
                        for (size_t r = 0; r < R; r++) {
                            T *p = P + r * TK;
                            const T l = lse[i0 + r];
                            if (l == -INFINITY) { /* a row with no key */
                                memset(p, 0, n * sizeof(T));
                                continue;
                            }
#pragma omp simd
                            for (size_t j = 0; j < n; j++) {
                                const T e = EXP(p[j] - l);
                                p[j] = p[j] == -INFINITY ? 0 : e;
                            }
                        }
                        FN(tile_ptx)(dvh + j0 * hk, hk, P, doh + i0 * hq, hq, R, n, D, 1);
                        FN(load_kt)(kt, vh + j0 * hk, hk, n, D);
                        FN(tile_scores)(dS, doh + i0 * hq, hq, kt, R, D, 1);
                        for (size_t r = 0; r < R; r++) {
                            T *ds = dS + r * TK;
                            const T *p = P + r * TK, rd = rowdot[r];
#pragma omp simd
                            for (size_t j = 0; j < n; j++) ds[j] = p[j] * (ds[j] - rd);
                        }
                        FN(tile_pv)(dqh + i0 * hq, hq, dS, kh + j0 * hk, hk, R, n, D, a->scale);
                        FN(tile_ptx)(dkh + j0 * hk, hk, dS, qh + i0 * hq, hq, R, n, D, a->scale);
                    }
                }
            }
        }
    }
}

void FN(causal_attention_forward)(T *ctx, T *lse, void *scratch, const T *q, const T *k,
                                  const T *v, const unsigned char *key_mask, T scale,
                                  const LoraGqaDims *d, size_t parts) {
    size_t *lo = scratch, *hi = lo + d->batch;
    causal_items(lo, hi, key_mask, d->batch, d->kv_len, d->mask_ld);
    if (!d->batch || !d->seq) return;
    FN(Causal) a = {ctx, lse, NULL, NULL, NULL, (char *)scratch + causal_items_bytes(d),
                    q, k, v, NULL, NULL, NULL, key_mask, lo, hi, scale, parts, *d};
    lora_parallel_for(parts, 1, 1, FN(causal_forward_parts), &a);
}

void FN(causal_attention_backward)(T *dq, T *dk, T *dv, void *scratch, const T *dctx,
                                   const T *q, const T *k, const T *v, const T *ctx,
                                   const T *lse, const unsigned char *key_mask, T scale,
                                   const LoraGqaDims *d, size_t parts) {
    size_t *lo = scratch, *hi = lo + d->batch;
    causal_items(lo, hi, key_mask, d->batch, d->kv_len, d->mask_ld);
    if (!d->batch || !d->seq) return;
    FN(Causal) a = {NULL, NULL, dq, dk, dv, (char *)scratch + causal_items_bytes(d),
                    q, k, v, dctx, ctx, lse, key_mask, lo, hi, scale, parts, *d};
    lora_parallel_for(parts, 1, 1, FN(causal_backward_parts), &a);
}

#undef AVL
#undef TK
#undef TQ
