/* kernels/lora_impl.h: the type-generic bodies of lora.c, INCLUDED TWICE by it (through
 * instantiate.h), once with T = float and once with T = double; FN(name) makes name_f32 /
 * name_f64 and GEMM, GEMV, GER name the BLAS routines of that type. Not a header to include
 * anywhere else.
 *
 * Holds the LoRA layer (forward, backward, merge and its naive spec), the dense layer, and
 * the row kernels they are built from (the bias fill, rank_update, row_dots, transpose), and,
 * through multi_impl.h, the forward of batches mixing adapters.
 * Row-major throughout; see kernels.h for shapes.
 */

#define ROW CblasRowMajor
#define NT CblasNoTrans
#define TR CblasTrans

/* y (n, d_out) = res + bias rows (either may be NULL), so the GEMM that follows accumulates
 * with beta = 1: OpenBLAS makes a separate pass over C for any other beta, so the fill is
 * free, and a residual added here costs no pass of its own. Returns beta. Large fills are
 * split by rows over lora's threads, as OpenBLAS's own pass over C would be, so that the
 * second core does not sit idle through them. */
typedef struct {
    T *y;
    const T *bias, *res;
    size_t d_out;
} FN(Fill);

static void FN(fill_rows)(void *arg, size_t begin, size_t end) {
    const FN(Fill) *f = arg;
    const size_t d_out = f->d_out;
    for (size_t i = begin; i < end; i++) {
        T *yi = f->y + i * d_out;
        if (!f->res) {
            memcpy(yi, f->bias, d_out * sizeof(T));
            continue;
        }
        const T *ri = f->res + i * d_out;
        if (!f->bias)
            memcpy(yi, ri, d_out * sizeof(T));
        else
            for (size_t j = 0; j < d_out; j++) yi[j] = ri[j] + f->bias[j];
    }
}

static T FN(fill_init)(T *y, const T *bias, const T *res, size_t n, size_t d_out) {
    if (!bias && !res) return (T)0;
    FN(Fill) f = {y, bias, res, d_out};
    lora_parallel_for(n, (1 << 18) / d_out + 1, 1, FN(fill_rows), &f);
    return (T)1;
}

/* W (rows, cols) += scale * C V, where C(i, k) = C[i*cs_i + k*cs_k] and V is (r, cols),
 * r < LORA_GEMM_RANK. Accumulates into W, or with `overwrite` sets W = init + scale * C V
 * (init a row of cols, broadcast down the rows; NULL for zeros) without reading W. One
 * streaming pass over W: each element is read (unless overwritten) and written once, while
 * rows of V come from L1/L2. Register-blocked like a GEMM
 * micro-kernel: a 4-row x 4-vector tile of W sits in 16 vector registers while the r
 * rank-1 terms are added, so the loop runs on FMAs, not on loads and stores. The
 * readable spec is lora_merge_naive below. */
#define VL (64 / sizeof(T))
#define TILE_COLS (4 * VL)

/* The tile for CPUs without AVX-512: 4 rows x two 32-byte vectors (8 accumulators and 2 of
 * V in AVX2's 16 registers; the 4 x 4 64-byte tile above, lowered for AVX2, kept its
 * accumulators on the stack and ran the LoRA forward at about 2x the base GEMM's time at
 * r = 16 instead of the few percent of the AVX-512 figures). rank_update runs it four times
 * over a tile's columns. */
#define RVL (32 / sizeof(T))

static inline __attribute__((always_inline)) void FN(rank_tile_narrow)(
    T *w0, T *w1, T *w2, T *w3, const T *V, size_t cols, T (*c)[LORA_GEMM_RANK], size_t r,
    int overwrite, const T *init) {
    FN(vec32) a00, a01, a10, a11, a20, a21, a30, a31;
    if (overwrite) {
        const FN(vec32) zero = {0};
        const FN(vec32) b0 = init ? FN(vload32)(init) : zero, b1 = init ? FN(vload32)(init + RVL) : zero;
        a00 = a10 = a20 = a30 = b0, a01 = a11 = a21 = a31 = b1;
    } else {
        a00 = FN(vload32)(w0), a01 = FN(vload32)(w0 + RVL), a10 = FN(vload32)(w1);
        a11 = FN(vload32)(w1 + RVL), a20 = FN(vload32)(w2), a21 = FN(vload32)(w2 + RVL);
        a30 = FN(vload32)(w3), a31 = FN(vload32)(w3 + RVL);
    }
    for (size_t k = 0; k < r; k++) {
        const FN(vec32) v0 = FN(vload32)(V + k * cols), v1 = FN(vload32)(V + k * cols + RVL);
        const T c0 = c[0][k], c1 = c[1][k], c2 = c[2][k], c3 = c[3][k];
        a00 += c0 * v0, a01 += c0 * v1, a10 += c1 * v0, a11 += c1 * v1;
        a20 += c2 * v0, a21 += c2 * v1, a30 += c3 * v0, a31 += c3 * v1;
    }
    FN(vstore32)(w0, a00), FN(vstore32)(w0 + RVL, a01), FN(vstore32)(w1, a10);
    FN(vstore32)(w1 + RVL, a11), FN(vstore32)(w2, a20), FN(vstore32)(w2 + RVL, a21);
    FN(vstore32)(w3, a30), FN(vstore32)(w3 + RVL, a31);
}

static LORA_CLONES LORA_FMA void FN(rank_update)(T *restrict W, const T *restrict C, size_t cs_i,
                                                 size_t cs_k, const T *restrict V, T scale,
                                                 size_t rows, size_t cols, size_t r,
                                                 int overwrite, const T *restrict init) {
    T c[4][LORA_GEMM_RANK];
    const size_t full_cols = cols - cols % TILE_COLS;
    const FN(vec) zero = {0};
    const int wide = lora_wide_vectors();
    for (size_t i0 = 0; i0 < rows; i0 += 4) {
        const size_t nr = rows - i0 < 4 ? rows - i0 : 4;
        for (size_t ii = 0; ii < 4; ii++)
            for (size_t k = 0; k < r; k++)
                c[ii][k] = ii < nr ? scale * C[(i0 + ii) * cs_i + k * cs_k] : (T)0;
        T *w0 = W + i0 * cols, *w1 = w0 + (nr > 1) * cols, *w2 = w0 + (nr > 2) * 2 * cols,
          *w3 = w0 + (nr > 3) * 3 * cols;
        for (size_t j = 0; nr == 4 && j < full_cols; j += TILE_COLS) {
            if (!wide) {
                for (size_t sub = j; sub < j + TILE_COLS; sub += 2 * RVL)
                    FN(rank_tile_narrow)(w0 + sub, w1 + sub, w2 + sub, w3 + sub, V + sub, cols,
                                         c, r, overwrite, init ? init + sub : NULL);
                continue;
            }
            FN(vec) a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;
            if (overwrite) {
                const FN(vec) b0 = init ? FN(vload)(init + j) : zero,
                              b1 = init ? FN(vload)(init + j + VL) : zero,
                              b2 = init ? FN(vload)(init + j + 2 * VL) : zero,
                              b3 = init ? FN(vload)(init + j + 3 * VL) : zero;
                a00 = a10 = a20 = a30 = b0, a01 = a11 = a21 = a31 = b1;
                a02 = a12 = a22 = a32 = b2, a03 = a13 = a23 = a33 = b3;
            } else {
                a00 = FN(vload)(w0 + j), a01 = FN(vload)(w0 + j + VL);
                a02 = FN(vload)(w0 + j + 2 * VL), a03 = FN(vload)(w0 + j + 3 * VL);
                a10 = FN(vload)(w1 + j), a11 = FN(vload)(w1 + j + VL);
                a12 = FN(vload)(w1 + j + 2 * VL), a13 = FN(vload)(w1 + j + 3 * VL);
                a20 = FN(vload)(w2 + j), a21 = FN(vload)(w2 + j + VL);
                a22 = FN(vload)(w2 + j + 2 * VL), a23 = FN(vload)(w2 + j + 3 * VL);
                a30 = FN(vload)(w3 + j), a31 = FN(vload)(w3 + j + VL);
                a32 = FN(vload)(w3 + j + 2 * VL), a33 = FN(vload)(w3 + j + 3 * VL);
            }
            for (size_t k = 0; k < r; k++) {
                const T *v = V + k * cols + j;
                const FN(vec) v0 = FN(vload)(v), v1 = FN(vload)(v + VL),
                              v2 = FN(vload)(v + 2 * VL), v3 = FN(vload)(v + 3 * VL);
                const T c0 = c[0][k], c1 = c[1][k], c2 = c[2][k], c3 = c[3][k];
                a00 += c0 * v0, a01 += c0 * v1, a02 += c0 * v2, a03 += c0 * v3;
                a10 += c1 * v0, a11 += c1 * v1, a12 += c1 * v2, a13 += c1 * v3;
                a20 += c2 * v0, a21 += c2 * v1, a22 += c2 * v2, a23 += c2 * v3;
                a30 += c3 * v0, a31 += c3 * v1, a32 += c3 * v2, a33 += c3 * v3;
            }
            FN(vstore)(w0 + j, a00), FN(vstore)(w0 + j + VL, a01);
            FN(vstore)(w0 + j + 2 * VL, a02), FN(vstore)(w0 + j + 3 * VL, a03);
            FN(vstore)(w1 + j, a10), FN(vstore)(w1 + j + VL, a11);
            FN(vstore)(w1 + j + 2 * VL, a12), FN(vstore)(w1 + j + 3 * VL, a13);
            FN(vstore)(w2 + j, a20), FN(vstore)(w2 + j + VL, a21);
            FN(vstore)(w2 + j + 2 * VL, a22), FN(vstore)(w2 + j + 3 * VL, a23);
            FN(vstore)(w3 + j, a30), FN(vstore)(w3 + j + VL, a31);
            FN(vstore)(w3 + j + 2 * VL, a32), FN(vstore)(w3 + j + 3 * VL, a33);
        }
        /* Row and column remainders: a row at a time, one axpy per rank-1 term (vectorised
         * along the row, the same order of additions as the tiles). A mixed-adapter batch
         * sends many one-row tiles here. */
        for (size_t ii = 0; ii < nr; ii++) {
            T *restrict w = W + (i0 + ii) * cols;
            const size_t j0 = nr == 4 ? full_cols : 0;
            if (overwrite)
                for (size_t j = j0; j < cols; j++) w[j] = init ? init[j] : (T)0;
            for (size_t k = 0; k < r; k++) {
                const T ck = c[ii][k];
                const T *restrict v = V + k * cols;
                for (size_t j = j0; j < cols; j++) w[j] += ck * v[j];
            }
        }
    }
}
typedef struct {
    T *W;
    const T *C, *V, *init;
    size_t cs_i, cs_k, cols, r;
    T scale;
    int overwrite;
} FN(RankUpdate);

static void FN(rank_update_rows)(void *arg, size_t begin, size_t end) {
    const FN(RankUpdate) *u = arg;
    FN(rank_update)(u->W + begin * u->cols, u->C + begin * u->cs_i, u->cs_i, u->cs_k, u->V,
                    u->scale, end - begin, u->cols, u->r, u->overwrite, u->init);
}

/* rank_update split by rows over lora's threads, at least ~1 MB of W per thread: at small
 * rank it is memory-bound and one core cannot saturate memory. Used by merge and by the
 * forward and backward (y = bias + s xa B^T, dx = s g A), between GEMMs, whose jobs run on
 * the same thread pool (see lora_parallel_for). */
static void FN(rank_update_parallel)(T *W, const T *C, size_t cs_i, size_t cs_k, const T *V,
                                     T scale, size_t rows, size_t cols, size_t r, int overwrite,
                                     const T *init) {
    FN(RankUpdate) u = {W, C, V, init, cs_i, cs_k, cols, r, scale, overwrite};
    lora_parallel_for(rows, (1 << 18) / cols + 4, 4, FN(rank_update_rows), &u);
}

/* out[i*ldo + k] = dot(X row i, V row k) for R rows of X and KB rows of V, all of length K:
 * R x KB vector accumulators, one pass over the rows. R and KB are constants at each call
 * site, so the loops unroll into registers. */
static inline __attribute__((always_inline)) void FN(dot_block)(T *out, size_t ldo, const T *X,
                                                                 const T *V, size_t K, int R,
                                                                 int KB) {
    FN(vec) acc[4][4] = {{{0}}};
    const size_t full = K - K % VL;
    for (size_t j = 0; j < full; j += VL) {
        FN(vec) xv[4], vv[4];
        for (int ii = 0; ii < R; ii++) xv[ii] = FN(vload)(X + ii * K + j);
        for (int kk = 0; kk < KB; kk++) vv[kk] = FN(vload)(V + kk * K + j);
        for (int ii = 0; ii < R; ii++)
            for (int kk = 0; kk < KB; kk++) acc[ii][kk] += xv[ii] * vv[kk];
    }
    /* The lanes of each accumulator summed: by a shuffle tree for a full 4 x 4 float32
     * block, lane by lane otherwise (R and KB are constants here, so `tree` is too). */
    T tree_sums[4][4];
    int tree = 0;
#if defined(LORA_HSUM16) && defined(LORA_T_IS_F32)
    if (R == 4 && KB == 4) {
        lora_v16 flat[16];
        for (int m = 0; m < 16; m++) flat[m] = acc[m / 4][m % 4];
        const lora_v16 s = hsum16(flat);
        for (int m = 0; m < 16; m++) tree_sums[m / 4][m % 4] = s[m];
        tree = 1;
    }
#endif
    for (int ii = 0; ii < R; ii++)
        for (int kk = 0; kk < KB; kk++) {
            T sum = 0;
            if (tree)
                sum = tree_sums[ii][kk];
            else
                for (size_t l = 0; l < VL; l++) sum += acc[ii][kk][l];
            for (size_t j = full; j < K; j++) sum += X[ii * K + j] * V[kk * K + j];
            out[ii * ldo + kk] = sum;
        }
}

/* out (rows, r) = X (rows, K) V^T with V (r, K), overwriting out: x A^T for one tile of rows
 * (a dropout tile, a tile of the forward's or the backward's row pass), where a small GEMM
 * would run single-threaded in OpenBLAS with its packing overhead. Each row of X is read
 * once, 4 rows at a time against 4 rows of V in L1/L2. */
/* dot_block for CPUs without AVX-512: R <= 4 rows of X by KB <= 2 rows of V in 32-byte
 * vectors (8 accumulators, 4 + 2 loads: 14 of AVX2's 16 registers; the 4 x 4 64-byte block
 * above spilled there). */
static inline __attribute__((always_inline)) void FN(dot_block_narrow)(
    T *out, size_t ldo, const T *X, const T *V, size_t K, int R, int KB) {
    FN(vec32) acc[4][2] = {{{0}}};
    const size_t full = K - K % RVL;
    for (size_t j = 0; j < full; j += RVL) {
        FN(vec32) xv[4], vv[2];
        for (int ii = 0; ii < R; ii++) xv[ii] = FN(vload32)(X + ii * K + j);
        for (int kk = 0; kk < KB; kk++) vv[kk] = FN(vload32)(V + kk * K + j);
        for (int ii = 0; ii < R; ii++)
            for (int kk = 0; kk < KB; kk++) acc[ii][kk] += xv[ii] * vv[kk];
    }
    for (int ii = 0; ii < R; ii++)
        for (int kk = 0; kk < KB; kk++) {
            T sum = 0;
            for (size_t l = 0; l < RVL; l++) sum += acc[ii][kk][l];
            for (size_t j = full; j < K; j++) sum += X[ii * K + j] * V[kk * K + j];
            out[ii * ldo + kk] = sum;
        }
}

static LORA_CLONES LORA_FMA void FN(row_dots)(T *restrict out, const T *restrict X,
                                              const T *restrict V, size_t rows, size_t K,
                                              size_t r) {
    size_t i = 0;
    if (!lora_wide_vectors()) {
        for (; i + 4 <= rows; i += 4) {
            size_t k = 0;
            for (; k + 2 <= r; k += 2)
                FN(dot_block_narrow)(out + i * r + k, r, X + i * K, V + k * K, K, 4, 2);
            for (; k < r; k++)
                FN(dot_block_narrow)(out + i * r + k, r, X + i * K, V + k * K, K, 4, 1);
        }
        for (; i < rows; i++) {
            size_t k = 0;
            for (; k + 2 <= r; k += 2)
                FN(dot_block_narrow)(out + i * r + k, r, X + i * K, V + k * K, K, 1, 2);
            for (; k < r; k++)
                FN(dot_block_narrow)(out + i * r + k, r, X + i * K, V + k * K, K, 1, 1);
        }
        return;
    }
    for (; i + 4 <= rows; i += 4) {
        size_t k = 0;
        for (; k + 4 <= r; k += 4) FN(dot_block)(out + i * r + k, r, X + i * K, V + k * K, K, 4, 4);
        for (; k < r; k++) FN(dot_block)(out + i * r + k, r, X + i * K, V + k * K, K, 4, 1);
    }
    for (; i < rows; i++) {
        size_t k = 0;
        for (; k + 4 <= r; k += 4) FN(dot_block)(out + i * r + k, r, X + i * K, V + k * K, K, 1, 4);
        for (; k < r; k++) FN(dot_block)(out + i * r + k, r, X + i * K, V + k * K, K, 1, 1);
    }
}
#undef VL
#undef RVL
#undef TILE_COLS

/* dst (r, d) = src (d, r) transposed: B^T made contiguous for the row kernels. In blocks of
 * 16 rows of src, so each row of dst gets a whole cache line at a time: row by row, the r
 * writes go to lines d elements apart, which for d a multiple of 1024 all fall into one L1
 * set and thrash it. */
static void FN(transpose)(T *dst, const T *src, size_t d, size_t r) {
    for (size_t i0 = 0; i0 < d; i0 += 16) {
        const size_t i1 = d - i0 < 16 ? d : i0 + 16;
        for (size_t k = 0; k < r; k++)
            for (size_t i = i0; i < i1; i++) dst[k * d + i] = src[i * r + k];
    }
}

/* y (d_out) = W x + beta y for one row x (d_in), W (d_out, d_in): 4 rows of W at a time
 * against x (which stays in L1), rows split over lora's threads. One token's decode step is
 * all such products and bound by the bandwidth that streams W; OpenBLAS's sgemv threads only
 * its larger shapes and reads W at about 15 GB/s a core here (docs/performance.md). */
typedef struct {
    T *y;
    const T *W, *x;
    T beta;
    size_t d_in;
} FN(Gemv);

static LORA_CLONES LORA_FMA void FN(gemv_rows)(void *arg, size_t begin, size_t end) {
    const FN(Gemv) *g = arg;
    const size_t K = g->d_in;
    const T *restrict x = g->x;
    size_t i = begin;
    for (; i + 4 <= end; i += 4) {
        const T *restrict w0 = g->W + i * K, *restrict w1 = w0 + K, *restrict w2 = w1 + K,
                *restrict w3 = w2 + K;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (size_t j = 0; j < K; j++) {
            s0 += w0[j] * x[j];
            s1 += w1[j] * x[j];
            s2 += w2[j] * x[j];
            s3 += w3[j] * x[j];
        }
        T *yi = g->y + i;
        if (g->beta != 0)
            s0 += g->beta * yi[0], s1 += g->beta * yi[1], s2 += g->beta * yi[2], s3 += g->beta * yi[3];
        yi[0] = s0, yi[1] = s1, yi[2] = s2, yi[3] = s3;
    }
    for (; i < end; i++) {
        const T *restrict w = g->W + i * K;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (size_t j = 0; j < K; j++) s += w[j] * x[j];
        g->y[i] = s + (g->beta != 0 ? g->beta * g->y[i] : 0);
    }
}

static void FN(gemv)(T *y, const T *W, const T *x, T beta, size_t d_out, size_t d_in) {
    FN(Gemv) g = {y, W, x, beta, d_in};
    lora_parallel_for(d_out, (1 << 15) / (d_in + 1) + 4, 4, FN(gemv_rows), &g);
}

/* The base layer's products with W (d_out, d_in), or with W stored (d_in, d_out) when wt
 * (PEFT's fan_in_fan_out, GPT-2's Conv1D), read in place either way:
 *   base_forward:  y  = x W^T + beta y     (n, d_out)
 *   base_backward: dx = dy W + beta dx     (n, d_in)
 * or, given pk, with W packed for that product (W^T's panels forward, W's backward; W and wt
 * are then not read), or given a pk with a qtype, with W quantized (quant.c: pk->panels the
 * blocks, pk->xp the tile). One row (n = 1) of an unpacked W goes through gemv. */
static void FN(base_forward)(T *y, const T *x, const T *W, int wt, T beta, size_t n, size_t d_in,
                             size_t d_out, const LoraPacked *pk) {
    if (pk && pk->qtype)
        FN(quant_forward)(y, pk->xp, x, pk->panels, pk->qtype, pk->act8, beta, n, d_in, d_out);
    else if (pk) {
        if (beta == 0) memset(y, 0, n * d_out * sizeof(T));
        FN(panel_gemm)(y, pk->xp, x, pk->panels, n, d_in, d_out, pk->parts);
    } else if (n == 1 && !wt)
        FN(gemv)(y, W, x, beta, d_out, d_in);
    else if (n == 1)
        GEMV(ROW, TR, (int)d_in, (int)d_out, 1, W, (int)d_out, x, 1, beta, y, 1);
    else
        GEMM(ROW, NT, wt ? NT : TR, (int)n, (int)d_out, (int)d_in, 1, x, (int)d_in, W,
             wt ? (int)d_out : (int)d_in, beta, y, (int)d_out);
}

static void FN(base_backward)(T *dx, const T *dy, const T *W, int wt, T beta, size_t n,
                              size_t d_in, size_t d_out, const LoraPacked *pk) {
    if (pk && pk->qtype)
        FN(quant_backward)(dx, pk->xp, dy, pk->panels, pk->qtype, beta, n, d_in, d_out);
    else if (pk) {
        if (beta == 0) memset(dx, 0, n * d_in * sizeof(T));
        FN(panel_gemm)(dx, pk->xp, dy, pk->panels, n, d_out, d_in, pk->parts);
    } else if (n == 1 && !wt)
        GEMV(ROW, TR, (int)d_out, (int)d_in, 1, W, (int)d_in, dy, 1, beta, dx, 1);
    else if (n == 1)
        GEMV(ROW, NT, (int)d_in, (int)d_out, 1, W, (int)d_out, dy, 1, beta, dx, 1);
    else
        GEMM(ROW, NT, wt ? TR : NT, (int)n, (int)d_in, (int)d_out, 1, dy, (int)d_out, W,
             wt ? (int)d_out : (int)d_in, beta, dx, (int)d_in);
}

/* The forward's LoRA branch for rows [begin, end), r < LORA_GEMM_RANK, no dropout: per tile
 * of LORA_BWD_TILE rows, xa = x A^T (row_dots) and then y = init + scale * xa B^T
 * (rank_update, Bt = B^T), where init is the bias, or res + bias filled into the tile just
 * before, while it is in cache. One pass over x and y on lora's threads, in place of a skinny
 * OpenBLAS GEMM (far below its peak at small r) and a pass of its own for the residual. */
typedef struct {
    T *y, *xa;
    const T *x, *A, *Bt, *bias, *res;
    T scale;
    size_t d_in, d_out, r;
} FN(ForwardRows);

static void FN(forward_rows)(void *arg, size_t begin, size_t end) {
    const FN(ForwardRows) *a = arg;
    const size_t d_in = a->d_in, d_out = a->d_out, r = a->r;
    for (size_t i0 = begin; i0 < end; i0 += LORA_BWD_TILE) {
        const size_t rows = end - i0 < LORA_BWD_TILE ? end - i0 : LORA_BWD_TILE;
        T *yt = a->y + i0 * d_out, *xat = a->xa + i0 * r;
        FN(row_dots)(xat, a->x + i0 * d_in, a->A, rows, d_in, r);
        if (a->res) { /* this thread's tile only: no threads of its own */
            FN(Fill) f = {yt, a->bias, a->res + i0 * d_out, d_out};
            FN(fill_rows)(&f, 0, rows);
        }
        FN(rank_update)(yt, xat, r, 1, a->Bt, a->scale, rows, d_out, r, !a->res, a->bias);
    }
}

/* Forward of a LoRA linear layer, overwriting y and xa:
 *   xa = drop(x) A^T            (n, r), kept for the backward
 *   y  = x W^T + bias + scale * xa B^T (+ res, a residual (n, d_out), when not NULL)
 * x is (n, d_in), W is (d_out, d_in) ((d_in, d_out) when wt), A is (r, d_in), B is (d_out, r);
 * row-major.
 * For r < LORA_GEMM_RANK the LoRA branch is written first, y = bias + scale * xa B^T (the
 * pass that fills the bias anyway), and the base GEMM accumulates onto it with beta = 1:
 * beyond the base GEMM the layer costs one read of x and r FMAs per element of y. Without
 * dropout, xa is computed in that same threaded pass (forward_rows), at every batch size, on
 * two threads from ~16k elements of x and y and a tile of rows each: x is read once, while
 * it is in cache, and no OpenBLAS threads are woken for a skinny x A^T.
 * scratch: lora_scratch_elems(n, d_in, d_out, r, p > 0, 1) elements. n = 1 goes through gemv,
 * which OpenBLAS does not do on its own for a one-row gemm (its gemm is much slower there). */
void FN(lora_forward)(T *y, T *xa, T *scratch, const T *x, const T *W, const T *bias,
                      const T *res, const T *A, const T *B, T scale, double p, uint64_t seed,
                      size_t n, size_t d_in, size_t d_out, size_t r, int wt,
                      const LoraPacked *pk) {
    if (n == 0) return;
    const int drop = p > 0.0;
    const uint64_t key = lora_dropout_key(seed);
    const uint32_t threshold = lora_dropout_threshold(p);
    const T keep_scale = (T)(1.0 / (1.0 - p));
    T *Bt = scratch, *tile = scratch + r * d_out;
    if (n == 1) {
        const T beta = FN(fill_init)(y, bias, res, n, d_out);
        const T *xin = x;
        if (drop) {
            FN(dropout_rows)(tile, x, 0, 1, d_in, key, threshold, keep_scale, 0);
            xin = tile;
        }
        FN(base_forward)(y, x, W, wt, beta, 1, d_in, d_out, pk);
        GEMV(ROW, NT, (int)r, (int)d_in, 1, A, (int)d_in, xin, 1, 0, xa, 1);
        GEMV(ROW, NT, (int)d_out, (int)r, scale, B, (int)r, xa, 1, 1, y, 1);
        return;
    }
    /* With no dropout (and a rank for the row kernels), xa is computed in the pass that
     * writes y (below). */
    const int row_pass = !drop && r < LORA_GEMM_RANK;
    if (drop) {
        /* The dropped input exists one tile of rows at a time, never as an n x d_in copy. */
        for (size_t i0 = 0; i0 < n; i0 += LORA_DROPOUT_TILE_ROWS) {
            size_t rows = n - i0 < LORA_DROPOUT_TILE_ROWS ? n - i0 : LORA_DROPOUT_TILE_ROWS;
            FN(dropout_rows)(tile, x + i0 * d_in, i0, rows, d_in, key, threshold, keep_scale,
                             0);
            FN(row_dots)(xa + i0 * r, tile, A, rows, d_in, r);
        }
    } else if (!row_pass) {
        GEMM(ROW, NT, TR, (int)n, (int)r, (int)d_in, 1, x, (int)d_in, A, (int)d_in, 0, xa,
             (int)r);
    }
    if (r < LORA_GEMM_RANK) {
        FN(transpose)(Bt, B, d_out, r);
        if (row_pass) {
            FN(ForwardRows) rows = {y, xa, x, A, Bt, bias, res, scale, d_in, d_out, r};
            lora_parallel_for(n, (1 << 14) / (d_in + d_out) + LORA_BWD_TILE, 4,
                              FN(forward_rows), &rows);
        } else {
            if (res) FN(fill_init)(y, bias, res, n, d_out);
            FN(rank_update_parallel)(y, xa, r, 1, Bt, scale, n, d_out, r, !res, bias);
        }
        FN(base_forward)(y, x, W, wt, 1, n, d_in, d_out, pk);
    } else {
        const T beta = FN(fill_init)(y, bias, res, n, d_out);
        FN(base_forward)(y, x, W, wt, beta, n, d_in, d_out, pk);
        GEMM(ROW, NT, TR, (int)n, (int)d_out, (int)r, scale, xa, (int)r, B, (int)r, 1, y,
             (int)d_out);
    }
}

/* One part of the backward's row pass (rows [begin, end) of the batch), for r < LORA_GEMM_RANK:
 * each tile of LORA_BWD_TILE rows is read from memory once, and while it is in cache
 *   g    = dy B                      (row_dots against B^T)
 *   dBt += xa^T dy                   (this part's (r, d_out) sum, unscaled)
 *   dA  += g^T drop(x)               (this part's (r, d_in) sum, unscaled)
 *   dx   = scale drop'(g A)          (overwritten, or added with acc; the base GEMM adds
 *                                    dy W afterwards)
 * OpenBLAS runs these skinny products far below bandwidth and does not split the long n
 * dimension over threads; here each thread takes a range of rows. */
typedef struct {
    T *dx, *g, *parts;
    const T *dy, *x, *xa, *A, *Bt;
    T scale, keep_scale;
    int drop, acc;
    uint64_t key;
    uint32_t threshold;
    size_t n, d_in, d_out, r, nparts;
} FN(BackwardRows);

static void FN(backward_part)(void *arg, size_t part0, size_t part1) {
    const FN(BackwardRows) *a = arg;
    const size_t d_in = a->d_in, d_out = a->d_out, r = a->r;
    for (size_t part = part0; part < part1; part++) {
        T *dBt = a->parts + part * lora_part_elems(d_in, d_out, r, a->drop), *dA = dBt + r * d_out;
        T *tile = dA + r * d_in;
        const size_t begin = a->n * part / a->nparts, end = a->n * (part + 1) / a->nparts;
        for (size_t i0 = begin; i0 < end; i0 += LORA_BWD_TILE) {
            const size_t rows = end - i0 < LORA_BWD_TILE ? end - i0 : LORA_BWD_TILE;
            const int first = i0 == begin;
            const T *dyt = a->dy + i0 * d_out, *xin = a->x + i0 * d_in;
            T *gt = a->g + i0 * r;
            FN(row_dots)(gt, dyt, a->Bt, rows, d_out, r);
            FN(rank_update)(dBt, a->xa + i0 * r, 1, r, dyt, 1, r, d_out, rows, first, NULL);
            if (a->drop) {
                FN(dropout_rows)(tile, xin, i0, rows, d_in, a->key, a->threshold, a->keep_scale,
                                 0);
                xin = tile;
            }
            FN(rank_update)(dA, gt, 1, r, xin, 1, r, d_in, rows, first, NULL);
            if (!a->dx) continue;
            if (!a->drop) {
                FN(rank_update)(a->dx + i0 * d_in, gt, r, 1, a->A, a->scale, rows, d_in, r,
                                !a->acc, NULL);
            } else { /* the mask, regenerated, on the LoRA branch's input gradient */
                FN(rank_update)(tile, gt, r, 1, a->A, 1, rows, d_in, r, 1, NULL);
                FN(dropout_rows)(a->dx + i0 * d_in, tile, i0, rows, d_in, a->key, a->threshold,
                                 a->scale * a->keep_scale, a->acc);
            }
        }
    }
}

/* Backward of lora_forward, overwriting dx (when not NULL; added to what dx holds with
 * `acc`), dA and dB:
 *   g  = dy B                   (n, r), computed once, in scratch
 *   dB = scale * dy^T xa        (d_out, r)
 *   dA = scale * g^T drop(x)    (r, d_in)
 *   dx = scale * drop'(g A) + dy W, the LoRA term written first and the base GEMM
 *        accumulating onto it (beta = 1), as in the forward.
 * W is frozen: no dW, which is what makes a LoRA step cheaper than full fine-tuning.
 * For r < LORA_GEMM_RANK and n >= LORA_BWD_ROW_PASS_MIN the LoRA terms are one pass over the
 * rows of dy and x split into `parts` ranges over lora's threads (backward_part;
 * lora_backward_parts says how many), whose partial dA and dB are then summed. Otherwise
 * OpenBLAS GEMMs, which are as fast for small batches (docs/performance.md).
 * scratch: lora_scratch_elems(n, d_in, d_out, r, p > 0, parts) elements. */
void FN(lora_backward)(T *dx, T *dA, T *dB, T *scratch, const T *dy, const T *x, const T *xa,
                       const T *W, const T *A, const T *B, T scale, double p, uint64_t seed,
                       size_t n, size_t d_in, size_t d_out, size_t r, size_t parts, int wt,
                       int acc, const LoraPacked *pk) {
    if (n == 0) {
        memset(dA, 0, r * d_in * sizeof(T));
        memset(dB, 0, d_out * r * sizeof(T));
        return;
    }
    const int drop = p > 0.0;
    const uint64_t key = lora_dropout_key(seed);
    const uint32_t threshold = lora_dropout_threshold(p);
    const T keep_scale = (T)(1.0 / (1.0 - p));
    T *g = scratch, *tile = scratch + n * r;
    if (n == 1) {
        GEMV(ROW, TR, (int)d_out, (int)r, 1, B, (int)r, dy, 1, 0, g, 1);
        memset(dB, 0, d_out * r * sizeof(T));
        GER(ROW, (int)d_out, (int)r, scale, dy, 1, xa, 1, dB, (int)r);
        const T *xin = x;
        if (drop) {
            FN(dropout_rows)(tile, x, 0, 1, d_in, key, threshold, keep_scale, 0);
            xin = tile;
        }
        memset(dA, 0, r * d_in * sizeof(T));
        GER(ROW, (int)r, (int)d_in, scale, g, 1, xin, 1, dA, (int)d_in);
        if (dx) {
            if (!drop) {
                GEMV(ROW, TR, (int)r, (int)d_in, scale, A, (int)d_in, g, 1, acc ? 1 : 0, dx,
                     1);
            } else {
                GEMV(ROW, TR, (int)r, (int)d_in, 1, A, (int)d_in, g, 1, 0, tile, 1);
                FN(dropout_rows)(dx, tile, 0, 1, d_in, key, threshold, scale * keep_scale, acc);
            }
            FN(base_backward)(dx, dy, W, wt, 1, 1, d_in, d_out, pk);
        }
        return;
    }
    if (r < LORA_GEMM_RANK && n >= LORA_BWD_ROW_PASS_MIN) {
        /* the per-part sums start on a 16-element boundary (the scratch's slack pays for it) */
        T *Bt = scratch + n * r, *part = scratch + (n * r + r * d_out + 15) / 16 * 16;
        FN(transpose)(Bt, B, d_out, r);
        FN(BackwardRows) rows = {dx, g, part, dy, x, xa, A, Bt, scale, keep_scale, drop, acc,
                                 key, threshold, n, d_in, d_out, r, parts};
        lora_parallel_for(parts, 1, 1, FN(backward_part), &rows);
        const size_t stride = lora_part_elems(d_in, d_out, r, drop);
        for (size_t j = 0; j < d_out; j++)
            for (size_t k = 0; k < r; k++) {
                T sum = 0;
                for (size_t q = 0; q < parts; q++) sum += part[q * stride + k * d_out + j];
                dB[j * r + k] = scale * sum;
            }
        for (size_t i = 0; i < r * d_in; i++) {
            T sum = 0;
            for (size_t q = 0; q < parts; q++) sum += part[q * stride + r * d_out + i];
            dA[i] = scale * sum;
        }
    } else {
        GEMM(ROW, NT, NT, (int)n, (int)r, (int)d_out, 1, dy, (int)d_out, B, (int)r, 0, g, (int)r);
        GEMM(ROW, TR, NT, (int)d_out, (int)r, (int)n, scale, dy, (int)d_out, xa, (int)r, 0, dB,
             (int)r);
        if (!drop) {
            GEMM(ROW, TR, NT, (int)r, (int)d_in, (int)n, scale, g, (int)r, x, (int)d_in, 0, dA,
                 (int)d_in);
            if (dx && r < LORA_GEMM_RANK)
                FN(rank_update_parallel)(dx, g, r, 1, A, scale, n, d_in, r, !acc, NULL);
            else if (dx)
                GEMM(ROW, NT, NT, (int)n, (int)d_in, (int)r, scale, g, (int)r, A, (int)d_in,
                     acc ? 1 : 0, dx, (int)d_in);
        } else {
            for (size_t i0 = 0; i0 < n; i0 += LORA_DROPOUT_TILE_ROWS) {
                size_t rows = n - i0 < LORA_DROPOUT_TILE_ROWS ? n - i0 : LORA_DROPOUT_TILE_ROWS;
                FN(dropout_rows)(tile, x + i0 * d_in, i0, rows, d_in, key, threshold,
                                 keep_scale, 0);
                GEMM(ROW, TR, NT, (int)r, (int)d_in, (int)rows, scale, g + i0 * r, (int)r,
                     tile, (int)d_in, i0 == 0 ? 0 : 1, dA, (int)d_in);
                if (dx) {
                    /* The mask, regenerated, on the LoRA branch's input gradient. */
                    GEMM(ROW, NT, NT, (int)rows, (int)d_in, (int)r, 1, g + i0 * r, (int)r, A,
                         (int)d_in, 0, tile, (int)d_in);
                    FN(dropout_rows)(dx + i0 * d_in, tile, i0, rows, d_in, key, threshold,
                                     scale * keep_scale, acc);
                }
            }
        }
    }
    if (dx) FN(base_backward)(dx, dy, W, wt, 1, n, d_in, d_out, pk);
}

/* W += scale * B A in place (accumulates), the merge of Hu et al. 2021, sec. 4.1; unmerge is
 * the same call with -scale. W is (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
 * (GPT-2 Conv1D), where the update is transposed: W += scale * A^T B^T.
 * Small ranks are memory-bound: stream W once (rank_update). Large ranks are compute-bound:
 * OpenBLAS's GEMM kernels are faster there.
 * scratch: r * d_out elements when fan_in_fan_out and r < LORA_GEMM_RANK, else none. */
void FN(lora_merge)(T *W, T *scratch, const T *A, const T *B, T scale, int fan_in_fan_out,
                    size_t d_out, size_t d_in, size_t r) {
    if (r >= LORA_GEMM_RANK) {
        if (!fan_in_fan_out)
            GEMM(ROW, NT, NT, (int)d_out, (int)d_in, (int)r, scale, B, (int)r, A, (int)d_in, 1,
                 W, (int)d_in);
        else
            GEMM(ROW, TR, TR, (int)d_in, (int)d_out, (int)r, scale, A, (int)d_in, B, (int)r, 1,
                 W, (int)d_out);
        return;
    }
    if (!fan_in_fan_out) {
        FN(rank_update_parallel)(W, B, r, 1, A, scale, d_out, d_in, r, 0, NULL);
        return;
    }
    /* W^T (d_in, d_out) += A^T (scale B^T): rows of W^T take coefficients from columns of
     * A, and the streamed vectors are rows of B^T, made contiguous in scratch. */
    for (size_t i = 0; i < d_out; i++)
        for (size_t k = 0; k < r; k++) scratch[k * d_out + i] = B[i * r + k];
    FN(rank_update_parallel)(W, A, 1, d_in, scratch, scale, d_in, d_out, r, 0, NULL);
}

/* The readable spec of lora_merge (fan_in_fan_out = 0), the oracle for the tuned one. */
void FN(lora_merge_naive)(T *W, const T *A, const T *B, T scale, size_t d_out, size_t d_in,
                          size_t r) {
    for (size_t i = 0; i < d_out; i++)
        for (size_t j = 0; j < d_in; j++) {
            T acc = 0;
            for (size_t k = 0; k < r; k++) acc += B[i * r + k] * A[k * d_in + j];
            W[i * d_in + j] += scale * acc;
        }
}

/* A plain linear layer, y = x W^T + bias (x W + bias with W stored (d_in, d_out) when wt),
 * plus a residual res (n, d_out) when not NULL, overwriting y: the base GEMM alone, used by
 * lora.nn.Linear and Conv1D and as the baseline the LoRA forward is measured against. */
void FN(dense_forward)(T *y, const T *x, const T *W, const T *bias, const T *res, size_t n,
                       size_t d_in, size_t d_out, int wt, const LoraPacked *pk) {
    if (n == 0) return;
    FN(base_forward)(y, x, W, wt, FN(fill_init)(y, bias, res, n, d_out), n, d_in, d_out, pk);
}

/* Backward of dense_forward, overwriting dx = dy W (adding it to dx with `acc`) and
 * dW = dy^T x (x^T dy, W's layout, when wt); either may be NULL. */
void FN(dense_backward)(T *dx, T *dW, const T *dy, const T *x, const T *W, size_t n,
                        size_t d_in, size_t d_out, int wt, int acc, const LoraPacked *pk) {
    if (n == 0) {
        if (dW) memset(dW, 0, d_out * d_in * sizeof(T));
        return;
    }
    if (dx) FN(base_backward)(dx, dy, W, wt, acc ? 1 : 0, n, d_in, d_out, pk);
    if (dW && !wt)
        GEMM(ROW, TR, NT, (int)d_out, (int)d_in, (int)n, 1, dy, (int)d_out, x, (int)d_in, 0, dW,
             (int)d_in);
    else if (dW)
        GEMM(ROW, TR, NT, (int)d_in, (int)d_out, (int)n, 1, x, (int)d_in, dy, (int)d_out, 0, dW,
             (int)d_out);
}

/* Batches whose rows use different adapters, built on the row kernels above. */
#include "multi_impl.h"

/* DoRA's weight norm, also read through base_forward. */
#include "dora_impl.h"

#undef ROW
#undef NT
#undef TR
