/* kernels.c: the LoRA kernels for float32 and float64.
 *
 * The type-generic bodies live in kernels_impl.inc, included once per type with T, SUF and
 * the BLAS names defined. This file holds what both share: the dropout generator and the
 * scratch size. No Python here, so the kernels can be built into a C test or benchmark.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
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

/* The build compiles with -ffp-contract=off so that Adam rounds as PyTorch does; the merge
 * micro-kernel, whose rounding no one matches bit for bit, asks for FMAs back. */
#if defined(__GNUC__) && !defined(__clang__)
#define LORA_FMA __attribute__((optimize("fp-contract=fast")))
#else
#define LORA_FMA
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

/* Runs fn(ctx, begin, end) over [0, n) split into equal chunks (multiples of `align`), one
 * per thread, as many threads as the linked OpenBLAS is set to use (lora.set_num_threads),
 * but none for less than `grain` items each. For the memory-bound loops (merge, Adam) that
 * one core cannot saturate memory with, which run on their own, not between GEMMs. Threads are started per call: at the sizes where
 * this splits at all, that costs ~1% of the call. Falls back to one thread if pthread_create
 * fails. */
typedef struct {
    void (*fn)(void *, size_t, size_t);
    void *ctx;
    size_t begin, end;
} Chunk;

static void *run_chunk(void *arg) {
    Chunk *c = arg;
    c->fn(c->ctx, c->begin, c->end);
    return NULL;
}

#define LORA_MAX_THREADS 64

void lora_parallel_for(size_t n, size_t grain, size_t align, void (*fn)(void *, size_t, size_t),
                       void *ctx) {
    size_t threads = (size_t)CBLAS_FUNC(openblas_get_num_threads)();
    if (threads > n / grain) threads = n / grain;
    if (threads > LORA_MAX_THREADS) threads = LORA_MAX_THREADS;
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    Chunk chunks[LORA_MAX_THREADS];
    pthread_t ids[LORA_MAX_THREADS];
    int started[LORA_MAX_THREADS] = {0};
    size_t per = (n / threads + align - 1) / align * align, begin = 0;
    for (size_t t = 0; t < threads; t++) {
        size_t end = begin + per < n && t + 1 < threads ? begin + per : n;
        chunks[t] = (Chunk){fn, ctx, begin, end};
        begin = end;
    }
    for (size_t t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_chunk, &chunks[t]) == 0;
    run_chunk(&chunks[0]);
    for (size_t t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_chunk(&chunks[t]);
    }
}

size_t lora_scratch_elems(size_t n, size_t d_in, size_t d_out, size_t r, int has_dropout) {
    size_t tile_rows = n < LORA_DROPOUT_TILE_ROWS ? n : LORA_DROPOUT_TILE_ROWS;
    /* n*r for g = dy B in the backward, r*d_out for B^T, one tile of rows for dropout. */
    return n * r + r * d_out + (has_dropout ? tile_rows * d_in : 0) + 1;
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
