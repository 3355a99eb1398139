/* kernels/internal.h: what the kernel files share and no one else sees.
 *
 * Holds the compile-time switches (target clones, FMA contraction), the dropout hash, the
 * exp polynomial, the 64-byte vector type and its loads, and the prototypes that cross
 * files inside csrc/kernels/ (lora_threads, dropout_rows, panel_gemm). Everything hot that a
 * caller in another file must inline is `static inline` here.
 * It deliberately declares nothing for Python or the binding: the public kernel API is
 * csrc/kernels.h, which this file includes.
 */
#ifndef LORA_KERNELS_INTERNAL_H
#define LORA_KERNELS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../kernels.h"

/* Hand-written loops (dropout, merge, Adam) are compiled for AVX-512, AVX2 and baseline
 * x86-64 and picked at load time, so one wheel is fast on every machine. Sanitizer builds
 * define LORA_NO_CLONES (ifunc resolvers run before the sanitizer runtime is ready). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LORA_NO_CLONES)
#define LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_CLONES
#endif

/* The build compiles with -ffp-contract=off so that Adam rounds as PyTorch does. Kernels whose
 * rounding no one matches bit for bit (the rank-r and attention micro-kernels, GELU's
 * polynomials, the softmax's exp) ask for FMAs back: half the instructions and latency. */
#if defined(__GNUC__) && !defined(__clang__)
#define LORA_FMA __attribute__((optimize("fp-contract=fast")))
#else
#define LORA_FMA
#endif

/* Most threads lora_parallel_for and the pool use. */
#define LORA_MAX_THREADS 64

/* How many threads lora uses for `work` units that each deserve a thread of their own: as
 * many as the linked OpenBLAS is set to (lora.set_num_threads), at most `work`, at most
 * LORA_MAX_THREADS, at least one (threads.c). */
size_t lora_threads(size_t work);

/* Whether the CPU has AVX-512 (read once, threads.c). The register-blocked loops written with
 * the 64-byte vectors below keep their tiles in AVX-512's 32 registers; GCC lowers them for
 * AVX2 with the tiles on the stack, so without AVX-512 they take tiles of 32-byte vectors
 * instead (attention's small_gemm, lora's rank_update and row_dots). */
int lora_wide_vectors(void);

/* SplitMix64's finaliser (Steele, Lea, Flood 2014): a bijective mix with full avalanche,
 * so consecutive element indices give independent-looking bits. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define LORA_GOLDEN 0x9e3779b97f4a7c15ULL

/* Element `index` is kept when the top 24 bits of its hash are at least the threshold
 * (lora_dropout_threshold: p * 2^24). */
static inline int dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
    return (uint32_t)(mix64(key + index * LORA_GOLDEN) >> 40) >= threshold;
}

/* e^x for x in [-87, 88], float32, ~2 ulp; no libm call, so it vectorises. */
static inline __attribute__((always_inline)) float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* One 64-byte vector of T (16 float32 or 8 float64) and unaligned loads and stores of it;
 * GCC lowers the arithmetic to the widest vectors the clone targets. */
#define LORA_VEC(T, SUF)                                                                      \
    typedef T vec_##SUF __attribute__((vector_size(64)));                                     \
    static inline vec_##SUF vload_##SUF(const T *p) {                                        \
        vec_##SUF v;                                                                          \
        memcpy(&v, p, sizeof v);                                                              \
        return v;                                                                             \
    }                                                                                         \
    static inline void vstore_##SUF(T *p, vec_##SUF v) { memcpy(p, &v, sizeof v); }
LORA_VEC(float, f32)
LORA_VEC(double, f64)
#undef LORA_VEC

/* A 32-byte vector of T and its loads and stores, for the tiles of CPUs without AVX-512. */
#define LORA_VEC32(T, SUF)                                                                    \
    typedef T vec32_##SUF __attribute__((vector_size(32)));                                   \
    static inline vec32_##SUF vload32_##SUF(const T *p) {                                    \
        vec32_##SUF v;                                                                        \
        memcpy(&v, p, sizeof v);                                                              \
        return v;                                                                             \
    }                                                                                         \
    static inline void vstore32_##SUF(T *p, vec32_##SUF v) { memcpy(p, &v, sizeof v); }
LORA_VEC32(float, f32)
LORA_VEC32(double, f64)
#undef LORA_VEC32

/* Prototypes that cross files, for both types:
 *   dropout_rows (elementwise.c): out (rows, d_in) = dropout(x rows row0 .. row0+rows-1),
 *     kept elements scaled by keep_scale, dropped ones zero; with `acc` added to out instead.
 *   panel_gemm (panel_gemm.c): C (n, N) += X (n, K) M with M as panels (pack_panels), on
 *     `parts` threads (lora_panel_parts); xp: lora_panel_scratch_elems(parts, n, K, sizeof(T))
 *     elements of scratch.
 *   quant_forward / quant_backward (quant.c): the base products with a quantized W (N rows of
 *     K elements): y = x W^T + beta y, dx = dy W + beta dx; tile: lora_quant_scratch_elems;
 *     act8: LoraPacked's. */
#define LORA_DECLARE_INTERNAL(T, SUF)                                                         \
    void dropout_rows_##SUF(T *restrict out, const T *restrict x, size_t row0, size_t rows,   \
                            size_t d_in, uint64_t key, uint32_t threshold, T keep_scale,      \
                            int acc);                                                         \
    void panel_gemm_##SUF(T *C, T *xp, const T *X, const T *P, size_t n, size_t K, size_t N,  \
                          size_t parts);                                                      \
    void quant_forward_##SUF(T *y, T *tile, const T *x, const uint8_t *W, int qtype,          \
                             int act8, T beta, size_t n, size_t K, size_t N);                 \
    void quant_backward_##SUF(T *dx, T *tile, const T *dy, const uint8_t *W, int qtype,       \
                              T beta, size_t n, size_t K, size_t N);
LORA_DECLARE_INTERNAL(float, f32)
LORA_DECLARE_INTERNAL(double, f64)
#undef LORA_DECLARE_INTERNAL

#endif /* LORA_KERNELS_INTERNAL_H */
