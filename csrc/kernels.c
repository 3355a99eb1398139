/* kernels.c: the LoRA kernels for float32 and float64.
 *
 * The type-generic bodies live in kernels_impl.inc, included once per type with T, SUF and
 * the BLAS names defined. This file holds what both share: the dropout generator and the
 * scratch size. No Python here, so the kernels can be built into a C test or benchmark.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "blas.h"

/* Hand-written loops (dropout, merge, Adam) are compiled for AVX-512, AVX2 and baseline
 * x86-64 and picked at load time, so one wheel is fast on every machine. Sanitizer builds
 * define LORA_NO_CLONES (ifunc resolvers run before the sanitizer runtime is ready). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LORA_NO_CLONES)
#define LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_CLONES
#endif

/* SplitMix64's finaliser (Steele, Lea, Flood 2014): a bijective mix with full avalanche,
 * so consecutive element indices give independent-looking bits. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define LORA_GOLDEN 0x9e3779b97f4a7c15ULL

uint64_t lora_dropout_key(uint64_t seed) { return mix64(seed ^ 0x6a09e667f3bcc909ULL); }

/* An element is dropped when the top 24 bits of its hash fall below p * 2^24. */
uint32_t lora_dropout_threshold(double p) { return (uint32_t)(p * 16777216.0); }

static inline int dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
    return (uint32_t)(mix64(key + index * LORA_GOLDEN) >> 40) >= threshold;
}

size_t lora_scratch_elems(size_t n, size_t d_in, size_t r, int has_dropout) {
    size_t tile_rows = n < LORA_DROPOUT_TILE_ROWS ? n : LORA_DROPOUT_TILE_ROWS;
    /* n*r for g = dy B in the backward; one tile of rows of x for dropout. */
    return n * r + (has_dropout ? tile_rows * d_in : 0) + 1;
}

#define T float
#define SUF f32
#define GEMM CBLAS_FUNC(cblas_sgemm)
#define GEMV CBLAS_FUNC(cblas_sgemv)
#define GER CBLAS_FUNC(cblas_sger)
#define SQRT sqrtf
#include "kernels_impl.inc"
#undef T
#undef SUF
#undef GEMM
#undef GEMV
#undef GER
#undef SQRT

#define T double
#define SUF f64
#define GEMM CBLAS_FUNC(cblas_dgemm)
#define GEMV CBLAS_FUNC(cblas_dgemv)
#define GER CBLAS_FUNC(cblas_dger)
#define SQRT sqrt
#include "kernels_impl.inc"
