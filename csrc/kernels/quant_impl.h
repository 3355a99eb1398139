/* kernels/quant_impl.h: the type-generic bodies of quant.c, INCLUDED TWICE by it (through
 * instantiate.h), once with T = float and once with T = double; FN(name) makes name_f32 /
 * name_f64. Not a header to include anywhere else.
 *
 * The products of a float matrix with a quantized weight W (N rows of K elements, each
 * lora_qrow_bytes(qtype, K) bytes, as quant.c lays them out), the weight never dequantized
 * whole:
 *   quant_forward:  y  = x W^T + beta y   x (n, K), y (n, N)
 *   quant_backward: dx = dy W + beta dx   dy (n, N), dx (n, K)
 * Up to LORA_QDOT_ROWS rows of x (decode) the forward dequantizes each row of W a chunk at a
 * time into a buffer in L1 and takes its dot products with the rows of x there, threads
 * splitting W's rows: W is read once, at its quantized size. Otherwise (and for every
 * backward) W is dequantized a tile of rows at a time (LORA_QTILE_BYTES, on lora's threads)
 * and the tile goes to the BLAS GEMM, so the product runs at GEMM speed plus one pass of
 * dequantization over W. beta 0 never reads y (dx).
 */

/* Rows [begin, end) of the tile: W's rows row0 + begin .. row0 + end - 1, as T. */
typedef struct {
    T *tile;
    const uint8_t *W;
    size_t row0, K, row_bytes;
    int qtype;
} FN(DeqTile);

static void FN(deq_tile_rows)(void *arg, size_t begin, size_t end) {
    const FN(DeqTile) *a = arg;
    const size_t e = lora_qblock_elems(a->qtype), nb = a->K / e;
    for (size_t j = begin; j < end; j++) {
        const uint8_t *row = a->W + (a->row0 + j) * a->row_bytes;
#ifdef LORA_T_IS_F32
        deq_blocks(a->tile + j * a->K, row, nb, 0, nb, a->qtype);
#else
        float buf[LORA_QCHUNK];
        const size_t per = LORA_QCHUNK / e;
        for (size_t b0 = 0; b0 < nb; b0 += per) {
            const size_t m = nb - b0 < per ? nb - b0 : per;
            deq_blocks(buf, row, nb, b0, m, a->qtype);
            T *dst = a->tile + j * a->K + b0 * e;
            for (size_t i = 0; i < m * e; i++) dst[i] = buf[i];
        }
#endif
    }
}

/* W's rows [j0, j0 + m) into the tile, on lora's threads (a thread per 16k elements). */
static void FN(deq_tile)(T *tile, const uint8_t *W, int qtype, size_t j0, size_t m, size_t K) {
    FN(DeqTile) a = {tile, W, j0, K, lora_qrow_bytes(qtype, K), qtype};
    lora_parallel_for(m, (1 << 14) / K + 1, 1, FN(deq_tile_rows), &a);
}

/* The decode path: y[i, j] = x_i . W_j (+ beta y[i, j]) for W's rows [begin, end). */
typedef struct {
    T *y;
    const T *x;
    const float *xsum; /* the block sums of x for the direct path of Q4_0 and Q4_1 */
    const void *xq;    /* x in 8-bit blocks (act8: quant.c's q8_rows), or NULL */
    const uint8_t *W;
    T beta;
    size_t n, K, N;
    int qtype, direct; /* direct: take dot_row_f32's direct path */
} FN(QDot);

static LORA_CLONES LORA_FMA void FN(qdot_rows)(void *arg, size_t begin, size_t end) {
    const FN(QDot) *a = arg;
    const size_t K = a->K, e = lora_qblock_elems(a->qtype), nb = K / e, per = LORA_QCHUNK / e;
    const size_t row_bytes = lora_qrow_bytes(a->qtype, K);
    float buf[LORA_QCHUNK];
    for (size_t j = begin; j < end; j++) {
        const uint8_t *row = a->W + j * row_bytes;
#ifdef LORA_T_IS_F32
        float direct[LORA_QDOT_ROWS] = {0};
        if (a->xq ? dot_row_q8(direct, row, a->xq, a->n, K, a->qtype)
                  : a->direct && dot_row_f32(direct, row, a->x, a->xsum, K, a->n, nb, a->qtype)) {
            for (size_t i = 0; i < a->n; i++) {
                T *yij = a->y + i * a->N + j;
                *yij = a->beta != 0 ? direct[i] + a->beta * *yij : direct[i];
            }
            continue;
        }
#endif
        T acc[LORA_QDOT_ROWS] = {0};
        for (size_t b0 = 0; b0 < nb; b0 += per) {
            const size_t m = nb - b0 < per ? nb - b0 : per, len = m * e;
            deq_blocks(buf, row, nb, b0, m, a->qtype);
            for (size_t i = 0; i < a->n; i++) {
                const T *xi = a->x + i * K + b0 * e;
                T s = 0;
#pragma omp simd reduction(+ : s)
                for (size_t k = 0; k < len; k++) s += (T)buf[k] * xi[k];
                acc[i] += s;
            }
        }
        for (size_t i = 0; i < a->n; i++) {
            T *yij = a->y + i * a->N + j;
            *yij = a->beta != 0 ? acc[i] + a->beta * *yij : acc[i];
        }
    }
}

void FN(quant_forward)(T *y, T *tile, const T *x, const uint8_t *W, int qtype, int act8, T beta,
                       size_t n, size_t K, size_t N) {
    (void)act8; /* float64 inputs take the float path */
    if (n == 0) return;
    if (n <= LORA_QDOT_ROWS) {
        /* the direct path, with x in 8-bit blocks (act8, in the tile) or as it is; Q4_0's and
         * Q4_1's float path needs the block sums of x (32 elements each), once for all rows
         * of W, so their rows of x longer than 16384 (too many sums for the stack) take the
         * generic path */
#ifdef LORA_T_IS_F32
        const void *xq = NULL;
        if (act8 && q8_path(qtype)) {
            q8_rows(tile, x, n, K);
            xq = tile;
        }
        float xsum[LORA_QDOT_ROWS * 512];
        const size_t nb = K / 32;
        const int need_sums = !xq && (qtype == LORA_Q4_0 || qtype == LORA_Q4_1);
        const int direct = !xq && has_dot_path(qtype) && (!need_sums || nb <= 512);
        for (size_t i = 0; direct && need_sums && i < n; i++)
            for (size_t k = 0; k < nb; k++) {
                float s = 0;
                for (int e = 0; e < 32; e++) s += x[i * K + 32 * k + e];
                xsum[i * nb + k] = s;
            }
#else
        const int direct = 0;
        const float *xsum = NULL;
        const void *xq = NULL;
#endif
        FN(QDot) a = {y, x, xsum, xq, W, beta, n, K, N, qtype, direct};
        lora_parallel_for(N, (1 << 15) / K + 4, 4, FN(qdot_rows), &a);
        return;
    }
    const size_t tr = lora_quant_tile_rows(K, N, sizeof(T));
    for (size_t j0 = 0; j0 < N; j0 += tr) {
        const size_t m = N - j0 < tr ? N - j0 : tr;
        FN(deq_tile)(tile, W, qtype, j0, m, K);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)K, 1, x, (int)K, tile,
             (int)K, beta, y + j0, (int)N);
    }
}

void FN(quant_backward)(T *dx, T *tile, const T *dy, const uint8_t *W, int qtype, T beta,
                        size_t n, size_t K, size_t N) {
    if (n == 0) return;
    const size_t tr = lora_quant_tile_rows(K, N, sizeof(T));
    for (size_t j0 = 0; j0 < N; j0 += tr) {
        const size_t m = N - j0 < tr ? N - j0 : tr;
        FN(deq_tile)(tile, W, qtype, j0, m, K);
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)K, (int)m, 1, dy + j0,
             (int)N, tile, (int)K, j0 ? 1 : beta, dx, (int)K);
    }
}
