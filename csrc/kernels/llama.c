/* kernels/llama.c: the operations of Llama-family decoders, for float32 and float64:
 * RMSNorm, rotary position embedding (in place), SwiGLU and causal grouped-query attention,
 * each forward next to its backward.
 *
 * Holds what both types share (the attention tile sizes and scratch layout, the per-item
 * span of keys a padding mask leaves); the bodies are type-generic, in llama_impl.h. It
 * deliberately calls no BLAS: the attention tiles are small and stay in L1, and the other
 * passes are memory-bound. Work is split over threads only through lora_parallel_for.
 */
#include <math.h>

#include "internal.h"

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Query rows and key columns of one attention tile: 64 float32 or 32 float64 keys are four
 * 64-byte vectors, the row of scores the micro-kernel keeps in registers. */
#define ATTN_TILE_Q 64
#define ATTN_TILE_K(elem) (4 * 64 / (elem))

/* One part's scratch: K (or V) of a key tile transposed (head_dim x tile_k), the tile's
 * scores and dS (tile_q x tile_k each), the forward's row accumulators (tile_q x head_dim)
 * and three tile_q vectors (running max, running sum, rowsum(dO * O)). */
static size_t causal_part_bytes(const LoraGqaDims *d, size_t elem) {
    const size_t tk = ATTN_TILE_K(elem);
    return round64(d->head_dim * tk * elem) + 2 * round64(ATTN_TILE_Q * tk * elem) +
           round64(ATTN_TILE_Q * d->head_dim * elem) + 3 * round64(ATTN_TILE_Q * elem);
}

static size_t causal_items_bytes(const LoraGqaDims *d) {
    return round64(2 * d->batch * sizeof(size_t));
}

/* The forward's units: (item, head) pairs, or (item, kv head) groups when decoding (seq = 1,
 * see causal_forward_parts); the backward's (item, kv head) groups. */
size_t lora_causal_attention_parts(const LoraGqaDims *d, int backward) {
    return lora_threads(d->batch * (backward || d->seq == 1 ? d->kv_heads : d->heads));
}

size_t lora_causal_attention_scratch_bytes(const LoraGqaDims *d, size_t elem, size_t parts) {
    return causal_items_bytes(d) + parts * causal_part_bytes(d, elem);
}

/* Per item b: the keys [lo[b], hi[b]) of [0, seq) between its first and last unmasked key
 * (all of them without a mask; lo = hi = 0 when every key is masked); mask rows are ld
 * apart. Keys outside cost no work. */
static void causal_items(size_t *lo, size_t *hi, const unsigned char *key_mask, size_t batch,
                         size_t seq, size_t ld) {
    for (size_t b = 0; b < batch; b++) {
        lo[b] = 0;
        hi[b] = seq;
        if (!key_mask) continue;
        const unsigned char *m = key_mask + b * ld;
        size_t l = 0, h = seq;
        while (l < seq && !m[l]) l++;
        while (h > l && !m[h - 1]) h--;
        lo[b] = l < h ? l : 0;
        hi[b] = l < h ? h : 0;
    }
}

#define LORA_IMPL "llama_impl.h"
#include "instantiate.h"
