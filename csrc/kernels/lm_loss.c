/* kernels/lm_loss.c: the causal LM's output layer and its loss in one pass, chunk by chunk,
 * for float32 and float64 (the body is lm_loss_impl.h):
 *
 *   loss = sum over counted rows i of  logsumexp(h_i W^T) - (h_i W^T)[label_i]
 *   dh   = grad_scale * (softmax(h W^T) - onehot(label)) W         (ignored rows: 0)
 *   dW  += grad_scale * (softmax(h W^T) - onehot(label))^T h       (when asked)
 *
 * h (n, d) are the final hidden states, W (V, d) the lm_head (or tied embedding) weight,
 * labels (n,) already shifted by the caller. Only `chunk` rows of logits (chunk x V) exist at
 * a time, in the scratch, where they are turned into their gradient in place: training never
 * holds an (n x V) logits array, let alone two (logits and dlogits).
 */
#include <math.h>

#include "../blas.h"
#include "internal.h"

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

size_t lora_lm_loss_scores_bytes(size_t chunk, size_t V, size_t elem) {
    return round64(chunk * V * elem);
}

size_t lora_lm_loss_scratch_bytes(size_t chunk, size_t V, size_t elem) {
    return lora_lm_loss_scores_bytes(chunk, V, elem) + round64(chunk * sizeof(double));
}

#define LORA_IMPL "lm_loss_impl.h"
#include "instantiate.h"
