/* kernels/attention_impl.h: the type-generic bodies of attention.c, INCLUDED TWICE by it
 * (through instantiate.h), once with T = float and once with T = double; FN(name) makes
 * name_f32 / name_f64 and EXP is exp_f32 or exp. Not a header to include anywhere else.
 *
 * q (batch, seq_q, heads*head_dim), k and v (batch, seq_k, heads*head_dim): the layout a
 * Linear projection writes, so no transposed copies of them are made. Head h of item b is the
 * column block [h*head_dim, (h+1)*head_dim) of rows b*seq of q, k, v, ctx.
 *
 *   forward:  S = scale q k^T (+ key mask),  P = softmax(S) per row,  ctx = drop(P) v
 *   backward: dv = drop(P)^T dctx,  dP = drop'(dctx v^T),  dS = P (dP - rowsum(P dP)),
 *             dq = scale dS k,  dk = scale dS^T q
 *
 * One (item, head) pair at a time, start to end, while its operands sit in L1/L2: for MiniLM
 * q, k, v of a head are 16 KB each and its scores 64 KB. The pairs are split over lora's
 * threads. The products are small (128 x 128 x 32) and go through small_gemm below, register-
 * blocked, rather than the BLAS: OpenBLAS spends more on packing and on waking its threads
 * than on the arithmetic at this size (figures in docs/design.md and docs/performance.md).
 *
 * Key mask, per item (see attention_items): all keys when there is no mask; a right-padded
 * mask (ones then zeros) shortens the item's keys to n, so padded keys cost no work; any
 * other mask gives masked keys probability 0; an item with no key at all attends to every
 * key equally (what an additive mask of the most negative float gives in transformers). */

#define AVL (64 / sizeof(T))



/* One block of W = alpha C V: R rows (R = 8 or 1) by two vectors starting at column j of V
 * (row stride ldv), written to out (row stride ldo). The accumulators are named one by one:
 * held in an array, GCC 12 spilled one of the V vectors to the stack inside the loop. */
#define ATTN_ROW(ii)                                                                         \
    do {                                                                                     \
        const T c_ = c[(ii) * cs_i];                                                         \
        a##ii##0 += c_ * v0;                                                                 \
        a##ii##1 += c_ * v1;                                                                 \
    } while (0)
#define ATTN_STORE(ii)                                                                       \
    do {                                                                                     \
        FN(vstore)(out + (ii) * ldo, alpha * a##ii##0);                                      \
        FN(vstore)(out + (ii) * ldo + AVL, alpha * a##ii##1);                                \
    } while (0)

static inline __attribute__((always_inline)) void FN(gemm_block)(
    T *out, size_t ldo, const T *C, size_t cs_i, size_t cs_k, const T *V, size_t ldv, T alpha,
    size_t inner, int R) {
    FN(vec) a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0},
            a31 = {0}, a40 = {0}, a41 = {0}, a50 = {0}, a51 = {0}, a60 = {0}, a61 = {0},
            a70 = {0}, a71 = {0};
    if (R == 8) {
        for (size_t k = 0; k < inner; k++) {
            const FN(vec) v0 = FN(vload)(V + k * ldv), v1 = FN(vload)(V + k * ldv + AVL);
            const T *c = C + k * cs_k;
            ATTN_ROW(0); ATTN_ROW(1); ATTN_ROW(2); ATTN_ROW(3);
            ATTN_ROW(4); ATTN_ROW(5); ATTN_ROW(6); ATTN_ROW(7);
        }
        ATTN_STORE(0); ATTN_STORE(1); ATTN_STORE(2); ATTN_STORE(3);
        ATTN_STORE(4); ATTN_STORE(5); ATTN_STORE(6); ATTN_STORE(7);
    } else {
        for (size_t k = 0; k < inner; k++) {
            const FN(vec) v0 = FN(vload)(V + k * ldv), v1 = FN(vload)(V + k * ldv + AVL);
            const T *c = C + k * cs_k;
            ATTN_ROW(0);
        }
        ATTN_STORE(0);
    }
}
#undef ATTN_ROW
#undef ATTN_STORE

/* The same block for CPUs without AVX-512, with 32-byte vectors, which GCC keeps in AVX2's
 * registers (its 64-byte ones it lowers there with the accumulators and the broadcasts
 * through the stack, which ran small_gemm at 1-2 GFLOP/s): R rows (6 or 1) by two 32-byte
 * vectors, 12 accumulators and 2 of V in 16 registers. */
#define HVL (32 / sizeof(T))

#define ATTN_HROW(ii)                                                                        \
    do {                                                                                     \
        const T c_ = c[(ii) * cs_i];                                                         \
        h##ii##0 += c_ * v0;                                                                 \
        h##ii##1 += c_ * v1;                                                                 \
    } while (0)
#define ATTN_HSTORE(ii)                                                                      \
    do {                                                                                     \
        FN(vstore32)(out + (ii) * ldo, alpha * h##ii##0);                                      \
        FN(vstore32)(out + (ii) * ldo + HVL, alpha * h##ii##1);                                \
    } while (0)

static inline __attribute__((always_inline)) void FN(gemm_block_narrow)(
    T *out, size_t ldo, const T *C, size_t cs_i, size_t cs_k, const T *V, size_t ldv, T alpha,
    size_t inner, int R) {
    FN(vec32) h00 = {0}, h01 = {0}, h10 = {0}, h11 = {0}, h20 = {0}, h21 = {0}, h30 = {0},
             h31 = {0}, h40 = {0}, h41 = {0}, h50 = {0}, h51 = {0};
    if (R == 6) {
        for (size_t k = 0; k < inner; k++) {
            const FN(vec32) v0 = FN(vload32)(V + k * ldv), v1 = FN(vload32)(V + k * ldv + HVL);
            const T *c = C + k * cs_k;
            ATTN_HROW(0); ATTN_HROW(1); ATTN_HROW(2); ATTN_HROW(3); ATTN_HROW(4); ATTN_HROW(5);
        }
        ATTN_HSTORE(0); ATTN_HSTORE(1); ATTN_HSTORE(2); ATTN_HSTORE(3); ATTN_HSTORE(4);
        ATTN_HSTORE(5);
    } else {
        for (size_t k = 0; k < inner; k++) {
            const FN(vec32) v0 = FN(vload32)(V + k * ldv), v1 = FN(vload32)(V + k * ldv + HVL);
            const T *c = C + k * cs_k;
            ATTN_HROW(0);
        }
        ATTN_HSTORE(0);
    }
}
#undef ATTN_HROW
#undef ATTN_HSTORE

/* R <= 8 rows by 2 AVL columns of W = alpha C V, through the block that suits the CPU. */
static inline __attribute__((always_inline)) void FN(gemm_rows)(
    T *out, size_t ldo, const T *C, size_t cs_i, size_t cs_k, const T *V, size_t ldv, T alpha,
    size_t inner, size_t R, int wide) {
    if (wide) {
        if (R == 8)
            FN(gemm_block)(out, ldo, C, cs_i, cs_k, V, ldv, alpha, inner, 8);
        else
            for (size_t ii = 0; ii < R; ii++)
                FN(gemm_block)(out + ii * ldo, ldo, C + ii * cs_i, cs_i, cs_k, V, ldv, alpha,
                               inner, 1);
        return;
    }
    for (size_t half = 0; half < 2 * AVL; half += 2 * HVL) {
        size_t ii = 0;
        for (; ii + 6 <= R; ii += 6)
            FN(gemm_block_narrow)(out + ii * ldo + half, ldo, C + ii * cs_i, cs_i, cs_k,
                                  V + half, ldv, alpha, inner, 6);
        for (; ii < R; ii++)
            FN(gemm_block_narrow)(out + ii * ldo + half, ldo, C + ii * cs_i, cs_i, cs_k,
                                  V + half, ldv, alpha, inner, 1);
    }
}

/* W (rows x cols, row stride ldw) = alpha * C V, overwriting; C(i, k) = C[i*cs_i + k*cs_k]
 * (so C or its transpose, at any row stride) and V (inner x cols, row stride ldv). Eight rows
 * by two vectors of W stay in 16 registers while the inner dimension runs. The last columns
 * (fewer than two vectors) go through `tail`, inner x 2 vectors of scratch holding them
 * zero-padded, so that they run vectorised too. */
static LORA_CLONES LORA_FMA void FN(small_gemm)(T *restrict W, size_t ldw, const T *restrict C,
                                                size_t cs_i, size_t cs_k, const T *restrict V,
                                                size_t ldv, T alpha, size_t rows, size_t cols,
                                                size_t inner, T *restrict tail) {
    const size_t full = cols - cols % (2 * AVL), rest = cols - full;
    const int wide = lora_wide_vectors();
    const size_t RB = wide ? 8 : 12; /* rows per call of gemm_rows: narrow blocks are 6 */
    for (size_t i0 = 0; i0 < rows; i0 += RB) {
        const size_t R = rows - i0 < RB ? rows - i0 : RB;
        for (size_t j = 0; j < full; j += 2 * AVL)
            for (size_t r0 = 0; r0 < R; r0 += 8)
                FN(gemm_rows)(W + (i0 + r0) * ldw + j, ldw, C + (i0 + r0) * cs_i, cs_i, cs_k,
                              V + j, ldv, alpha, inner, R - r0 < 8 ? R - r0 : 8, wide);
    }
    if (!rest) return;
    for (size_t k = 0; k < inner; k++)
        for (size_t j = 0; j < 2 * AVL; j++) tail[k * 2 * AVL + j] = j < rest ? V[k * ldv + full + j] : 0;
    T block[8 * 2 * AVL];
    for (size_t i0 = 0; i0 < rows; i0 += 8) {
        const size_t R = rows - i0 < 8 ? rows - i0 : 8;
        FN(gemm_rows)(block, 2 * AVL, C + i0 * cs_i, cs_i, cs_k, tail, 2 * AVL, alpha, inner, R,
                      wide);
        for (size_t ii = 0; ii < R; ii++)
            memcpy(W + (i0 + ii) * ldw + full, block + ii * 2 * AVL, rest * sizeof(T));
    }
}

/* dst (cols x rows) = src (rows x cols, row stride lds) transposed. */
static void FN(transpose_block)(T *restrict dst, const T *restrict src, size_t lds, size_t rows,
                                size_t cols) {
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++) dst[j * rows + i] = src[i * lds + j];
}

/* Softmax of one row of scores in place, over its first n entries (mode ATTN_PREFIX) or
 * over the keys where mask is set (ATTN_MASKED); ATTN_NONE rows become 1/seq_k. Entries
 * past n are set to 0. */
static LORA_CLONES LORA_FMA void FN(softmax_row)(T *restrict row, size_t n, size_t seq_k, int mode,
                                        const unsigned char *restrict mask) {
    if (mode == ATTN_NONE) {
        for (size_t j = 0; j < seq_k; j++) row[j] = (T)1 / (T)seq_k;
        return;
    }
    T mx = -INFINITY, sum = 0;
    if (mode == ATTN_MASKED) {
        for (size_t j = 0; j < n; j++)
            if (mask[j] && row[j] > mx) mx = row[j];
        for (size_t j = 0; j < n; j++) {
            const T e = EXP(row[j] - mx);
            row[j] = mask[j] ? e : 0;
            sum += row[j];
        }
    } else {
        /* Lane-wise partial max and sum, then a tree over the lanes: an omp simd reduction
         * ends in a chain of AVL dependent scalar adds, which cost more than the row. */
        const size_t full = n - n % AVL;
        T part[AVL];
        for (size_t l = 0; l < AVL; l++) part[l] = -INFINITY;
        for (size_t j = 0; j < full; j += AVL)
#pragma omp simd
            for (size_t l = 0; l < AVL; l++) part[l] = row[j + l] > part[l] ? row[j + l] : part[l];
        for (size_t j = full; j < n; j++) part[0] = row[j] > part[0] ? row[j] : part[0];
        for (size_t w = AVL / 2; w; w /= 2)
            for (size_t l = 0; l < w; l++) part[l] = part[l + w] > part[l] ? part[l + w] : part[l];
        mx = part[0];
        for (size_t l = 0; l < AVL; l++) part[l] = 0;
        for (size_t j = 0; j < full; j += AVL)
#pragma omp simd
            for (size_t l = 0; l < AVL; l++) {
                row[j + l] = EXP(row[j + l] - mx);
                part[l] += row[j + l];
            }
        for (size_t j = full; j < n; j++) {
            row[j] = EXP(row[j] - mx);
            part[0] += row[j];
        }
        for (size_t w = AVL / 2; w; w /= 2)
            for (size_t l = 0; l < w; l++) part[l] += part[l + w];
        sum = part[0];
    }
    const T inv = (T)1 / sum;
#pragma omp simd
    for (size_t j = 0; j < n; j++) row[j] *= inv;
    for (size_t j = n; j < seq_k; j++) row[j] = 0;
}

/* Softmax backward of one row in place: dP (first n entries) becomes dS = P (g - P.g), with
 * g = dP, or dP * keep / (1 - p) under dropout (index: the row's flat index in probs). */
static LORA_CLONES void FN(softmax_backward_row)(T *restrict dP, const T *restrict P, size_t n,
                                                 double p, uint64_t index, uint64_t key,
                                                 uint32_t threshold, T keep_scale) {
    if (p > 0)
        for (size_t j = 0; j < n; j++)
            dP[j] = dropout_keep(key, index + j, threshold) ? dP[j] * keep_scale : 0;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (size_t j = 0; j < n; j++) dot += P[j] * dP[j];
#pragma omp simd
    for (size_t j = 0; j < n; j++) dP[j] = P[j] * (dP[j] - dot);
}

/* Everything a thread needs to run its share of the pairs. */
typedef struct {
    T *ctx, *probs, *dq, *dk, *dv;
    char *scratch;
    const T *q, *k, *v, *dctx;
    const unsigned char *key_mask;
    const size_t *keys;
    const int *mode;
    T scale, keep_scale;
    double p;
    uint64_t key;
    uint32_t threshold;
    size_t parts;
    LoraAttnDims d;
} FN(Attn);

static void FN(forward_parts)(void *arg, size_t part0, size_t part1) {
    const FN(Attn) *a = arg;
    const size_t H = a->d.heads, D = a->d.head_dim, Sq = a->d.seq_q, Sk = a->d.seq_k;
    const size_t hid = H * D, pairs = a->d.batch * H;
    for (size_t part = part0; part < part1; part++) {
        T *kt = (T *)(a->scratch + part * attention_part_bytes(&a->d, sizeof(T)));
        T *dropped = kt + D * Sk, *tail = dropped + Sq * Sk + Sq * Sk;
        for (size_t pair = pairs * part / a->parts; pair < pairs * (part + 1) / a->parts; pair++) {
            const size_t b = pair / H, h = pair % H, n = a->keys[b];
            const unsigned char *mask = a->key_mask ? a->key_mask + b * Sk : NULL;
            T *P = a->probs + pair * Sq * Sk;
            const T *qh = a->q + b * Sq * hid + h * D;
            if (a->mode[b] != ATTN_NONE) {
                FN(transpose_block)(kt, a->k + b * Sk * hid + h * D, hid, n, D);
                FN(small_gemm)(P, Sk, qh, hid, 1, kt, n, a->scale, Sq, n, D, tail);
            }
            for (size_t i = 0; i < Sq; i++) FN(softmax_row)(P + i * Sk, n, Sk, a->mode[b], mask);
            const T *Pd = P;
            if (a->p > 0) {
                FN(dropout_rows)(dropped, P, pair * Sq, Sq, Sk, a->key, a->threshold,
                                 a->keep_scale, 0);
                Pd = dropped;
            }
            FN(small_gemm)(a->ctx + b * Sq * hid + h * D, hid, Pd, Sk, 1,
                           a->v + b * Sk * hid + h * D, hid, 1, Sq, D, n, tail);
        }
    }
}

static void FN(backward_parts)(void *arg, size_t part0, size_t part1) {
    const FN(Attn) *a = arg;
    const size_t H = a->d.heads, D = a->d.head_dim, Sq = a->d.seq_q, Sk = a->d.seq_k;
    const size_t hid = H * D, pairs = a->d.batch * H;
    for (size_t part = part0; part < part1; part++) {
        T *vt = (T *)(a->scratch + part * attention_part_bytes(&a->d, sizeof(T)));
        T *dropped = vt + D * Sk, *dS = dropped + Sq * Sk, *tail = dS + Sq * Sk;
        for (size_t pair = pairs * part / a->parts; pair < pairs * (part + 1) / a->parts; pair++) {
            const size_t b = pair / H, h = pair % H, n = a->keys[b], col = h * D;
            const T *P = a->probs + pair * Sq * Sk, *Pd = P;
            const T *qh = a->q + b * Sq * hid + col, *kh = a->k + b * Sk * hid + col;
            const T *vh = a->v + b * Sk * hid + col, *dch = a->dctx + b * Sq * hid + col;
            if (a->p > 0) {
                FN(dropout_rows)(dropped, P, pair * Sq, Sq, Sk, a->key, a->threshold,
                                 a->keep_scale, 0);
                Pd = dropped;
            }
            FN(small_gemm)(a->dv + b * Sk * hid + col, hid, Pd, 1, Sk, dch, hid, 1, n, D, Sq,
                           tail);
            FN(transpose_block)(vt, vh, hid, n, D);
            FN(small_gemm)(dS, Sk, dch, hid, 1, vt, n, 1, Sq, n, D, tail);
            for (size_t i = 0; i < Sq; i++)
                FN(softmax_backward_row)(dS + i * Sk, P + i * Sk, n, a->p,
                                         ((uint64_t)pair * Sq + i) * Sk, a->key, a->threshold,
                                         a->keep_scale);
            FN(small_gemm)(a->dq + b * Sq * hid + col, hid, dS, Sk, 1, kh, hid, a->scale, Sq, D,
                           n, tail);
            FN(small_gemm)(a->dk + b * Sk * hid + col, hid, dS, 1, Sk, qh, hid, a->scale, n, D,
                           Sq, tail);
        }
    }
}

void FN(attention_forward)(T *ctx, T *probs, void *scratch, const T *q, const T *k, const T *v,
                           const unsigned char *key_mask, T scale, double p, uint64_t seed,
                           const LoraAttnDims *d, size_t parts) {
    size_t *keys = scratch;
    int *mode = (int *)(keys + d->batch);
    attention_items(keys, mode, key_mask, d->batch, d->seq_k);
    if (!d->seq_q || !d->batch) return;
    FN(Attn) a = {ctx, probs, NULL, NULL, NULL, (char *)scratch + attention_items_bytes(d),
                  q, k, v, NULL, key_mask, keys, mode, scale, (T)(1.0 / (1.0 - p)), p,
                  lora_dropout_key(seed), lora_dropout_threshold(p), parts, *d};
    lora_parallel_for(parts, 1, 1, FN(forward_parts), &a);
}

void FN(attention_backward)(T *dq, T *dk, T *dv, void *scratch, const T *dctx, const T *q,
                            const T *k, const T *v, const T *probs,
                            const unsigned char *key_mask, T scale, double p, uint64_t seed,
                            const LoraAttnDims *d, size_t parts) {
    const size_t Sk = d->seq_k, hid = d->heads * d->head_dim;
    size_t *keys = scratch;
    int *mode = (int *)(keys + d->batch);
    attention_items(keys, mode, key_mask, d->batch, Sk);
    for (size_t b = 0; b < d->batch; b++) { /* keys past an item's length get no gradient */
        const size_t n = d->seq_q ? keys[b] : 0;
        memset(dk + (b * Sk + n) * hid, 0, (Sk - n) * hid * sizeof(T));
        memset(dv + (b * Sk + n) * hid, 0, (Sk - n) * hid * sizeof(T));
    }
    if (!d->seq_q || !d->batch) return;
    FN(Attn) a = {NULL, (T *)probs, dq, dk, dv, (char *)scratch + attention_items_bytes(d),
                  q, k, v, dctx, key_mask, keys, mode, scale, (T)(1.0 / (1.0 - p)), p,
                  lora_dropout_key(seed), lora_dropout_threshold(p), parts, *d};
    lora_parallel_for(parts, 1, 1, FN(backward_parts), &a);
}

#undef AVL
#undef HVL
