/* kernels/lm_loss_impl.h: the type-generic body of lm_loss.c, compiled once per type by
 * instantiate.h (T, FN, GEMM, EXP are the type's). Not a header to include anywhere else. */

/* One chunk's rows of scores S (rows, V), in place: each counted row becomes its gradient
 * grad_scale * (softmax - onehot) (or 0 when grads is 0) and its loss goes to loss[i];
 * ignored rows become 0 with loss 0. Rows are split over lora's threads. */
typedef struct {
    T *S;
    double *loss;
    const int64_t *labels;
    int64_t ignore;
    T grad_scale;
    size_t V;
    int grads;
} FN(LossRows);

static void FN(loss_rows)(void *arg, size_t begin, size_t end) {
    const FN(LossRows) *a = arg;
    const size_t V = a->V;
    for (size_t i = begin; i < end; i++) {
        T *s = a->S + i * V;
        const int64_t label = a->labels[i];
        if (label == a->ignore) {
            a->loss[i] = 0;
            if (a->grads) memset(s, 0, V * sizeof(T));
            continue;
        }
        T mx = s[0];
        for (size_t j = 1; j < V; j++) mx = s[j] > mx ? s[j] : mx;
        double sum = 0;
        for (size_t j = 0; j < V; j++) sum += (double)EXP(s[j] - mx);
        const double lse = (double)mx + log(sum);
        a->loss[i] = lse - (double)s[label];
        if (!a->grads) continue;
        const T shift = (T)lse, g = a->grad_scale;
        for (size_t j = 0; j < V; j++) s[j] = g * EXP(s[j] - shift);
        s[label] -= g;
    }
}

/* Returns the summed loss over counted rows. dh (n, d) is overwritten when not NULL; dW
 * (V, d) accumulated into when not NULL. scratch: chunk * V elements of T and chunk doubles
 * (lora_lm_loss_scratch_bytes). */
double FN(linear_cross_entropy)(T *dh, T *dW, void *scratch, const T *h, const T *W,
                                const int64_t *labels, int64_t ignore, T grad_scale, size_t n,
                                size_t d, size_t V, size_t chunk) {
    T *S = scratch;
    double *row_loss =
        (double *)((char *)scratch + lora_lm_loss_scores_bytes(chunk, V, sizeof(T)));
    const int grads = dh != NULL || dW != NULL;
    double total = 0;
    for (size_t i0 = 0; i0 < n; i0 += chunk) {
        const size_t rows = n - i0 < chunk ? n - i0 : chunk;
        const T *hc = h + i0 * d;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)V, (int)d, 1, hc, (int)d,
             W, (int)d, 0, S, (int)V);
        FN(LossRows) a = {S, row_loss, labels + i0, ignore, grad_scale, V, grads};
        lora_parallel_for(rows, 1, 1, FN(loss_rows), &a);
        for (size_t i = 0; i < rows; i++) total += row_loss[i];
        if (dh)
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)d, (int)V, 1, S,
                 (int)V, W, (int)d, 0, dh + i0 * d, (int)d);
        if (dW)
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)V, (int)d, (int)rows, 1, S,
                 (int)V, hc, (int)d, 1, dW, (int)d);
    }
    return total;
}
