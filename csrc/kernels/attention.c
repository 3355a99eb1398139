/* kernels/attention.c: multi-head scaled dot-product attention, for float32 and float64.
 *
 * Holds what both types share (the per-item key-mask modes, the scratch layout) and, from
 * attention_impl.h, attention_forward/backward with their register-blocked small GEMM and
 * softmax. It deliberately calls no BLAS: the per-head products are too small for it.
 */
#include <math.h>

#include "internal.h"

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

#define LORA_IMPL "attention_impl.h"
#include "instantiate.h"
