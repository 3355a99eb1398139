/* kernels.c: the LoRA kernels for float32 and float64.
 *
 * The type-generic bodies live in kernels_impl.inc, included once per type with T, SUF and
 * the BLAS names defined. This file holds what both share: the dropout generator and the
 * scratch size. No Python here, so the kernels can be built into a C test or benchmark.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blas.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LORA_AVX512_GELU 1
#else
#define LORA_AVX512_GELU 0
#endif

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

/* ------------------------------------------------------------------ threads
 * One pool of worker threads runs lora's parallel loops and, through OpenBLAS's
 * caller-managed threading hook (openblas_set_threads_callback_function), OpenBLAS's own
 * parallel jobs too: the second core is then never fought over by two sets of threads, a
 * GEMM does not wait for OpenBLAS's sleeping worker to wake, and no thread is started per
 * call. Workers spin ~200 us for the next job, then sleep on a condition variable.
 * A dispatch runs job(ctx, 0) on the calling thread and job(ctx, i) on worker i for
 * 0 < i < njobs, all at once (OpenBLAS's jobs wait on each other), and returns when all are
 * done. One dispatch at a time: a caller that finds the pool busy (another Python thread, or
 * a job that dispatches) starts threads of its own for that call, as does a dispatch whose
 * worker cannot be started. A forked child starts a fresh pool. */

#define LORA_MAX_THREADS 64
#define LORA_SPIN_NS 200000

typedef void (*lora_job)(void *ctx, int i);

static struct {
    pthread_mutex_t dispatch, sleep;
    pthread_cond_t wake;
    int workers; /* started so far */
    lora_job job;
    void *ctx;
    int njobs;
    _Atomic unsigned long generation;
    _Atomic int pending, sleepers;
} pool = {.dispatch = PTHREAD_MUTEX_INITIALIZER,
            .sleep = PTHREAD_MUTEX_INITIALIZER,
            .wake = PTHREAD_COND_INITIALIZER};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The generation each worker was started in (it may first run after the dispatch that
 * started it has already been published). */
static unsigned long pool_start_generation[LORA_MAX_THREADS];

static void *pool_worker(void *arg) {
    const int me = (int)(intptr_t)arg;
    unsigned long seen = pool_start_generation[me];
    for (;;) {
        const uint64_t until = now_ns() + LORA_SPIN_NS;
        unsigned spins = 0;
        while (atomic_load(&pool.generation) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() > until) {
                pthread_mutex_lock(&pool.sleep);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.generation) == seen)
                    pthread_cond_wait(&pool.wake, &pool.sleep);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.sleep);
            }
        }
        seen = atomic_load(&pool.generation);
        if (me < pool.njobs) pool.job(pool.ctx, me);
        atomic_fetch_sub(&pool.pending, 1);
    }
    return NULL;
}

static void pool_after_fork(void) {
    pthread_mutex_init(&pool.dispatch, NULL);
    pthread_mutex_init(&pool.sleep, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleepers, 0);
}

typedef struct {
    lora_job job;
    void *ctx;
    int i;
} Spawned;

static void *run_spawned(void *arg) {
    Spawned *s = arg;
    s->job(s->ctx, s->i);
    return NULL;
}

/* The fallback: a thread per job, started and joined here; a job whose thread cannot be
 * started runs on the caller (OpenBLAS's jobs wait on each other, so they need their threads:
 * only a system out of threads or memory denies them). */
static void run_spawning(lora_job job, void *ctx, int njobs) {
    Spawned *s = malloc((size_t)njobs * sizeof *s);
    pthread_t *ids = malloc((size_t)njobs * sizeof *ids);
    int *started = calloc((size_t)njobs, sizeof *started);
    for (int i = 1; s && ids && started && i < njobs; i++) {
        s[i] = (Spawned){job, ctx, i};
        started[i] = pthread_create(&ids[i], NULL, run_spawned, &s[i]) == 0;
    }
    job(ctx, 0);
    for (int i = 1; i < njobs; i++) {
        if (started && started[i])
            pthread_join(ids[i], NULL);
        else
            job(ctx, i);
    }
    free(s);
    free(ids);
    free(started);
}

static void lora_pool_register_fork(void);

static void run_jobs(lora_job job, void *ctx, int njobs) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (njobs <= 1) {
        if (njobs == 1) job(ctx, 0);
        return;
    }
    if (njobs > LORA_MAX_THREADS || pthread_mutex_trylock(&pool.dispatch) != 0) {
        run_spawning(job, ctx, njobs);
        return;
    }
    pthread_once(&once, lora_pool_register_fork);
    while (pool.workers < njobs - 1) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool_start_generation[pool.workers + 1] = atomic_load(&pool.generation);
        const int ok = pthread_create(&id, &attr, pool_worker,
                                      (void *)(intptr_t)(pool.workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.workers++;
    }
    if (pool.workers < njobs - 1) {
        pthread_mutex_unlock(&pool.dispatch);
        run_spawning(job, ctx, njobs);
        return;
    }
    pool.job = job;
    pool.ctx = ctx;
    pool.njobs = njobs;
    atomic_store(&pool.pending, pool.workers);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep);
    }
    job(ctx, 0);
    while (atomic_load(&pool.pending) > 0) cpu_relax();
    pthread_mutex_unlock(&pool.dispatch);
}

static void lora_pool_register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

#ifndef LORA_SYSTEM_BLAS
/* OpenBLAS's jobs through the pool: job i is dojob(i, jobdata + i * elsize, dojob_data). */
typedef struct {
    openblas_dojob_callback dojob;
    char *jobdata;
    size_t elsize;
    int dojob_data;
} BlasJobs;

static void run_blas_job(void *ctx, int i) {
    const BlasJobs *b = ctx;
    b->dojob(i, b->jobdata + (size_t)i * b->elsize, b->dojob_data);
}

static void blas_threads(int sync, openblas_dojob_callback dojob, int numjobs, size_t elsize,
                         void *jobdata, int dojob_data) {
    (void)sync; /* run to completion either way: what sync = 1 asks, and allowed for 0 */
    BlasJobs b = {dojob, jobdata, elsize, dojob_data};
    run_jobs(run_blas_job, &b, numjobs);
}

void lora_use_pool_for_blas(void) {
    CBLAS_FUNC(openblas_set_threads_callback_function)(blas_threads);
}
#else
void lora_use_pool_for_blas(void) {}
#endif

/* Runs fn(ctx, begin, end) over [0, n) split into equal chunks (multiples of `align`), one
 * per thread, as many threads as the linked OpenBLAS is set to use (lora.set_num_threads),
 * but none for less than `grain` items each. */
typedef struct {
    void (*fn)(void *, size_t, size_t);
    void *ctx;
    size_t n, per, threads;
} Chunks;

static void run_chunk(void *arg, int i) {
    const Chunks *c = arg;
    const size_t begin = (size_t)i * c->per;
    if (begin >= c->n) return;
    const size_t end = (size_t)i + 1 < c->threads && begin + c->per < c->n ? begin + c->per : c->n;
    c->fn(c->ctx, begin, end);
}

/* How many threads lora uses for `work` units that each deserve a thread of their own: as
 * many as the linked OpenBLAS is set to (lora.set_num_threads), at most `work`, at most
 * LORA_MAX_THREADS, at least one. */
static size_t lora_threads(size_t work) {
    size_t threads = (size_t)CBLAS_FUNC(openblas_get_num_threads)();
    if (threads > work) threads = work;
    if (threads > LORA_MAX_THREADS) threads = LORA_MAX_THREADS;
    return threads ? threads : 1;
}

void lora_parallel_for(size_t n, size_t grain, size_t align, void (*fn)(void *, size_t, size_t),
                       void *ctx) {
    const size_t threads = lora_threads(n / grain);
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    const size_t per = (n / threads + align - 1) / align * align;
    Chunks c = {fn, ctx, n, per, threads};
    run_jobs(run_chunk, &c, (int)threads);
}

/* Packed weights: a thread per 8 panels (256 float32 columns) at least. */
size_t lora_panel_parts(size_t panels) { return lora_threads(panels / 8); }

/* Rows per micro-tile of the packed GEMM: 12 rows x 2 vectors of accumulators take 24 of
 * AVX-512's 32 registers; without AVX-512, 6 rows x 2 32-byte vectors take 12 of AVX2's 16
 * (panel_micro_narrow, half a panel at a time). */
static int lora_panel_mr(void) {
#if defined(LORA_PANEL_MR) /* a build that measures one path, e.g. -DLORA_PANEL_MR=2 */
    return LORA_PANEL_MR;
#elif defined(__x86_64__) && defined(__GNUC__)
    static int cached = 0;
    if (!cached) cached = __builtin_cpu_supports("avx512f") ? 12 : 6;
    return cached;
#else
    return 6;
#endif
}

/* X copied whole (tiles padded by at most 3 rows). */
int lora_panel_whole(size_t n, size_t K, size_t elem) {
    return (n + 3) * K * elem <= LORA_PANEL_WHOLE_BYTES;
}

/* The blocked path's block of steps and chunk of panels, for the micro-kernel that runs.
 * AVX-512: 2 KB of steps (512 float32), so a 12-row tile of X (24 KB) stays in L1 while it
 * meets a chunk of 8 panels' blocks (64 KB each, from L2) in turn; C's tiles are read and
 * written once per 512 steps. At d = 4096, 512 rows: 0.97-0.98x OpenBLAS's time, where
 * 256-step blocks of one panel (in L1) met by every tile in turn took 1.10-1.13x.
 * Without AVX-512 (6-row tiles, half a panel at a time) the latter holds: 1 KB of steps, a
 * chunk of one panel; an AVX2 build at 64 rows took 1.03-1.05x OpenBLAS's time the AVX-512
 * way, 0.93x this way. */
static size_t lora_panel_kc_bytes(void) { return lora_panel_mr() == 6 ? 1024 : 2048; }
static size_t lora_panel_chunk(void) { return lora_panel_mr() == 6 ? 1 : 8; }

/* Rows up to which the packed GEMM is as fast as OpenBLAS on the weight itself or faster,
 * for elements of `elsize` bytes; the layers use their packed copy up to here. Measured on 2
 * threads, packed time over OpenBLAS's (medians of 8 rounds):
 *   AVX-512, float32: 0.73x at 64 rows (d = 4096), 0.94x at 256; at 512 rows 0.96-0.99x on
 *   the forward and 0.97-1.00x on a LoRA step for d_out x d_in in 1024-11008 x 1024-4096;
 *   1.00-1.07x at 640-768;
 *   AVX-512, float64: 0.77-0.92x at 64 rows, 1.03-1.07x at 128 (d = 4096);
 *   AVX2 build (6-row tiles, against OpenBLAS's Haswell kernels), float32: 0.93x at 64 rows,
 *   1.04-1.05x at 96-128; float64: 0.85-0.97x at 32 rows, 0.92-1.02x at 64, 1.13-1.19x at 128. */
size_t lora_panel_max_rows(size_t elsize) {
    if (lora_panel_mr() == 6) return elsize == 4 ? 64 : 32;
    return elsize == 4 ? 512 : 64;
}

/* Most tiles of rows in a block of the blocked path: the block takes about half the L2
 * (sysconf; 1 MB if unknown), the panels the other half. With 2 MB, AVX-512: 43 tiles of 12
 * rows. At d = 4096, 512 rows in one block measured 0.97-0.98x OpenBLAS's time, 480 + 32
 * rows 1.01-1.03x. */
static size_t lora_panel_block_tiles(void) {
    static size_t cached = 0;
    if (!cached) {
#ifdef _SC_LEVEL2_CACHE_SIZE
        const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
        const long l2 = 0;
#endif
        const size_t half = (l2 > 0 ? (size_t)l2 : (size_t)1 << 20) / 2;
        const size_t tile = (size_t)lora_panel_mr() * lora_panel_kc_bytes();
        const size_t tiles = (half + tile - 1) / tile;
        cached = tiles < 4 ? 4 : tiles > 128 ? 128 : tiles;
    }
    return cached;
}

/* Rows per block for n rows: whole tiles, the blocks as even as tiles allow. */
static size_t lora_panel_block_rows(size_t n) {
    const size_t mr = (size_t)lora_panel_mr(), most = lora_panel_block_tiles();
    const size_t tiles = (n + mr - 1) / mr, blocks = (tiles + most - 1) / most;
    return blocks ? (tiles + blocks - 1) / blocks * mr : mr;
}

size_t lora_panel_scratch_elems(size_t parts, size_t n, size_t K, size_t elem) {
    if (lora_panel_whole(n, K, elem)) return (n + 3) * K;
    return parts * lora_panel_block_tiles() * (size_t)lora_panel_mr() *
           (lora_panel_kc_bytes() / elem);
}

/* One part of the backward's row pass: its (r, d_out) and (r, d_in) partial sums and, under
 * dropout, a tile of rows; a multiple of 16 elements so each part starts 64-byte aligned. */
size_t lora_part_elems(size_t d_in, size_t d_out, size_t r, int has_dropout) {
    size_t e = r * (d_in + d_out) + (has_dropout ? LORA_BWD_TILE * d_in : 0);
    return (e + 15) / 16 * 16;
}

size_t lora_backward_parts(size_t n, size_t d_in, size_t d_out) {
    /* a part is worth a thread from ~64k elements of dy and x, and two tiles of rows */
    size_t min_rows = (1 << 16) / (d_in + d_out);
    if (min_rows < 2 * LORA_BWD_TILE) min_rows = 2 * LORA_BWD_TILE;
    return lora_threads(n / min_rows);
}

size_t lora_scratch_elems(size_t n, size_t d_in, size_t d_out, size_t r, int has_dropout,
                          size_t parts) {
    /* n*r for g = dy B in the backward, r*d_out for B^T, one tile of rows of x for dropout,
     * and the backward's partial sums, 16 elements of slack to align them. */
    return n * r + r * d_out + (has_dropout ? LORA_DROPOUT_TILE_ROWS * d_in : 0) +
           parts * lora_part_elems(d_in, d_out, r, has_dropout) + 16;
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

/* ------------------------------------------------------------------ attention helpers
 * Shared by both types of csrc/attention_impl.inc. */

enum { ATTN_PREFIX = 0, ATTN_MASKED = 1, ATTN_NONE = 2 };

/* Per item b of a (batch, seq_k) key mask (NULL: every key): keys[b], how many leading keys
 * the products use, and mode[b]: ATTN_PREFIX when the mask is ones then zeros (keys[b] = the
 * ones), ATTN_MASKED for any other mask with a key set (keys[b] = seq_k), ATTN_NONE when no
 * key is set (keys[b] = seq_k, every key weighs 1/seq_k). */
static void attention_items(size_t *keys, int *mode, const unsigned char *key_mask, size_t batch,
                            size_t seq_k) {
    for (size_t b = 0; b < batch; b++) {
        const unsigned char *m = key_mask ? key_mask + b * seq_k : NULL;
        size_t n = 0, rest = 0;
        if (m) {
            while (n < seq_k && m[n]) n++;
            for (size_t j = n; j < seq_k; j++) rest += m[j] != 0;
        } else {
            n = seq_k;
        }
        keys[b] = rest || !n ? seq_k : n;
        mode[b] = rest ? ATTN_MASKED : n ? ATTN_PREFIX : ATTN_NONE;
    }
}

/* Attention scratch: the per-item key counts and modes, then one block per part (thread)
 * holding k or v of one head transposed, two seq_q x seq_k blocks (dropped probabilities,
 * dS) and a max(seq_q, seq_k) x 32-element block (small_gemm's zero-padded last columns: two
 * vectors of 64 bytes hold at most 32 floats). Each piece 64-byte aligned. */
static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

static size_t attention_items_bytes(const LoraAttnDims *d) {
    return round64(d->batch * (sizeof(size_t) + sizeof(int)));
}

static size_t attention_part_bytes(const LoraAttnDims *d, size_t elem) {
    const size_t inner = d->seq_q > d->seq_k ? d->seq_q : d->seq_k;
    const size_t inner_max = inner > d->head_dim ? inner : d->head_dim;
    return round64((d->head_dim * d->seq_k + 2 * d->seq_q * d->seq_k) * elem) +
           round64(inner_max * 128);
}

size_t lora_attention_parts(const LoraAttnDims *d) { return lora_threads(d->batch * d->heads); }

size_t lora_attention_scratch_bytes(const LoraAttnDims *d, size_t elem, size_t parts) {
    return attention_items_bytes(d) + parts * attention_part_bytes(d, elem);
}

/* The 16 lane sums of 16 vectors of 16 floats, as one vector: lane l = the sum of a[l]. Four
 * rounds of shuffle-and-add, each halving the lanes per sum (the inputs are taken in
 * bit-reversed order so the sums come out in order): 30 vector ops against ~240 scalar adds,
 * which at d = 1024 cost row_dots as much as its FMAs. GCC >= 12 and clang. */
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
#define LORA_HSUM16 1
typedef float lora_v16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) lora_v16 hsum_round(lora_v16 u, lora_v16 v,
                                                                   int w) {
    if (w == 16)
        return __builtin_shufflevector(u, v, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                       23) +
               __builtin_shufflevector(u, v, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                       29, 30, 31);
    if (w == 8)
        return __builtin_shufflevector(u, v, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                                       26, 27) +
               __builtin_shufflevector(u, v, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                                       30, 31);
    if (w == 4)
        return __builtin_shufflevector(u, v, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13,
                                       28, 29) +
               __builtin_shufflevector(u, v, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                                       30, 31);
    return __builtin_shufflevector(u, v, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14,
                                   30) +
           __builtin_shufflevector(u, v, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15,
                                   31);
}

static inline __attribute__((always_inline)) lora_v16 hsum16(const lora_v16 a[16]) {
    static const int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    lora_v16 s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; i++) s8[i] = hsum_round(a[rev[2 * i]], a[rev[2 * i + 1]], 16);
    for (int i = 0; i < 4; i++) s4[i] = hsum_round(s8[2 * i], s8[2 * i + 1], 8);
    for (int i = 0; i < 2; i++) s2[i] = hsum_round(s4[2 * i], s4[2 * i + 1], 4);
    return hsum_round(s2[0], s2[1], 2);
}
#endif

#define T float
#define SUF f32
#define LORA_T_IS_F32 1
#define GEMM CBLAS_FUNC(cblas_sgemm)
#define GEMV CBLAS_FUNC(cblas_sgemv)
#define GER CBLAS_FUNC(cblas_sger)
#define SQRT sqrtf
#define EXP exp_f32
#include "kernels_impl.inc"
#include "attention_impl.inc"
#undef T
#undef SUF
#undef LORA_T_IS_F32
#undef GEMM
#undef GEMV
#undef GER
#undef SQRT
#undef EXP

#define T double
#define SUF f64
#define GEMM CBLAS_FUNC(cblas_dgemm)
#define GEMV CBLAS_FUNC(cblas_dgemv)
#define GER CBLAS_FUNC(cblas_dger)
#define SQRT sqrt
#define EXP exp
#include "kernels_impl.inc"
#include "attention_impl.inc"

/* ------------------------------------------------------------------ GELU
 * Exact GELU, y = x Phi(x) with Phi the standard normal CDF (torch.nn.GELU(approximate=
 * "none"), transformers' "gelu"); backward dx = dy (Phi(x) + x phi(x)).
 * float32 evaluates Phi without libm, so the loop vectorises: Phi(x) = (1 + tanh(x Q(x^2)))/2
 * with x clamped to [-5.5, 5.5], Q a degree-6 least-squares fit of atanh(2 Phi(x) - 1) / x
 * (absolute error in Phi below 1.2e-7 for every float32 x), and tanh and exp written out
 * (Cody-Waite reduction, degree-6 polynomial, 2^k by exponent bits). float64 uses libm's erf
 * and exp. */

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

/* e^x for x in [-87, 87], which the callers guarantee (Phi's argument is within +-18, phi's
 * is clamped): no clamp here, and k = round(x / ln 2) by adding and subtracting 1.5 * 2^23
 * instead of vrndscaleps (two uops on one port). Together 21.9 -> 17.6 cycles per vector of
 * GELU forward on one core. */
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

static LORA_AVX512 void gelu_forward_512(float *y, const float *x, size_t begin, size_t end) {
    for (size_t i = begin; i < end; i += 16) {
        const __mmask16 m = end - i >= 16 ? 0xffff : (__mmask16)((1u << (end - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, normal_cdf_512(v)));
    }
}

static LORA_AVX512 void gelu_backward_512(float *dx, const float *dy, const float *x,
                                          size_t begin, size_t end) {
    for (size_t i = begin; i < end; i += 16) {
        const __mmask16 m = end - i >= 16 ? 0xffff : (__mmask16)((1u << (end - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 half_x2 = _mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(-0.5f));
        const __m512 phi = _mm512_mul_ps(
            _mm512_set1_ps(0.3989422804014327f),
            exp_512(_mm512_max_ps(_mm512_set1_ps(-87.0f), half_x2))); /* NaN stays NaN */
        const __m512 dphi = _mm512_fmadd_ps(v, phi, normal_cdf_512(v));
        _mm512_mask_storeu_ps(dx + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), dphi));
    }
}

/* Whether to take the intrinsics path: the CPU has AVX-512F and FMA, and LORA_PORTABLE_GELU
 * is not set in the environment (set, it forces the portable loop that other CPUs run, so
 * that the tests check that loop on an AVX-512 machine too). Read once. */
static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        const char *portable = getenv("LORA_PORTABLE_GELU");
        cached = !(portable && *portable && *portable != '0') &&
                 __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    }
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
     * if-converting the clamps and does not vectorise it (7x slower). exp_f32 clamps its
     * argument at -87, where phi is below 1e-38 anyway. */
#if LORA_AVX512_GELU
    if (have_avx512()) {
        gelu_backward_512(dx, dy, x, begin, end);
        return;
    }
#endif
    float phi[1024];
    for (size_t i0 = begin; i0 < end; i0 += 1024) {
        const size_t m = end - i0 < 1024 ? end - i0 : 1024;
        const float *xb = x + i0;
        for (size_t i = 0; i < m; i++) phi[i] = 0.3989422804014327f * exp_f32(-0.5f * xb[i] * xb[i]);
        for (size_t i = 0; i < m; i++)
            dx[i0 + i] = dy[i0 + i] * (normal_cdf_f32(xb[i]) + xb[i] * phi[i]);
    }
}

void gelu_backward_f32(float *dx, const float *dy, const float *x, size_t n) {
    GeluArgs g = {dx, dy, x};
    lora_parallel_for(n, 1 << 16, 16, gelu_backward_range, &g);
}

void gelu_forward_f64(double *y, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = 0.5 * x[i] * (1.0 + erf(x[i] * 0.70710678118654752));
}

void gelu_backward_f64(double *dx, const double *dy, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double cdf = 0.5 * (1.0 + erf(x[i] * 0.70710678118654752));
        const double pdf = 0.3989422804014327 * exp(-0.5 * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
}
