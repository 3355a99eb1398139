/* test_kernels.c: the kernels checked from C alone, no interpreter, against naive loops.
 *
 * Built and run by CI (and usable under any sanitizer or debugger as a plain program):
 *   cc -O1 -g -fsanitize=address,undefined -Wno-psabi -Icsrc -I<openblas include> csrc/test_kernels.c \
 *      <every .c file of csrc/kernels/> -L<openblas lib> -l<openblas> -lm -pthread -o test_kernels
 * The thorough tests (dtypes, edge shapes, bad input, PyTorch) are in tests/ through Python;
 * this one proves the kernels stand on their own and exercises the threaded paths.
 * Built with -DLORA_PANEL_MR=6 it checks the packed GEMM's kernel for CPUs without AVX-512.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

static int failures = 0;

static float frand(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static float *random_array(size_t n, unsigned *state) {
    float *a = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = frand(state);
    return a;
}

static void expect_close(const char *what, const float *got, const double *want, size_t n) {
    double worst = 0, scale = 1;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(want[i]));
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(got[i] - want[i]));
    int ok = worst <= 1e-5 * scale;
    printf("%-44s max abs err %.2e (scale %.1f) %s\n", what, worst, scale, ok ? "ok" : "FAIL");
    failures += !ok;
}

/* y = x W^T + s (x A^T) B^T and its gradients, in double with naive loops. */
static void check_layer(size_t n, size_t d_in, size_t d_out, size_t r) {
    unsigned st = 12345u + (unsigned)(n * 31 + d_in * 7 + r);
    float *x = random_array(n * d_in, &st), *W = random_array(d_out * d_in, &st);
    float *A = random_array(r * d_in, &st), *B = random_array(d_out * r, &st);
    float *dy = random_array(n * d_out, &st);
    float *y = malloc(n * d_out * sizeof(float)), *xa = malloc(n * r * sizeof(float));
    float *dx = malloc(n * d_in * sizeof(float)), *dA = malloc(r * d_in * sizeof(float));
    float *dB = malloc(d_out * r * sizeof(float));
    const size_t parts = lora_backward_parts(n, d_in, d_out);
    float *scratch = malloc(lora_scratch_elems(n, d_in, d_out, r, 0, parts) * sizeof(float));
    double *want_y = calloc(n * d_out, sizeof(double)), *want_xa = calloc(n * r, sizeof(double));
    double *want_dx = calloc(n * d_in, sizeof(double)), *want_dA = calloc(r * d_in, sizeof(double));
    double *want_dB = calloc(d_out * r, sizeof(double)), *g = calloc(n * r, sizeof(double));
    const float s = 0.5f;

    lora_forward_f32(y, xa, scratch, x, W, NULL, NULL, A, B, s, 0.0, 0, n, d_in, d_out, r, 0,
                     NULL);
    lora_backward_f32(dx, dA, dB, scratch, dy, x, xa, W, A, B, s, 0.0, 0, n, d_in, d_out, r,
                      parts, 0, 0, NULL);

    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < r; k++)
            for (size_t j = 0; j < d_in; j++) want_xa[i * r + k] += (double)x[i * d_in + j] * A[k * d_in + j];
        for (size_t o = 0; o < d_out; o++) {
            double acc = 0;
            for (size_t j = 0; j < d_in; j++) acc += (double)x[i * d_in + j] * W[o * d_in + j];
            for (size_t k = 0; k < r; k++) acc += s * want_xa[i * r + k] * B[o * r + k];
            want_y[i * d_out + o] = acc;
        }
        for (size_t k = 0; k < r; k++)
            for (size_t o = 0; o < d_out; o++) g[i * r + k] += (double)dy[i * d_out + o] * B[o * r + k];
        for (size_t j = 0; j < d_in; j++) {
            double acc = 0;
            for (size_t o = 0; o < d_out; o++) acc += (double)dy[i * d_out + o] * W[o * d_in + j];
            for (size_t k = 0; k < r; k++) acc += s * g[i * r + k] * A[k * d_in + j];
            want_dx[i * d_in + j] = acc;
        }
        for (size_t k = 0; k < r; k++) {
            for (size_t j = 0; j < d_in; j++) want_dA[k * d_in + j] += s * g[i * r + k] * x[i * d_in + j];
            for (size_t o = 0; o < d_out; o++)
                want_dB[o * r + k] += s * (double)dy[i * d_out + o] * want_xa[i * r + k];
        }
    }
    char what[64];
    snprintf(what, sizeof what, "forward y   n=%zu d_in=%zu d_out=%zu r=%zu", n, d_in, d_out, r);
    expect_close(what, y, want_y, n * d_out);
    snprintf(what, sizeof what, "backward dx n=%zu d_in=%zu d_out=%zu r=%zu", n, d_in, d_out, r);
    expect_close(what, dx, want_dx, n * d_in);
    expect_close("  dA", dA, want_dA, r * d_in);
    expect_close("  dB", dB, want_dB, d_out * r);

    free(x), free(W), free(A), free(B), free(dy), free(y), free(xa), free(dx), free(dA), free(dB);
    free(scratch), free(want_y), free(want_xa), free(want_dx), free(want_dA), free(want_dB), free(g);
}

/* The tuned merge against its naive spec, big enough to take the threaded path. */
static void check_merge(size_t d_out, size_t d_in, size_t r) {
    unsigned st = 777u + (unsigned)r;
    float *W = random_array(d_out * d_in, &st), *A = random_array(r * d_in, &st);
    float *B = random_array(d_out * r, &st), *W2 = malloc(d_out * d_in * sizeof(float));
    double *want = malloc(d_out * d_in * sizeof(double));
    for (size_t i = 0; i < d_out * d_in; i++) W2[i] = W[i];
    lora_merge_f32(W, NULL, A, B, 0.25f, 0, d_out, d_in, r);
    lora_merge_naive_f32(W2, A, B, 0.25f, d_out, d_in, r);
    for (size_t i = 0; i < d_out * d_in; i++) want[i] = W2[i];
    char what[64];
    snprintf(what, sizeof what, "merge vs naive d_out=%zu d_in=%zu r=%zu", d_out, d_in, r);
    expect_close(what, W, want, d_out * d_in);
    free(W), free(A), free(B), free(W2), free(want);
}

/* dora_norm against the norms of W + scale B A formed in double, in both layouts. */
static void check_dora_norm(size_t d_out, size_t d_in, size_t r) {
    unsigned st = 4242u + (unsigned)r;
    float *W = random_array(d_out * d_in, &st), *A = random_array(r * d_in, &st);
    float *B = random_array(d_out * r, &st), *Wt = malloc(d_out * d_in * sizeof(float));
    float *norm = malloc(d_out * sizeof(float));
    float *scratch = malloc((r * d_out + r * r + d_out) * sizeof(float));
    double *want = malloc(d_out * sizeof(double));
    for (size_t j = 0; j < d_out; j++) {
        double acc = 0;
        for (size_t i = 0; i < d_in; i++) {
            double v = W[j * d_in + i];
            for (size_t k = 0; k < r; k++) v += 0.5 * (double)B[j * r + k] * A[k * d_in + i];
            acc += v * v;
            Wt[i * d_out + j] = W[j * d_in + i];
        }
        want[j] = sqrt(acc);
    }
    char what[80];
    dora_norm_f32(norm, scratch, W, A, B, 0.5f, NULL, d_out, d_in, r, 0, NULL);
    snprintf(what, sizeof what, "dora_norm d_out=%zu d_in=%zu r=%zu", d_out, d_in, r);
    expect_close(what, norm, want, d_out);
    dora_norm_f32(norm, scratch, Wt, A, B, 0.5f, NULL, d_out, d_in, r, 1, NULL);
    snprintf(what, sizeof what, "dora_norm transposed d_out=%zu d_in=%zu r=%zu", d_out, d_in, r);
    expect_close(what, norm, want, d_out);
    free(W), free(A), free(B), free(Wt), free(norm), free(scratch), free(want);
}

/* im2col against the patch definition read straight from x, and col2im as its adjoint:
 * <im2col(x), g> = <x, col2im(g)>, in double. */
static void check_conv(size_t n, size_t c, size_t h, size_t w, size_t kh, size_t kw, size_t s,
                       size_t p, size_t d) {
    const size_t oh = (h + 2 * p - d * (kh - 1) - 1) / s + 1, ow = (w + 2 * p - d * (kw - 1) - 1) / s + 1;
    const LoraConvDims dims = {n, c, h, w, kh, kw, s, s, p, p, d, d, oh, ow};
    const size_t rows = n * oh * ow, ckk = c * kh * kw;
    unsigned st = 99u + (unsigned)(h * 13 + kh);
    float *x = random_array(n * c * h * w, &st), *g = random_array(rows * ckk, &st);
    float *cols = malloc(rows * ckk * sizeof(float)), *dx = malloc(n * c * h * w * sizeof(float));
    double *want = malloc(rows * ckk * sizeof(double));
    for (size_t b = 0; b < n; b++)
        for (size_t y = 0; y < oh; y++)
            for (size_t xo = 0; xo < ow; xo++)
                for (size_t ci = 0; ci < c; ci++)
                    for (size_t i = 0; i < kh; i++)
                        for (size_t j = 0; j < kw; j++) {
                            const long iy = (long)(y * s + i * d) - (long)p;
                            const long ix = (long)(xo * s + j * d) - (long)p;
                            const int in = iy >= 0 && iy < (long)h && ix >= 0 && ix < (long)w;
                            want[((b * oh + y) * ow + xo) * ckk + (ci * kh + i) * kw + j] =
                                in ? x[((b * c + ci) * h + (size_t)iy) * w + (size_t)ix] : 0.0;
                        }
    im2col_f32(cols, x, &dims);
    col2im_f32(dx, g, &dims);
    char what[80];
    snprintf(what, sizeof what, "im2col %zux%zux%zux%zu k=%zux%zu s=%zu p=%zu d=%zu", n, c, h, w,
             kh, kw, s, p, d);
    expect_close(what, cols, want, rows * ckk);
    double lhs = 0, rhs = 0;
    for (size_t i = 0; i < rows * ckk; i++) lhs += want[i] * g[i];
    for (size_t i = 0; i < n * c * h * w; i++) rhs += (double)x[i] * dx[i];
    const float got = (float)rhs;
    expect_close("  col2im, the adjoint", &got, &lhs, 1);
    free(x), free(g), free(cols), free(dx), free(want);
}

/* A packed weight (pack_panels, both directions) through dense_forward and dense_backward's
 * dx, against naive loops: small batches (x copied whole) and a large one (by blocks). */
static void check_packed(size_t n, size_t d_in, size_t d_out) {
    unsigned st = 4242u + (unsigned)(n * 3 + d_in);
    const size_t width = 32; /* float32 columns per panel: LORA_PANEL_BYTES / 4 */
    float *x = random_array(n * d_in, &st), *W = random_array(d_out * d_in, &st);
    float *dy = random_array(n * d_out, &st), *y = malloc(n * d_out * sizeof(float));
    float *dx = malloc(n * d_in * sizeof(float));
    float *fwd = malloc((d_out + width) * d_in * sizeof(float));
    float *bwd = malloc((d_in + width) * d_out * sizeof(float));
    double *want_y = calloc(n * d_out, sizeof(double)), *want_dx = calloc(n * d_in, sizeof(double));
    pack_panels_f32(fwd, W, d_in, d_out, 1); /* W^T's panels */
    pack_panels_f32(bwd, W, d_out, d_in, 0); /* W's */
    const size_t pf = lora_panel_parts((d_out + width - 1) / width);
    const size_t pb = lora_panel_parts((d_in + width - 1) / width);
    float *xf = malloc(lora_panel_scratch_elems(pf, n, d_in, 4) * sizeof(float));
    float *xb = malloc(lora_panel_scratch_elems(pb, n, d_out, 4) * sizeof(float));
    LoraPacked kf = {fwd, xf, pf}, kb = {bwd, xb, pb};
    dense_forward_f32(y, x, NULL, NULL, NULL, n, d_in, d_out, 0, &kf);
    dense_backward_f32(dx, NULL, dy, x, NULL, n, d_in, d_out, 0, 0, &kb);
    for (size_t i = 0; i < n; i++)
        for (size_t o = 0; o < d_out; o++)
            for (size_t j = 0; j < d_in; j++) {
                want_y[i * d_out + o] += (double)x[i * d_in + j] * W[o * d_in + j];
                want_dx[i * d_in + j] += (double)dy[i * d_out + o] * W[o * d_in + j];
            }
    char what[64];
    snprintf(what, sizeof what, "packed forward  n=%zu d_in=%zu d_out=%zu", n, d_in, d_out);
    expect_close(what, y, want_y, n * d_out);
    snprintf(what, sizeof what, "packed backward n=%zu d_in=%zu d_out=%zu", n, d_in, d_out);
    expect_close(what, dx, want_dx, n * d_in);
    free(x), free(W), free(dy), free(y), free(dx), free(fwd), free(bwd), free(want_y);
    free(want_dx), free(xf), free(xb);
}

/* RMSNorm forward and backward (dx and the accumulated dw) against naive loops, over enough
 * rows to take the threaded paths. */
static void check_rms_norm(size_t rows, size_t d) {
    unsigned st = 99u + (unsigned)(rows + d);
    float *x = random_array(rows * d, &st), *w = random_array(d, &st), *dy = random_array(rows * d, &st);
    float *y = malloc(rows * d * sizeof(float)), *rstd = malloc(rows * sizeof(float));
    float *dx = malloc(rows * d * sizeof(float)), *dw = calloc(d, sizeof(float));
    double *want_y = malloc(rows * d * sizeof(double)), *want_dx = malloc(rows * d * sizeof(double));
    double *want_dw = calloc(d, sizeof(double));
    const double eps = 1e-5;
    rms_norm_forward_f32(y, rstd, x, w, eps, rows, d);
    rms_norm_backward_f32(dx, dw, dy, x, rstd, w, rows, d);
    for (size_t i = 0; i < rows; i++) {
        const float *xi = x + i * d, *gi = dy + i * d;
        double sq = 0, gx = 0;
        for (size_t j = 0; j < d; j++) sq += (double)xi[j] * xi[j];
        const double rs = 1 / sqrt(sq / d + eps);
        for (size_t j = 0; j < d; j++) {
            want_y[i * d + j] = xi[j] * rs * w[j];
            gx += (double)gi[j] * w[j] * xi[j] * rs;
            want_dw[j] += (double)gi[j] * xi[j] * rs;
        }
        for (size_t j = 0; j < d; j++)
            want_dx[i * d + j] = rs * ((double)gi[j] * w[j] - xi[j] * rs * gx / d);
    }
    char what[64];
    snprintf(what, sizeof what, "rms_norm forward  rows=%zu d=%zu", rows, d);
    expect_close(what, y, want_y, rows * d);
    snprintf(what, sizeof what, "rms_norm backward rows=%zu d=%zu", rows, d);
    expect_close(what, dx, want_dx, rows * d);
    expect_close("  dw", dw, want_dw, d);
    free(x), free(w), free(dy), free(y), free(rstd), free(dx), free(dw), free(want_y);
    free(want_dx), free(want_dw);
}

/* RoPE in place (shared tables, rotate-half layout) and its backward, which must undo it:
 * the rotation is orthogonal, so backward(forward(x)) = x. SwiGLU forward and backward. */
static void check_rope_swiglu(size_t batch, size_t seq, size_t heads, size_t D) {
    unsigned st = 7u + (unsigned)(seq * heads + D);
    const size_t n = batch * seq * heads * D, half = D / 2;
    float *x = random_array(n, &st), *x0 = malloc(n * sizeof(float));
    float *cos_t = malloc(seq * D * sizeof(float)), *sin_t = malloc(seq * D * sizeof(float));
    double *want = malloc(n * sizeof(double)), *back = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) x0[i] = x[i], back[i] = x[i];
    for (size_t t = 0; t < seq; t++)
        for (size_t i = 0; i < D; i++) {
            const double a = t * pow(10000.0, -2.0 * (double)(i % half) / D);
            cos_t[t * D + i] = (float)cos(a), sin_t[t * D + i] = (float)sin(a);
        }
    for (size_t row = 0; row < batch * seq; row++)
        for (size_t h = 0; h < heads; h++) {
            const size_t t = row % seq, o = row * heads * D + h * D;
            for (size_t i = 0; i < half; i++) {
                const double u = x0[o + i], v = x0[o + i + half];
                want[o + i] = u * cos_t[t * D + i] - v * sin_t[t * D + i];
                want[o + i + half] = v * cos_t[t * D + i + half] + u * sin_t[t * D + i + half];
            }
        }
    rope_forward_f32(x, cos_t, sin_t, batch, seq, heads, D, 0);
    char what[64];
    snprintf(what, sizeof what, "rope forward  b=%zu seq=%zu heads=%zu D=%zu", batch, seq, heads, D);
    expect_close(what, x, want, n);
    rope_backward_f32(x, cos_t, sin_t, batch, seq, heads, D, 0);
    expect_close("  backward undoes it", x, back, n);

    float *g = random_array(n, &st), *u = random_array(n, &st), *dy = random_array(n, &st);
    float *y = malloc(n * sizeof(float)), *dg = malloc(n * sizeof(float)), *du = malloc(n * sizeof(float));
    double *want_dg = malloc(n * sizeof(double)), *want_du = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        const double s = 1 / (1 + exp(-(double)g[i]));
        want[i] = g[i] * s * u[i];
        want_dg[i] = dy[i] * u[i] * s * (1 + g[i] * (1 - s));
        want_du[i] = dy[i] * g[i] * s;
    }
    swiglu_forward_f32(y, g, u, n);
    swiglu_backward_f32(dg, du, dy, g, u, n);
    snprintf(what, sizeof what, "swiglu forward n=%zu", n);
    expect_close(what, y, want, n);
    expect_close("  dgate", dg, want_dg, n);
    expect_close("  dup", du, want_du, n);
    free(x), free(x0), free(cos_t), free(sin_t), free(want), free(back), free(g), free(u);
    free(dy), free(y), free(dg), free(du), free(want_dg), free(want_du);
}

/* Naive causal GQA attention in double for item b, query head h: the scores of query row i
 * (position off + i) over keys [0, kv_len), masked causally and by key_mask, softmaxed into p;
 * returns 0 when no key is left. */
static int naive_probs(double *p, const float *q, const float *k, const unsigned char *mask,
                       const LoraGqaDims *d, size_t b, size_t h, size_t i, double scale) {
    const size_t D = d->head_dim, hq = d->heads * D, hk = d->kv_heads * D;
    const size_t g = h / (d->heads / d->kv_heads), off = d->kv_len - d->seq;
    double mx = -INFINITY, sum = 0;
    for (size_t j = 0; j < d->kv_len; j++) {
        p[j] = -INFINITY;
        if (j > off + i || (mask && !mask[b * d->mask_ld + j])) continue;
        double s = 0;
        for (size_t c = 0; c < D; c++)
            s += (double)q[(b * d->seq + i) * hq + h * D + c] * k[(b * d->kv_seq + j) * hk + g * D + c];
        p[j] = scale * s;
        if (p[j] > mx) mx = p[j];
    }
    if (mx == -INFINITY) return 0;
    for (size_t j = 0; j < d->kv_len; j++) sum += p[j] = p[j] == -INFINITY ? 0 : exp(p[j] - mx);
    for (size_t j = 0; j < d->kv_len; j++) p[j] /= sum;
    return 1;
}

/* Causal grouped-query attention against naive loops: the forward's ctx (with a KV cache when
 * kv_len > seq, and a left-padding key mask) and, without a cache, the backward's dq, dk, dv
 * from the naive gradients of sum(dctx * ctx). */
static void check_causal_attention(size_t batch, size_t seq, size_t heads, size_t kv_heads,
                                   size_t D, size_t kv_seq, size_t kv_len, int padded) {
    unsigned st = 31u + (unsigned)(seq * 7 + kv_len * 3 + heads + D);
    LoraGqaDims d = {batch, seq, heads, kv_heads, D, kv_seq, kv_len, kv_seq};
    const size_t hq = heads * D, hk = kv_heads * D, nq = batch * seq * hq, nk = batch * kv_seq * hk;
    const double scale = 1 / sqrt((double)D);
    float *q = random_array(nq, &st), *k = random_array(nk, &st), *v = random_array(nk, &st);
    float *dctx = random_array(nq, &st), *ctx = malloc(nq * sizeof(float));
    float *lse = malloc(batch * heads * seq * sizeof(float));
    unsigned char *mask = NULL;
    if (padded) { /* item b has b + 1 padding keys on the left, the last item none */
        mask = malloc(batch * kv_seq);
        for (size_t b = 0; b < batch; b++)
            for (size_t j = 0; j < kv_seq; j++) mask[b * kv_seq + j] = b + 1 == batch || j > b;
    }
    size_t parts = lora_causal_attention_parts(&d, 0);
    void *scratch = malloc(lora_causal_attention_scratch_bytes(&d, sizeof(float), parts));
    causal_attention_forward_f32(ctx, lse, scratch, q, k, v, mask, (float)scale, &d, parts);
    free(scratch);
    double *want = calloc(nq, sizeof(double)), *p = malloc(kv_len * sizeof(double));
    double *want_dq = calloc(nq, sizeof(double)), *want_dk = calloc(nk, sizeof(double));
    double *want_dv = calloc(nk, sizeof(double));
    for (size_t b = 0; b < batch; b++)
        for (size_t h = 0; h < heads; h++)
            for (size_t i = 0; i < seq; i++) {
                if (!naive_probs(p, q, k, mask, &d, b, h, i, scale)) continue;
                const size_t g = h / (heads / kv_heads), qo = (b * seq + i) * hq + h * D;
                double rowdot = 0; /* sum_c dctx * ctx of this row */
                for (size_t j = 0; j < kv_len; j++)
                    for (size_t c = 0; c < D; c++)
                        want[qo + c] += p[j] * v[(b * kv_seq + j) * hk + g * D + c];
                for (size_t c = 0; c < D; c++) rowdot += (double)dctx[qo + c] * want[qo + c];
                for (size_t j = 0; j < kv_len; j++) {
                    const size_t ko = (b * kv_seq + j) * hk + g * D;
                    double dp = 0;
                    for (size_t c = 0; c < D; c++) {
                        dp += (double)dctx[qo + c] * v[ko + c];
                        want_dv[ko + c] += p[j] * dctx[qo + c];
                    }
                    const double ds = p[j] * (dp - rowdot) * scale;
                    for (size_t c = 0; c < D; c++) {
                        want_dq[qo + c] += ds * k[ko + c];
                        want_dk[ko + c] += ds * q[qo + c];
                    }
                }
            }
    char what[96];
    snprintf(what, sizeof what, "causal attention forward b=%zu seq=%zu h=%zu/%zu D=%zu kv=%zu/%zu%s",
             batch, seq, heads, kv_heads, D, kv_len, kv_seq, padded ? " padded" : "");
    expect_close(what, ctx, want, nq);
    if (kv_seq == seq && kv_len == seq) {
        float *dq = malloc(nq * sizeof(float)), *dk = malloc(nk * sizeof(float));
        float *dv = malloc(nk * sizeof(float));
        parts = lora_causal_attention_parts(&d, 1);
        scratch = malloc(lora_causal_attention_scratch_bytes(&d, sizeof(float), parts));
        causal_attention_backward_f32(dq, dk, dv, scratch, dctx, q, k, v, ctx, lse, mask,
                                      (float)scale, &d, parts);
        expect_close("  dq", dq, want_dq, nq);
        expect_close("  dk", dk, want_dk, nk);
        expect_close("  dv", dv, want_dv, nk);
        free(scratch), free(dq), free(dk), free(dv);
    }
    free(q), free(k), free(v), free(dctx), free(ctx), free(lse), free(mask), free(want), free(p);
    free(want_dq), free(want_dk), free(want_dv);
}

/* A quantized weight: quantize, dequantize, and the base products through dense_forward /
 * dense_backward with a LoraPacked of qtype (the dot path for n <= LORA_QDOT_ROWS, tiles
 * otherwise) against naive loops over the dequantized values. */
static void check_quant(int qtype, size_t n, size_t d_in, size_t d_out) {
    unsigned st = 777u + (unsigned)(n * 13 + d_in + d_out + (size_t)qtype);
    float *W = random_array(d_out * d_in, &st), *x = random_array(n * d_in, &st);
    float *dy = random_array(n * d_out, &st), *Wd = malloc(d_out * d_in * sizeof(float));
    float *y = malloc(n * d_out * sizeof(float)), *dx = malloc(n * d_in * sizeof(float));
    uint8_t *q = malloc(d_out * lora_qrow_bytes(qtype, d_in));
    lora_quantize(q, W, d_out, d_in, qtype);
    lora_dequantize(Wd, q, d_out, d_in, qtype);
    double *want_y = calloc(n * d_out, sizeof(double)), *want_dx = calloc(n * d_in, sizeof(double));
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d_out; j++)
            for (size_t k = 0; k < d_in; k++) {
                want_y[i * d_out + j] += (double)x[i * d_in + k] * Wd[j * d_in + k];
                want_dx[i * d_in + k] += (double)dy[i * d_out + j] * Wd[j * d_in + k];
            }
    double worst = 0;
    for (size_t i = 0; i < d_out * d_in; i++) worst = fmax(worst, fabs(Wd[i] - W[i]));
    printf("%-44s max abs err %.2e %s\n", "quantize/dequantize round trip", worst,
           worst < 0.3 ? "ok" : "FAIL");
    failures += !(worst < 0.3);
    size_t tile = lora_quant_scratch_elems(n, d_in, d_out, sizeof(float), 1, 0);
    LoraPacked pk = {q, malloc(tile * sizeof(float)), 0, qtype};
    char what[64];
    dense_forward_f32(y, x, NULL, NULL, NULL, n, d_in, d_out, 0, &pk);
    snprintf(what, sizeof what, "quantized forward %s n=%zu %zux%zu", lora_qtype_name(qtype), n,
             d_out, d_in);
    expect_close(what, y, want_y, n * d_out);
    dense_backward_f32(dx, NULL, dy, x, NULL, n, d_in, d_out, 0, 0, &pk);
    snprintf(what, sizeof what, "quantized backward %s n=%zu", lora_qtype_name(qtype), n);
    expect_close(what, dx, want_dx, n * d_in);
    free(W), free(x), free(dy), free(Wd), free(y), free(dx), free(q), free(pk.xp);
    free(want_y), free(want_dx);
}

/* A batch mixing adapters of different ranks (row kernels and, from rank 32, GEMMs), some
 * rows on the base alone, against naive loops in double. */
static void check_mixed(size_t n, size_t d_in, size_t d_out, size_t n_adapters, size_t r0) {
    unsigned st = 4242u + (unsigned)(n + d_in + n_adapters);
    float *x = random_array(n * d_in, &st), *W = random_array(d_out * d_in, &st);
    float *bias = random_array(d_out, &st), *y = malloc(n * d_out * sizeof(float));
    double *want = malloc(n * d_out * sizeof(double)), *scale = malloc(n_adapters * sizeof(double));
    size_t *rank = malloc(n_adapters * sizeof(size_t)), r_max = 0, m = 0;
    const void **A = malloc(n_adapters * sizeof *A), **B = malloc(n_adapters * sizeof *B);
    int64_t *ids = malloc(n * sizeof *ids);
    for (size_t a = 0; a < n_adapters; a++) {
        rank[a] = r0 + a % 5;
        A[a] = random_array(rank[a] * d_in, &st);
        B[a] = random_array(d_out * rank[a], &st);
        scale[a] = 0.5 + 0.25 * (double)a;
    }
    for (size_t i = 0; i < n; i++) {
        ids[i] = (int64_t)((st = st * 1664525u + 1013904223u) >> 16) % (int64_t)(n_adapters + 1) - 1;
        if (ids[i] >= 0) {
            m++;
            if (rank[ids[i]] > r_max) r_max = rank[ids[i]];
        }
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d_out; j++) {
            double acc = bias[j];
            for (size_t k = 0; k < d_in; k++) acc += (double)x[i * d_in + k] * W[j * d_in + k];
            if (ids[i] >= 0) {
                const size_t a = (size_t)ids[i], r = rank[a];
                const float *Aa = A[a], *Ba = B[a];
                for (size_t q = 0; q < r; q++) {
                    double xa = 0;
                    for (size_t k = 0; k < d_in; k++) xa += (double)x[i * d_in + k] * Aa[q * d_in + k];
                    acc += scale[a] * xa * Ba[j * r + q];
                }
            }
            want[i * d_out + j] = acc;
        }
    const size_t parts = lora_mixed_parts(m, d_in, d_out, r_max);
    size_t *index = malloc(lora_mixed_index_elems(n, n_adapters) * sizeof(size_t));
    float *scratch = malloc(parts * lora_mixed_part_elems(d_in, d_out, r_max) * sizeof(float) + 64);
    lora_mixed_forward_f32(y, scratch, index, x, W, bias, NULL, A, B, scale, rank, ids, n, d_in,
                           d_out, n_adapters, r_max, parts, 0, 0, NULL);
    char what[64];
    snprintf(what, sizeof what, "mixed n=%zu d=%zux%zu adapters=%zu r>=%zu", n, d_in, d_out,
             n_adapters, r0);
    expect_close(what, y, want, n * d_out);
    for (size_t a = 0; a < n_adapters; a++) free((void *)A[a]), free((void *)B[a]);
    free(x), free(W), free(bias), free(y), free(want), free(scale), free(rank), free(A), free(B);
    free(ids), free(index), free(scratch);
}

int main(void) {
    check_layer(1, 9, 7, 1);
    check_layer(1, 300, 1001, 2); /* one row: the threaded gemv, an odd tail of rows */
    check_layer(5, 33, 17, 3);
    check_layer(70, 64, 40, 8);
    check_layer(130, 100, 70, 33);
    check_layer(1500, 50, 90, 7); /* the backward splits its rows over threads */
    check_merge(515, 700, 5);
    check_merge(1030, 1027, 16);
    check_merge(64, 96, 40);
    check_packed(1, 37, 45);
    check_packed(7, 300, 70);
    check_packed(64, 520, 33);
    check_packed(300, 48, 900); /* dx by blocks of rows */
    check_packed(530, 700, 600); /* both by blocks: two of rows, two of steps, 8-panel chunks */
    check_rms_norm(3, 17);
    check_rms_norm(700, 576); /* both passes split over threads */
    check_rope_swiglu(1, 5, 3, 8);
    check_rope_swiglu(4, 64, 9, 64);
    check_causal_attention(1, 1, 1, 1, 4, 1, 1, 0);
    check_causal_attention(2, 37, 6, 2, 16, 37, 37, 1);   /* GQA, left padding, odd tiles */
    check_causal_attention(3, 130, 9, 3, 64, 130, 130, 0); /* SmolLM2's heads, several tiles */
    check_causal_attention(2, 1, 9, 3, 64, 80, 57, 1);    /* one decode step on a KV cache */
    check_causal_attention(2, 5, 4, 1, 8, 40, 21, 0);     /* a chunk of queries on a cache */
    check_quant(LORA_Q4_1, 1, 576, 192);
    check_quant(LORA_Q8_0, 3, 96, 37);
    check_quant(LORA_NF4, 4, 128, 65);
    check_quant(LORA_Q4_0, 9, 512, 700); /* two tiles of rows */
    check_quant(LORA_NF4_DQ, 1, 576, 70);
    check_quant(LORA_NF4_DQ, 3, 64 * 300, 5); /* two groups of scales, the direct path */
    check_quant(LORA_NF4_DQ, 6, 64 * 300, 40); /* the tiles */
    check_dora_norm(1, 1, 1);
    check_dora_norm(300, 70, 8); /* rows over threads */
    check_conv(1, 1, 1, 1, 1, 1, 1, 0, 1);
    check_conv(2, 3, 9, 7, 3, 2, 2, 1, 2);
    check_conv(4, 16, 32, 32, 3, 3, 1, 1, 1); /* rows and planes over threads */
    check_mixed(1, 16, 9, 1, 2);
    check_mixed(50, 40, 33, 7, 3);
    check_mixed(400, 96, 80, 20, 6); /* segments over tiles and threads */
    check_mixed(60, 48, 24, 3, 32);  /* the GEMM path */
    printf("%s\n", failures ? "FAILED" : "all kernel checks passed");
    return failures != 0;
}
