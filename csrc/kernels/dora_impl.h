/* kernels/dora_impl.h: DoRA's weight norm (Liu et al. 2024), type-generic. Part of
 * lora_impl.h's instantiation, included at its end so that it reads the base weight through
 * base_forward (an array in either layout, packed panels or quantized blocks); not a header
 * to include anywhere else.
 *
 *   norm[j] = || W_j + scale (B A)_j ||        j < d_out, W_j row j of W (d_out, d_in)
 *
 * (column j when wt: W stored (d_in, d_out)), computed without forming W + scale B A:
 *
 *   norm[j]^2 = ||W_j||^2 + 2 scale B_j . P_j + scale^2 B_j G B_j^T,
 *   P = A W^T (r, d_out): one product of the r rows of A with W (base_forward),
 *   G = A A^T (r, r).
 *
 * The cost is a LoRA forward of r rows (2 r d_in d_out flops) and O(d_out r^2), where
 * forming the sum costs d_out d_in memory and the same flops. w_sq gives ||W_j||^2 (it is
 * constant for a frozen W: the caller may keep it); NULL computes it from W, which must then
 * be an array. The three terms are summed in double, and a sum that rounds below zero gives
 * a norm of 0 (NaN stays NaN). Overwrites norm (d_out).
 * scratch: r * d_out + r * r elements, plus d_out when w_sq is NULL and wt. */

typedef struct {
    T *norm;
    const T *P, *G, *B, *W, *w_sq;
    double scale;
    size_t d_out, d_in, r;
} FN(DoraNorm);

static void FN(dora_norm_rows)(void *arg, size_t begin, size_t end) {
    const FN(DoraNorm) *a = arg;
    const size_t r = a->r, d_out = a->d_out;
    for (size_t j = begin; j < end; j++) {
        const T *b = a->B + j * r;
        double w2 = 0, bp = 0, bgb = 0;
        if (a->w_sq)
            w2 = (double)a->w_sq[j];
        else
            for (const T *w = a->W + j * a->d_in, *e = w + a->d_in; w < e; w++)
                w2 += (double)*w * *w;
        for (size_t k = 0; k < r; k++) {
            bp += (double)b[k] * a->P[k * d_out + j];
            double gb = 0;
            for (size_t l = 0; l < r; l++) gb += (double)a->G[k * r + l] * b[l];
            bgb += (double)b[k] * gb;
        }
        double n2 = w2 + 2 * a->scale * bp + a->scale * a->scale * bgb;
        a->norm[j] = (T)(n2 > 0 ? sqrt(n2) : n2 == n2 ? 0 : n2); /* NaN stays NaN */
    }
}

void FN(dora_norm)(T *norm, T *scratch, const T *W, const T *A, const T *B, T scale,
                   const T *w_sq, size_t d_out, size_t d_in, size_t r, int wt,
                   const LoraPacked *pk) {
    if (d_out == 0) return;
    T *P = scratch, *G = scratch + r * d_out;
    FN(base_forward)(P, A, W, wt, 0, r, d_in, d_out, pk);
    GEMM(ROW, NT, TR, (int)r, (int)r, (int)d_in, 1, A, (int)d_in, A, (int)d_in, 0, G, (int)r);
    if (!w_sq && wt) { /* columns of W^T: one pass down its rows */
        T *sq = G + r * r;
        memset(sq, 0, d_out * sizeof(T));
        for (size_t i = 0; i < d_in; i++)
            for (size_t j = 0; j < d_out; j++) sq[j] += W[i * d_out + j] * W[i * d_out + j];
        w_sq = sq;
    }
    FN(DoraNorm) a = {norm, P, G, B, W, w_sq, (double)scale, d_out, d_in, r};
    lora_parallel_for(d_out, (1 << 16) / (d_in + r * r + 1) + 8, 1, FN(dora_norm_rows), &a);
}
