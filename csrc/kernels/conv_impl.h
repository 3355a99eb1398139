/* kernels/conv_impl.h: im2col and col2im, type-generic (instantiated by conv.c).
 *
 * x is (n, c, h, w) and cols (n * oh * ow, c * kh * kw): row (b, y, x) of cols holds the
 * patch of item b under output pixel (y, x), its columns in the kernel's (channel, i, j)
 * order, so cols @ weight.reshape(d_out, -1).T is the convolution. The patch element (i, j)
 * of output (y, x) reads input (y sh + i dh - ph, x sw + j dw - pw): zero in the padding. */

typedef struct {
    const LoraConvDims *d;
    const T *src; /* im2col: x; col2im: cols */
    T *dst;       /* im2col: cols; col2im: dx */
} FN(ConvArgs);

/* rows [begin, end) of the (b, y) pairs: all ow output pixels of output row y of item b. */
static void FN(im2col_rows)(void *arg, size_t begin, size_t end) {
    const FN(ConvArgs) *a = arg;
    const LoraConvDims *d = a->d;
    const size_t ckk = d->c * d->kh * d->kw;
    for (size_t r = begin; r < end; r++) {
        const size_t b = r / d->oh, y = r % d->oh;
        for (size_t ox = 0; ox < d->ow; ox++) {
            T *restrict row = a->dst + (r * d->ow + ox) * ckk;
            const ptrdiff_t x0 = (ptrdiff_t)(ox * d->sw) - (ptrdiff_t)d->pw;
            for (size_t ci = 0; ci < d->c; ci++) {
                const T *plane = a->src + (b * d->c + ci) * d->h * d->w;
                for (size_t i = 0; i < d->kh; i++, row += d->kw) {
                    const ptrdiff_t iy = (ptrdiff_t)(y * d->sh + i * d->dh) - (ptrdiff_t)d->ph;
                    if (iy < 0 || iy >= (ptrdiff_t)d->h) {
                        for (size_t j = 0; j < d->kw; j++) row[j] = 0;
                        continue;
                    }
                    const T *restrict src = plane + (size_t)iy * d->w;
                    for (size_t j = 0; j < d->kw; j++) {
                        const ptrdiff_t ix = x0 + (ptrdiff_t)(j * d->dw);
                        row[j] = (ix >= 0 && ix < (ptrdiff_t)d->w) ? src[ix] : (T)0;
                    }
                }
            }
        }
    }
}

void FN(im2col)(T *cols, const T *x, const LoraConvDims *d) {
    FN(ConvArgs) a = {d, x, cols};
    const size_t per_row = d->ow * d->c * d->kh * d->kw + 1;
    lora_parallel_for(d->n * d->oh, (1 << 15) / per_row + 1, 1, FN(im2col_rows), &a);
}

/* planes [begin, end) of the (b, channel) pairs: dx's plane, overwritten with the sum of
 * every patch element that read it. */
static void FN(col2im_planes)(void *arg, size_t begin, size_t end) {
    const FN(ConvArgs) *a = arg;
    const LoraConvDims *d = a->d;
    const size_t ckk = d->c * d->kh * d->kw, kk = d->kh * d->kw;
    for (size_t p = begin; p < end; p++) {
        const size_t b = p / d->c, ci = p % d->c;
        T *restrict plane = a->dst + p * d->h * d->w;
        for (size_t k = 0; k < d->h * d->w; k++) plane[k] = 0;
        for (size_t y = 0; y < d->oh; y++) {
            for (size_t ox = 0; ox < d->ow; ox++) {
                const T *restrict src = a->src + ((b * d->oh + y) * d->ow + ox) * ckk + ci * kk;
                const ptrdiff_t x0 = (ptrdiff_t)(ox * d->sw) - (ptrdiff_t)d->pw;
                for (size_t i = 0; i < d->kh; i++, src += d->kw) {
                    const ptrdiff_t iy = (ptrdiff_t)(y * d->sh + i * d->dh) - (ptrdiff_t)d->ph;
                    if (iy < 0 || iy >= (ptrdiff_t)d->h) continue;
                    T *restrict dst = plane + (size_t)iy * d->w;
                    for (size_t j = 0; j < d->kw; j++) {
                        const ptrdiff_t ix = x0 + (ptrdiff_t)(j * d->dw);
                        if (ix >= 0 && ix < (ptrdiff_t)d->w) dst[ix] += src[j];
                    }
                }
            }
        }
    }
}

void FN(col2im)(T *dx, const T *cols, const LoraConvDims *d) {
    FN(ConvArgs) a = {d, cols, dx};
    const size_t per_plane = d->oh * d->ow * d->kh * d->kw + 1;
    lora_parallel_for(d->n * d->c, (1 << 15) / per_plane + 1, 1, FN(col2im_planes), &a);
}
