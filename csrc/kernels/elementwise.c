/* kernels/elementwise.c: the passes that touch each element a fixed number of times:
 * the dropout mask, exact GELU, LayerNorm and the Adam/AdamW step, for float32 and float64.
 *
 * GELU's float32 path is written here by hand (a portable loop, an AVX-512 one and an AVX2
 * one); dropout's
 * rows, Adam and LayerNorm are type-generic, in elementwise_impl.h. This file deliberately
 * calls no BLAS and splits its loops over threads only through lora_parallel_for.
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LORA_AVX512_GELU 1
#else
#define LORA_AVX512_GELU 0
#endif

uint64_t lora_dropout_key(uint64_t seed) { return mix64(seed ^ 0x6a09e667f3bcc909ULL); }

/* An element is dropped when the top 24 bits of its hash fall below p * 2^24. */
uint32_t lora_dropout_threshold(double p) { return (uint32_t)(p * 16777216.0); }

#define LORA_IMPL "elementwise_impl.h"
#include "instantiate.h"

/* ------------------------------------------------------------------ GELU
 * Exact GELU, y = x Phi(x) with Phi the standard normal CDF (torch.nn.GELU(approximate=
 * "none"), transformers' "gelu"); backward dx = dy (Phi(x) + x phi(x)).
 * float32 evaluates Phi without libm, so the loop vectorises: Phi(x) = (1 + tanh(x Q(x^2)))/2
 * with x clamped to [-5.5, 5.5], Q a degree-6 least-squares fit of atanh(2 Phi(x) - 1) / x
 * (absolute error in Phi below 1.2e-7 for every float32 x), and tanh and exp written out
 * (Cody-Waite reduction, degree-6 polynomial, 2^k by exponent bits). float64 uses libm's erfc
 * and exp. */

/* d/dx [x Phi(x)] = Phi(x) + x phi(x) for x < -5.5, where Phi's fit is clamped: with
 * Phi(x) = phi(x) / |x| (1 - 1/x^2 + 3/x^4 - 15/x^6 + ...) (the asymptotic series of Mills'
 * ratio, relative error below 1e-4 from 5.5 on), the sum is phi(x) (s - x^2) / |x|. phi is 0
 * once e^{-x^2/2} underflows, so the gradient is 0 there, as in float64. */
static inline __attribute__((always_inline)) float gelu_grad_tail_f32(float x, float phi) {
    const float x2 = fminf(x * x, 1e30f), t = 1.0f / x2; /* finite where phi is 0 */
    const float s = 1.0f + t * (-1.0f + t * (3.0f - 15.0f * t));
    return phi * (s - x2) / -x;
}

static const float PHI_Q[7] = {1.4837265769573214e-09f, -1.2236445995753297e-07f,
                               3.839070739526135e-06f,  -5.461685385149854e-05f,
                               -3.4230931419704096e-05f, 0.0363345452933773f,
                               0.7978846199095683f};

static inline __attribute__((always_inline)) float normal_cdf_f32(float x) {
    const float xc = x < -5.5f ? -5.5f : x > 5.5f ? 5.5f : x;
    const float x2 = xc * xc;
    const float q = (((((PHI_Q[0] * x2 + PHI_Q[1]) * x2 + PHI_Q[2]) * x2 + PHI_Q[3]) * x2 +
                      PHI_Q[4]) * x2 + PHI_Q[5]) * x2 + PHI_Q[6];
    /* tanh(u) = 1 - 2 / (1 + e^{2u}); |u| <= 5.5 * 0.8 keeps e^{2u} finite */
    const float u = xc * q;
    const float t = 1.0f - 2.0f / (1.0f + exp_f32(2.0f * u));
    return 0.5f + 0.5f * t;
}

typedef struct {
    float *out;
    const float *dy, *x;
} GeluArgs;

#if LORA_AVX512_GELU
/* The same GELU written with AVX-512 intrinsics, for what GCC cannot do on its own: the
 * reciprocal as rcp14 and one Newton step instead of a divide (which holds one of the two
 * vector ports for ~10 cycles), 2^k by vscalefps, and Phi as 1 / (1 + e^{-2u}) (= 1/2 +
 * tanh(u)/2 with one operation less). min/max take the constant first so a NaN x stays NaN.
 * Same u = x Q(x^2) as the loop above, so the same absolute error in Phi (1.2e-7, the fit's),
 * tested against erf in float64. */
#define LORA_AVX512 __attribute__((target("avx512f,fma")))

/* e^x for x in [-87, 87] (Phi's argument is within +-18; normal_pdf_512 masks the lanes of
 * phi's argument below -87, whatever this returns for them): no clamp here, and k = round(x / ln 2) by adding and subtracting 1.5 * 2^23
 * instead of vrndscaleps (two uops on one port). */
static LORA_AVX512 inline __m512 exp_512(__m512 x) {
    const __m512 shift = _mm512_set1_ps(12582912.0f);
    const __m512 k = _mm512_sub_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift), shift);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

static LORA_AVX512 inline __m512 normal_cdf_512(__m512 x) {
    const __m512 xc =
        _mm512_max_ps(_mm512_set1_ps(-5.5f), _mm512_min_ps(_mm512_set1_ps(5.5f), x));
    const __m512 x2 = _mm512_mul_ps(xc, xc);
    __m512 q = _mm512_set1_ps(-2.0f * PHI_Q[0]); /* -2 Q(x^2): the -2 folded in */
    for (int j = 1; j < 7; j++) q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-2.0f * PHI_Q[j]));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_512(_mm512_mul_ps(xc, q)));
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

/* phi(x), 0 where e^{-x^2/2} underflows (|x| > 13.2) rather than the e^-87 of a clamp; exp_512
 * sees arguments below -87 there, whose lanes the mask then drops. */
static LORA_AVX512 inline __m512 normal_pdf_512(__m512 half_x2) {
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(half_x2, _mm512_set1_ps(-87.0f), _CMP_GE_OQ),
                               _mm512_set1_ps(0.3989422804014327f), exp_512(half_x2));
}

/* 1 - 1/x^2 + 3/x^4 - 15/x^6, the series of Mills' ratio (gelu_grad_tail_f32); x^2 capped so
 * that the lanes where phi is 0 stay finite. */
static LORA_AVX512 inline __m512 mills_series_512(__m512 v, __m512 *x2_out) {
    const __m512 x2 = _mm512_min_ps(_mm512_set1_ps(1e30f), _mm512_mul_ps(v, v));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), x2);
    __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(-15.0f), t, _mm512_set1_ps(3.0f));
    s = _mm512_fmadd_ps(s, t, _mm512_set1_ps(-1.0f));
    *x2_out = x2;
    return _mm512_fmadd_ps(s, t, _mm512_set1_ps(1.0f));
}

static LORA_AVX512 void gelu_forward_512(float *y, const float *x, size_t begin, size_t end) {
    for (size_t i = begin; i < end; i += 16) {
        const __mmask16 m = end - i >= 16 ? 0xffff : (__mmask16)((1u << (end - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512 out = _mm512_mul_ps(v, normal_cdf_512(v));
        /* below -5.5 the fit's clamped Phi would give x Phi(-5.5) (-2e22 at x = -1e30):
         * there x Phi(x) = -phi(x) s(x) */
        const __mmask16 tail = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-5.5f), _CMP_LT_OQ);
        if (tail) {
            __m512 x2;
            const __m512 s = mills_series_512(v, &x2);
            const __m512 phi = normal_pdf_512(_mm512_mul_ps(x2, _mm512_set1_ps(-0.5f)));
            out = _mm512_mask_mul_ps(out, tail, phi, _mm512_sub_ps(_mm512_setzero_ps(), s));
        }
        _mm512_mask_storeu_ps(y + i, m, out);
    }
}

static LORA_AVX512 void gelu_backward_512(float *dx, const float *dy, const float *x,
                                          size_t begin, size_t end) {
    for (size_t i = begin; i < end; i += 16) {
        const __mmask16 m = end - i >= 16 ? 0xffff : (__mmask16)((1u << (end - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 half_x2 = _mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(-0.5f));
        const __m512 phi = normal_pdf_512(half_x2);
        __m512 dphi = _mm512_fmadd_ps(v, phi, normal_cdf_512(v)); /* NaN stays NaN */
        /* below -5.5, where Phi is clamped: Phi + x phi = phi (s - x^2) / |x| */
        const __mmask16 tail = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-5.5f), _CMP_LT_OQ);
        if (tail) {
            __m512 x2;
            const __m512 s = mills_series_512(v, &x2);
            dphi = _mm512_mask_div_ps(dphi, tail, _mm512_mul_ps(phi, _mm512_sub_ps(s, x2)),
                                      _mm512_sub_ps(_mm512_setzero_ps(), v));
        }
        _mm512_mask_storeu_ps(dx + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), dphi));
    }
}

/* The same again with AVX2 and FMA, for CPUs without AVX-512 (where GCC's loop above ran
 * 5x slower than PyTorch's GELU): rcp_ps (12 bits) and one Newton step for the reciprocal,
 * 2^k from the exponent bits, blends for the masks; the last n % 8 elements take the portable
 * loop. */
#define LORA_AVX2_GELU __attribute__((target("avx2,fma")))

/* e^x for x in [-87, 87]: as exp_512, 2^k built from its exponent bits. */
static LORA_AVX2_GELU inline __m256 exp_256(__m256 x) {
    const __m256 shift = _mm256_set1_ps(12582912.0f);
    const __m256 k = _mm256_sub_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift), shift);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static LORA_AVX2_GELU inline __m256 normal_cdf_256(__m256 x) {
    const __m256 xc =
        _mm256_max_ps(_mm256_set1_ps(-5.5f), _mm256_min_ps(_mm256_set1_ps(5.5f), x));
    const __m256 x2 = _mm256_mul_ps(xc, xc);
    __m256 q = _mm256_set1_ps(-2.0f * PHI_Q[0]);
    for (int j = 1; j < 7; j++) q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.0f * PHI_Q[j]));
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_256(_mm256_mul_ps(xc, q)));
    const __m256 r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

/* phi(x) from -x^2/2, 0 where e^{-x^2/2} underflows (the argument below -87, clamped there
 * for exp_256 and masked after). */
static LORA_AVX2_GELU inline __m256 normal_pdf_256(__m256 half_x2) {
    const __m256 keep = _mm256_cmp_ps(half_x2, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m256 e = exp_256(_mm256_max_ps(_mm256_set1_ps(-87.0f), half_x2));
    return _mm256_and_ps(keep, _mm256_mul_ps(_mm256_set1_ps(0.3989422804014327f), e));
}

static LORA_AVX2_GELU inline __m256 mills_series_256(__m256 v, __m256 *x2_out) {
    const __m256 x2 = _mm256_min_ps(_mm256_set1_ps(1e30f), _mm256_mul_ps(v, v));
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), x2);
    __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(-15.0f), t, _mm256_set1_ps(3.0f));
    s = _mm256_fmadd_ps(s, t, _mm256_set1_ps(-1.0f));
    *x2_out = x2;
    return _mm256_fmadd_ps(s, t, _mm256_set1_ps(1.0f));
}

/* Returns the first element it did not do (the tail of fewer than 8). */
static LORA_AVX2_GELU size_t gelu_forward_256(float *y, const float *x, size_t begin,
                                              size_t end) {
    size_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        __m256 out = _mm256_mul_ps(v, normal_cdf_256(v));
        const __m256 tail = _mm256_cmp_ps(v, _mm256_set1_ps(-5.5f), _CMP_LT_OQ);
        if (_mm256_movemask_ps(tail)) {
            __m256 x2;
            const __m256 s = mills_series_256(v, &x2);
            const __m256 phi = normal_pdf_256(_mm256_mul_ps(x2, _mm256_set1_ps(-0.5f)));
            out = _mm256_blendv_ps(out, _mm256_mul_ps(phi, _mm256_sub_ps(_mm256_setzero_ps(), s)),
                                   tail);
        }
        _mm256_storeu_ps(y + i, out);
    }
    return i;
}

static LORA_AVX2_GELU size_t gelu_backward_256(float *dx, const float *dy, const float *x,
                                               size_t begin, size_t end) {
    size_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 half_x2 = _mm256_mul_ps(_mm256_mul_ps(v, v), _mm256_set1_ps(-0.5f));
        const __m256 phi = normal_pdf_256(half_x2);
        __m256 dphi = _mm256_fmadd_ps(v, phi, normal_cdf_256(v));
        const __m256 tail = _mm256_cmp_ps(v, _mm256_set1_ps(-5.5f), _CMP_LT_OQ);
        if (_mm256_movemask_ps(tail)) {
            __m256 x2;
            const __m256 s = mills_series_256(v, &x2);
            const __m256 t = _mm256_div_ps(_mm256_mul_ps(phi, _mm256_sub_ps(s, x2)),
                                           _mm256_sub_ps(_mm256_setzero_ps(), v));
            dphi = _mm256_blendv_ps(dphi, t, tail);
        }
        _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), dphi));
    }
    return i;
}

static int portable_gelu(void) {
    const char *portable = getenv("LORA_PORTABLE_GELU");
    return portable && *portable && *portable != '0';
}

/* Whether to take an intrinsics path: the CPU has AVX-512F (or AVX2) and FMA, and
 * LORA_PORTABLE_GELU is not set in the environment (set, it forces the portable loop that
 * other CPUs run, so that the tests check that loop on these machines too). Read once. */
static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0)
        cached = !portable_gelu() && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("fma");
    return cached;
}

static int have_avx2_gelu(void) {
    static int cached = -1;
    if (cached < 0)
        cached = !portable_gelu() && __builtin_cpu_supports("avx2") &&
                 __builtin_cpu_supports("fma");
    return cached;
}
#endif

static LORA_CLONES LORA_FMA void gelu_forward_range(void *arg, size_t begin, size_t end) {
    const GeluArgs *g = arg;
    float *restrict y = g->out;
    const float *restrict x = g->x;
#if LORA_AVX512_GELU
    if (have_avx512()) {
        gelu_forward_512(y, x, begin, end);
        return;
    }
    if (have_avx2_gelu()) begin = gelu_forward_256(y, x, begin, end);
#endif
    for (size_t i = begin; i < end; i++) y[i] = x[i] * normal_cdf_f32(x[i]);
}

void gelu_forward_f32(float *y, const float *x, size_t n) {
    GeluArgs g = {y, NULL, x};
    lora_parallel_for(n, 1 << 16, 16, gelu_forward_range, &g);
}

static LORA_CLONES LORA_FMA void gelu_backward_range(void *arg, size_t begin, size_t end) {
    const GeluArgs *g = arg;
    float *restrict dx = g->out;
    const float *restrict dy = g->dy, *restrict x = g->x;
    /* Two loops, phi then the rest, over blocks that stay in L1: as one loop GCC gives up
     * if-converting the clamps and does not vectorise it. exp_f32 clamps its argument at
     * -87, where phi is below 1e-38 anyway. */
#if LORA_AVX512_GELU
    if (have_avx512()) {
        gelu_backward_512(dx, dy, x, begin, end);
        return;
    }
    if (have_avx2_gelu()) begin = gelu_backward_256(dx, dy, x, begin, end);
#endif
    float phi[1024];
    for (size_t i0 = begin; i0 < end; i0 += 1024) {
        const size_t m = end - i0 < 1024 ? end - i0 : 1024;
        const float *xb = x + i0;
        for (size_t i = 0; i < m; i++) {
            const float h = -0.5f * xb[i] * xb[i];
            phi[i] = h >= -87.0f ? 0.3989422804014327f * exp_f32(h) : 0.0f; /* 0 on underflow */
        }
        for (size_t i = 0; i < m; i++) {
            const float d = xb[i] < -5.5f ? gelu_grad_tail_f32(xb[i], phi[i])
                                          : normal_cdf_f32(xb[i]) + xb[i] * phi[i];
            dx[i0 + i] = dy[i0 + i] * d;
        }
    }
}

void gelu_backward_f32(float *dx, const float *dy, const float *x, size_t n) {
    GeluArgs g = {dx, dy, x};
    lora_parallel_for(n, 1 << 16, 16, gelu_backward_range, &g);
}

/* float64: Phi(x) = erfc(-x / sqrt 2) / 2, which keeps its ~1e-16 values below x = -8 where
 * (1 + erf(x / sqrt 2)) / 2 cancels to 0. */
void gelu_forward_f64(double *y, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = 0.5 * x[i] * erfc(-x[i] * 0.70710678118654752);
}

void gelu_backward_f64(double *dx, const double *dy, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double cdf = 0.5 * erfc(-x[i] * 0.70710678118654752);
        const double pdf = 0.3989422804014327 * exp(-0.5 * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
}
