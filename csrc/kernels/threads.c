/* kernels/threads.c: lora's thread pool and the loops that run on it.
 *
 * Holds the pool (run_jobs), the callback that hands OpenBLAS's parallel jobs to the pool
 * (lora_use_pool_for_blas), lora_parallel_for and lora_threads. It deliberately holds no
 * arithmetic: the kernels in the other files split their work through lora_parallel_for.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "../blas.h"
#include "internal.h"

/* One pool of worker threads runs lora's parallel loops and, through OpenBLAS's
 * caller-managed threading hook (openblas_set_threads_callback_function), OpenBLAS's own
 * parallel jobs too: the second core is then never fought over by two sets of threads, a
 * GEMM does not wait for OpenBLAS's sleeping worker to wake, and no thread is started per
 * call. Workers spin ~200 us for the next job, then sleep on a condition variable.
 * A dispatch runs job(ctx, 0) on the calling thread and job(ctx, i) on worker i for
 * 0 < i < njobs, all at once (OpenBLAS's jobs wait on each other), and returns when all are
 * done. One dispatch at a time: a caller that finds the pool busy (another Python thread, or
 * a job that dispatches) starts threads of its own for that call, as does a dispatch whose
 * worker cannot be started. A forked child starts a fresh pool. */

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

/* See internal.h. */
int lora_wide_vectors(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx512f");
    return cached;
#else
    return 0;
#endif
}

/* See internal.h. */
size_t lora_threads(size_t work) {
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
