/* scratch.c: the scratch memory the binding hands the kernels, kept between calls.
 *
 * Holds take_bytes / take_scratch / give_scratch and the kept buffers behind them. It
 * deliberately knows nothing of arrays or arguments: a binding asks for bytes (through
 * args.h's call_scratch) and gives them back when the call ends.
 */
#include "py_common.h"

#include <pthread.h>
#include <stdlib.h>

#include "scratch.h"

/* Memory for the kernels, 64-byte aligned so that their vector loads of it never straddle
 * two cache lines. Freed with free(). */
static void *alloc_bytes(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) {
        PyErr_NoMemory();
        return NULL;
    }
    return p;
}

/* The kernels' scratch, given back with give_scratch. Up to SCRATCH_KEEP bytes come from
 * one of SCRATCH_SLOTS buffers kept between calls (a call may hold two: its own and the
 * packed GEMM's), each grown to the largest request it has met; a slot another thread holds
 * is skipped, and beyond that plain allocations. Kept, because allocated and freed on every
 * call a training loop's scratch moves glibc's heap so that the loop's output arrays are
 * paged in anew on every step (docs/performance.md, "Timing on a shared machine").
 * Sanitizer builds (LORA_NO_SCRATCH_CACHE) allocate every time, so that ASan sees each
 * request's bounds. */
#define SCRATCH_SLOTS 2
#define SCRATCH_KEEP ((size_t)16 << 20)

static struct {
    pthread_mutex_t lock;
    void *buf;
    size_t bytes;
} scratch_slots[SCRATCH_SLOTS] = {{PTHREAD_MUTEX_INITIALIZER, NULL, 0},
                                  {PTHREAD_MUTEX_INITIALIZER, NULL, 0}};

void *take_bytes(size_t bytes) {
#ifndef LORA_NO_SCRATCH_CACHE
    for (int i = 0; bytes <= SCRATCH_KEEP && i < SCRATCH_SLOTS; i++) {
        if (pthread_mutex_trylock(&scratch_slots[i].lock) != 0) continue;
        void *buf = scratch_slots[i].buf;
        if (!buf || scratch_slots[i].bytes < bytes) {
            void *old = buf;
            if (!(buf = alloc_bytes(bytes))) {
                pthread_mutex_unlock(&scratch_slots[i].lock);
                return NULL;
            }
            /* published before the old one is freed: give_scratch, reading it unlocked from
             * another thread, never sees a pointer malloc may hand out again */
            __atomic_store_n(&scratch_slots[i].buf, buf, __ATOMIC_RELEASE);
            scratch_slots[i].bytes = bytes;
            free(old);
        }
        return buf;
    }
#endif
    return alloc_bytes(bytes);
}

void *take_scratch(size_t elems, int type) {
    return take_bytes(elems * (type == NPY_FLOAT32 ? sizeof(float) : sizeof(double)));
}

void give_scratch(void *p) {
    for (int i = 0; p && i < SCRATCH_SLOTS; i++)
        if (p == __atomic_load_n(&scratch_slots[i].buf, __ATOMIC_ACQUIRE)) {
            pthread_mutex_unlock(&scratch_slots[i].lock);
            return;
        }
    free(p);
}
