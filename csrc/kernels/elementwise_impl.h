/* kernels/elementwise_impl.h: the type-generic bodies of elementwise.c, INCLUDED TWICE by it
 * (through instantiate.h), once with T = float, SUF = f32 and once with T = double,
 * SUF = f64; FN(name) makes name_f32 / name_f64. Not a header to include anywhere else.
 *
 * Holds the dropout of rows (shared with lora.c and attention.c), Adam/AdamW and LayerNorm.
 * Row-major throughout; every kernel says whether it overwrites or accumulates.
 */

/* out (rows, d_in) = dropout(x rows row0 .. row0+rows-1): kept elements scaled by
 * keep_scale, 1/(1-p) (inverted dropout, as torch.nn.Dropout), dropped ones zero; with `acc`
 * added to out instead. The backward applies the same mask to the input gradient with
 * keep_scale = scale/(1-p). */
LORA_CLONES void FN(dropout_rows)(T *restrict out, const T *restrict x, size_t row0,
                                         size_t rows, size_t d_in, uint64_t key,
                                         uint32_t threshold, T keep_scale, int acc) {
    for (size_t i = 0; i < rows; i++) {
        const uint64_t base = (uint64_t)(row0 + i) * d_in;
        const T *xi = x + i * d_in;
        T *oi = out + i * d_in;
        for (size_t j = 0; j < d_in; j++) {
            const T v = dropout_keep(key, base + j, threshold) ? xi[j] * keep_scale : (T)0;
            oi[j] = acc ? oi[j] + v : v;
        }
    }
}

/* One Adam/AdamW step in place on param, m and v (grad is read only), exactly the update of
 * torch.optim.Adam / torch.optim.AdamW (PyTorch docs, "Algorithm"; Kingma & Ba 2015, Alg. 1;
 * Loshchilov & Hutter 2019 for the decoupled decay):
 *   AdamW: p *= 1 - lr wd            Adam: g += wd p (L2 in the gradient)
 *   m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
 *   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * The bias corrections are computed once per call in double. eps sits outside the square
 * root after the correction, as PyTorch has it; the build's -ffp-contract=off keeps each
 * product rounded as PyTorch rounds it, so trajectories match torch.optim to rounding. */
typedef struct {
    T *param, *m, *v;
    const T *grad;
    T step_size, bc2_sqrt, w1, b2, w2, eps, decay, l2;
} FN(Adam);

static LORA_CLONES void FN(adam_range)(void *arg, size_t begin, size_t end) {
    const FN(Adam) *a = arg;
    T *restrict param = a->param, *restrict m = a->m, *restrict v = a->v;
    const T *restrict grad = a->grad;
    const T step_size = a->step_size, bc2_sqrt = a->bc2_sqrt, w1 = a->w1, b2 = a->b2,
            w2 = a->w2, eps = a->eps, decay = a->decay, l2 = a->l2;
    /* Two copies of the loop: without the L2 term it is not computed at all, as torch skips
     * it, so an infinite parameter does not turn g (and m, v) into 0 * inf = NaN. */
#define LORA_ADAM_LOOP(G)                                                                      \
    for (size_t i = begin; i < end; i++) {                                                     \
        const T g = (G);                                                                       \
        const T mi = m[i] + w1 * (g - m[i]); /* torch.lerp(m, g, w1) for w1 < 0.5 */           \
        const T vi = v[i] * b2 + w2 * g * g;                                                   \
        const T denom = SQRT(vi) / bc2_sqrt + eps;                                             \
        param[i] = param[i] * decay - step_size * (mi / denom);                                \
        m[i] = mi;                                                                             \
        v[i] = vi;                                                                             \
    }
    if (l2 == 0) {
        LORA_ADAM_LOOP(grad[i])
    } else {
        LORA_ADAM_LOOP(grad[i] + l2 * param[i])
    }
#undef LORA_ADAM_LOOP
}

void FN(adam_step)(T *param, T *m, T *v, const T *grad, size_t numel, long long step, double lr,
                   double beta1, double beta2, double eps, double weight_decay, int decoupled) {
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    FN(Adam) a = {param,
                  m,
                  v,
                  grad,
                  (T)(lr / bc1),
                  (T)sqrt(bc2),
                  (T)(1.0 - beta1),
                  (T)beta2,
                  (T)(1.0 - beta2),
                  (T)eps,
                  decoupled ? (T)(1.0 - lr * weight_decay) : (T)1,
                  decoupled ? (T)0 : (T)weight_decay};
    lora_parallel_for(numel, 1 << 17, 64, FN(adam_range), &a);
}

/* LayerNorm over rows of d, as torch.nn.LayerNorm (biased variance, eps inside the root):
 *   y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)
 * x, y are (rows, d), w and b (d) (b may be NULL); mean and rstd (rows) are written for the
 * backward. Overwrites y, mean, rstd. Rows are split over lora's threads; the row sums run
 * as SIMD partial sums (OpenMP simd reduction), which reorders the sums within a row. */
typedef struct {
    T *y, *mean, *rstd;
    const T *x, *w, *b;
    double eps;
    size_t d;
} FN(LayerNormArgs);

static LORA_CLONES void FN(layer_norm_rows)(void *arg, size_t begin, size_t end) {
    const FN(LayerNormArgs) *a = arg;
    const size_t d = a->d;
    const T *restrict w = a->w, *restrict b = a->b;
    for (size_t i = begin; i < end; i++) {
        const T *restrict xi = a->x + i * d;
        T *restrict yi = a->y + i * d;
        T sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum)
        for (size_t j = 0; j < d; j++) sum += xi[j];
        const T mu = sum / (T)d;
#pragma omp simd reduction(+ : sq)
        for (size_t j = 0; j < d; j++) sq += (xi[j] - mu) * (xi[j] - mu);
        const T rs = (T)1 / SQRT(sq / (T)d + (T)a->eps);
        a->mean[i] = mu;
        a->rstd[i] = rs;
        if (b)
            for (size_t j = 0; j < d; j++) yi[j] = (xi[j] - mu) * rs * w[j] + b[j];
        else
            for (size_t j = 0; j < d; j++) yi[j] = (xi[j] - mu) * rs * w[j];
    }
}

void FN(layer_norm_forward)(T *y, T *mean, T *rstd, const T *x, const T *w, const T *b,
                            double eps, size_t rows, size_t d) {
    FN(LayerNormArgs) a = {y, mean, rstd, x, w, b, eps, d};
    lora_parallel_for(rows, (1 << 16) / (d + 1) + 1, 1, FN(layer_norm_rows), &a);
}

/* Backward of layer_norm_forward: with xhat = (x - mean) rstd and g = dy w,
 *   dx = rstd (g - mean(g) - xhat mean(g xhat))     (overwritten)
 *   dw += sum over rows of dy xhat,  db += sum over rows of dy   (accumulated; either NULL)
 * dx goes by rows and dw, db by columns, each split over lora's threads. */
typedef struct {
    T *dx, *dw, *db;
    const T *dy, *x, *mean, *rstd, *w;
    size_t rows, d;
} FN(LayerNormGrad);

static LORA_CLONES void FN(layer_norm_dx_rows)(void *arg, size_t begin, size_t end) {
    const FN(LayerNormGrad) *a = arg;
    const size_t d = a->d;
    const T *restrict w = a->w;
    for (size_t i = begin; i < end; i++) {
        const T *restrict xi = a->x + i * d, *restrict gi = a->dy + i * d;
        T *restrict dxi = a->dx + i * d;
        const T mu = a->mean[i], rs = a->rstd[i];
        T sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (size_t j = 0; j < d; j++) {
            const T g = gi[j] * w[j];
            sum_g += g;
            sum_gx += g * ((xi[j] - mu) * rs);
        }
        const T mg = sum_g / (T)d, mgx = sum_gx / (T)d;
        for (size_t j = 0; j < d; j++)
            dxi[j] = rs * (gi[j] * w[j] - mg - ((xi[j] - mu) * rs) * mgx);
    }
}

static LORA_CLONES void FN(layer_norm_dw_cols)(void *arg, size_t begin, size_t end) {
    const FN(LayerNormGrad) *a = arg;
    const size_t d = a->d;
    T *restrict dw = a->dw, *restrict db = a->db;
    for (size_t i = 0; i < a->rows; i++) {
        const T *restrict xi = a->x + i * d, *restrict gi = a->dy + i * d;
        const T mu = a->mean[i], rs = a->rstd[i];
        if (dw)
            for (size_t j = begin; j < end; j++) dw[j] += gi[j] * ((xi[j] - mu) * rs);
        if (db)
            for (size_t j = begin; j < end; j++) db[j] += gi[j];
    }
}

void FN(layer_norm_backward)(T *dx, T *dw, T *db, const T *dy, const T *x, const T *mean,
                             const T *rstd, const T *w, size_t rows, size_t d) {
    FN(LayerNormGrad) a = {dx, dw, db, dy, x, mean, rstd, w, rows, d};
    lora_parallel_for(rows, (1 << 16) / (d + 1) + 1, 1, FN(layer_norm_dx_rows), &a);
    if (dw || db)
        lora_parallel_for(d, rows >= (1 << 16) / (d + 1) ? 64 : d, 16, FN(layer_norm_dw_cols),
                          &a);
}
