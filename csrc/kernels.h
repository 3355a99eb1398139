/* kernels.h: the LoRA kernels as plain C (no Python.h), for float32 (_f32) and float64 (_f64).
 *
 * Shapes are row-major and follow PyTorch/PEFT: x is (n, d_in), W is (d_out, d_in) (or
 * (d_in, d_out) where a kernel takes `wt`, PEFT's fan_in_fan_out),
 * A is (r, d_in), B is (d_out, r), bias is (d_out), y is (n, d_out), xa is (n, r).
 * Sizes are size_t; the caller has checked that each fits in a BLAS int.
 * The functions never allocate: scratch buffers come from the caller
 * (lora_scratch_elems tells how large).
 *
 * This file deliberately has no argument checking: the bindings (csrc/bind_*.c) validate
 * everything before calling in, with the GIL released around the call. The kernels are in
 * csrc/kernels/ (see csrc/README.md for which file holds which).
 */
#ifndef LORA_KERNELS_H
#define LORA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Rows of x processed per dropout tile: the dropped input never exists for more rows than this. */
#define LORA_DROPOUT_TILE_ROWS 64

/* From this rank up, rank-r updates (merge, y += s xa B^T, dx += s g A) are compute-bound
 * and go to the BLAS GEMM; below it, a streaming kernel reads and writes the output once. */
#define LORA_GEMM_RANK 32

/* Rows per tile of the backward's row pass (at most LORA_GEMM_RANK - 1: the tile is the inner
 * dimension of rank_update). */
#define LORA_BWD_TILE 16

/* Batches of fewer rows go through OpenBLAS GEMMs in the backward instead of its threaded row
 * pass (backward_part): below it the row pass gains nothing, from it up it wins (figures in
 * docs/performance.md, "The backward's rank-r terms"). The forward's row pass (forward_rows)
 * runs at every n. */
#define LORA_BWD_ROW_PASS_MIN 256

/* Batches mixing adapters (lora_mixed_forward, kernels/multi_impl.h): the scratch of one part
 * (a thread), the size_t's of the sort of the rows by adapter, and the parts m rows with an
 * adapter split into. Ranks from LORA_GEMM_RANK go through GEMMs on tiles of this many rows. */
#define LORA_MIXED_GEMM_TILE 64
size_t lora_mixed_part_elems(size_t d_in, size_t d_out, size_t r_max);
size_t lora_mixed_index_elems(size_t n, size_t n_adapters);
size_t lora_mixed_parts(size_t m, size_t d_in, size_t d_out, size_t r_max);

/* Packed weights (csrc/kernels/panel_gemm.c): a panel is LORA_PANEL_BYTES wide
 * (32 float32 or 16 float64 columns). The GEMM that reads panels copies its left operand X
 * (n, K) whole when that takes at most LORA_PANEL_WHOLE_BYTES (small batches: each thread then
 * reads its panels front to back by blocks of LORA_PANEL_WHOLE_KC steps), else by blocks of
 * rows (lora_panel_block_rows) by lora_panel_kc_bytes() of steps, each thread copying its own,
 * and each tile of rows meets lora_panel_chunk() panels in turn. */
#define LORA_PANEL_BYTES 128
#define LORA_PANEL_WHOLE_BYTES (1 << 20)
#define LORA_PANEL_WHOLE_KC 256
#define LORA_PANEL_AHEAD 32 /* steps the micro-kernel prefetches its panel ahead, into L1 */

/* A weight packed into panels for one product (pack_panels: W^T's for a forward, W's for a
 * backward), with the scratch its GEMM uses: parts = lora_panel_parts(panels), threads that
 * each take a range of the panels, and xp of lora_panel_scratch_elems(parts, n, K, elem)
 * elements for n rows by K steps of elem bytes. */
typedef struct {
    const void *panels;
    void *xp;
    size_t parts;
    int qtype; /* not 0: a quantized weight instead, see below */
    int act8;  /* a quantized weight's forward of up to LORA_QDOT_ROWS rows takes x in 8-bit
                * blocks (Q8 activations, QuantWeight(activations="q8")) */
} LoraPacked;

/* Quantized weights (kernels/quant.c): rows of whole blocks of GGUF's formats (Q8_0, Q4_0,
 * Q4_1 read and written, Q4_K and Q6_K read), NF4 or NF4_DQ (QLoRA's, without and with
 * double quantization of the scales; read and written). A row of K elements takes
 * lora_qrow_bytes(qtype, K) bytes (K a multiple of lora_qblock_elems), rows one after
 * another. The base products take one as a LoraPacked with qtype set, panels the bytes (W's
 * d_out rows of d_in elements) and xp a tile of lora_quant_scratch_elems elements. */
enum {
    LORA_Q8_0 = 1,
    LORA_Q4_0,
    LORA_Q4_1,
    LORA_Q4_K,
    LORA_Q6_K,
    LORA_NF4,
    LORA_NF4_DQ,
    LORA_QTYPES
};
#define LORA_QDOT_ROWS 4          /* rows of x up to which a forward takes the dot-product path */
#define LORA_QCHUNK 1024          /* elements of a row dequantized at a time on that path */
#define LORA_QTILE_BYTES (1 << 20) /* a tile of W's rows dequantized for the GEMM path */
int lora_qtype_from_name(const char *name); /* 0 for an unknown name */
const char *lora_qtype_name(int qtype);
size_t lora_qblock_elems(int qtype);
size_t lora_qrow_bytes(int qtype, size_t K);
int lora_qtype_writable(int qtype);
/* y (rows, K) = the values of `rows` rows of bytes q; q = the rows of x (rows, K). Threaded. */
void lora_dequantize(float *y, const uint8_t *q, size_t rows, size_t K, int qtype);
void lora_quantize(uint8_t *q, const float *x, size_t rows, size_t K, int qtype);
/* Rows of W in a tile (K elements a row, elem bytes each), at most `rows`; the scratch a
 * product with n rows of x needs (elements of elem bytes; on the dot-product path 0, or
 * x's 8-bit blocks with act8). */
size_t lora_quant_tile_rows(size_t K, size_t rows, size_t elem);
size_t lora_quant_scratch_elems(size_t n, size_t d_in, size_t d_out, size_t elem, int backward,
                                int act8);

size_t lora_panel_parts(size_t panels);
size_t lora_panel_scratch_elems(size_t parts, size_t n, size_t K, size_t elem);
int lora_panel_whole(size_t n, size_t K, size_t elem);
size_t lora_panel_max_rows(size_t elsize);

/* How many row ranges (one per thread) lora_backward splits n rows into; read once by the
 * caller and passed to both calls below, so the scratch and the kernel agree. */
size_t lora_backward_parts(size_t n, size_t d_in, size_t d_out);
size_t lora_part_elems(size_t d_in, size_t d_out, size_t r, int has_dropout);

/* Elements of scratch a forward or backward call needs (its dropout tile, dy B, the
 * backward's per-part sums); the forward passes parts = 1. */
size_t lora_scratch_elems(size_t n, size_t d_in, size_t d_out, size_t r, int has_dropout,
                          size_t parts);

/* The dropout mask: element (i, j) of x, flat index i*d_in + j, is kept iff
 * lora_dropout_keep(key, index, threshold). key = lora_dropout_key(seed) and
 * threshold = lora_dropout_threshold(p). A counter-based generator: the backward pass
 * regenerates the mask from (seed, index) instead of storing it. */
uint64_t lora_dropout_key(uint64_t seed);
uint32_t lora_dropout_threshold(double p);

/* Has OpenBLAS run its parallel jobs on lora's thread pool (call once, before any GEMM). */
void lora_use_pool_for_blas(void);

/* fn(ctx, begin, end) over [0, n) in chunks of multiples of `align`, on up to
 * openblas_get_num_threads() threads, at least `grain` items each. */
void lora_parallel_for(size_t n, size_t grain, size_t align, void (*fn)(void *, size_t, size_t),
                       void *ctx);

/* Exact GELU (x Phi(x)) and its backward, overwriting y / dx; n elements. */
void gelu_forward_f32(float *y, const float *x, size_t n);
void gelu_backward_f32(float *dx, const float *dy, const float *x, size_t n);
void gelu_forward_f64(double *y, const double *x, size_t n);
void gelu_backward_f64(double *dx, const double *dy, const double *x, size_t n);

/* Multi-head attention sizes: q (batch, seq_q, heads*head_dim), k and v (batch, seq_k,
 * heads*head_dim); probs (batch, heads, seq_q, seq_k). See csrc/kernels/attention_impl.h. */
typedef struct {
    size_t batch, seq_q, seq_k, heads, head_dim;
} LoraAttnDims;

/* How many parts (threads) an attention call splits its (item, head) pairs into, read once by
 * the caller, and the bytes of scratch the call then needs (elem: sizeof the float type). */
size_t lora_attention_parts(const LoraAttnDims *d);
size_t lora_attention_scratch_bytes(const LoraAttnDims *d, size_t elem, size_t parts);

/* Causal grouped-query attention sizes: q (batch, seq, heads*head_dim), k and v (batch,
 * kv_seq, kv_heads*head_dim) of which keys [0, kv_len) are read (seq <= kv_len <= kv_seq: a
 * KV cache; the q rows are positions kv_len - seq .. kv_len - 1), kv_heads dividing heads;
 * key_mask rows mask_ld apart; lse (batch, heads, seq). Without a cache kv_seq = kv_len =
 * mask_ld = seq. See csrc/kernels/llama_impl.h. */
typedef struct {
    size_t batch, seq, heads, kv_heads, head_dim, kv_seq, kv_len, mask_ld;
} LoraGqaDims;

/* Parts (threads) a causal attention call splits into (backward: by (item, kv head) groups),
 * read once by the caller, and the bytes of scratch the call then needs. */
size_t lora_causal_attention_parts(const LoraGqaDims *d, int backward);
size_t lora_causal_attention_scratch_bytes(const LoraGqaDims *d, size_t elem, size_t parts);

/* The fused lm_head + cross-entropy's scratch (kernels/lm_loss.c): a chunk of scores
 * (chunk x V elements of elem bytes), then chunk doubles of per-row losses. */
size_t lora_lm_loss_scores_bytes(size_t chunk, size_t V, size_t elem);
size_t lora_lm_loss_scratch_bytes(size_t chunk, size_t V, size_t elem);

/* The geometry of a 2-D convolution (kernels/conv.c): x (n, c, h, w), a kh x kw kernel with
 * stride (sh, sw), zero padding (ph, pw) and dilation (dh, dw), output oh x ow pixels
 * (oh = (h + 2 ph - dh (kh - 1) - 1) / sh + 1, likewise ow). */
typedef struct {
    size_t n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
} LoraConvDims;

#define LORA_DECLARE(T, SUF)                                                                  \
    void lora_forward_##SUF(T *y, T *xa, T *scratch, const T *x, const T *W, const T *bias,  \
                            const T *res, const T *A, const T *B, T scale, double p,          \
                            uint64_t seed, size_t n, size_t d_in, size_t d_out, size_t r,     \
                            int wt, const LoraPacked *pk);                                    \
    void lora_backward_##SUF(T *dx, T *dA, T *dB, T *scratch, const T *dy, const T *x,        \
                             const T *xa, const T *W, const T *A, const T *B, T scale,        \
                             double p, uint64_t seed, size_t n, size_t d_in, size_t d_out,    \
                             size_t r, size_t parts, int wt, int acc, const LoraPacked *pk);  \
    void lora_merge_##SUF(T *W, T *scratch, const T *A, const T *B, T scale,                 \
                          int fan_in_fan_out, size_t d_out, size_t d_in, size_t r);           \
    void dora_norm_##SUF(T *norm, T *scratch, const T *W, const T *A, const T *B, T scale,    \
                         const T *w_sq, size_t d_out, size_t d_in, size_t r, int wt,          \
                         const LoraPacked *pk);                                               \
    void lora_merge_naive_##SUF(T *W, const T *A, const T *B, T scale, size_t d_out,          \
                                size_t d_in, size_t r);                                       \
    void dense_forward_##SUF(T *y, const T *x, const T *W, const T *bias, const T *res,       \
                             size_t n, size_t d_in, size_t d_out, int wt,                     \
                             const LoraPacked *pk);                                           \
    void dense_backward_##SUF(T *dx, T *dW, const T *dy, const T *x, const T *W, size_t n,    \
                              size_t d_in, size_t d_out, int wt, int acc,                     \
                              const LoraPacked *pk);                                          \
    void lora_mixed_forward_##SUF(T *y, T *scratch, size_t *index, const T *x, const T *W,    \
                                  const T *bias, const T *res, const void *const *A,          \
                                  const void *const *B, const double *scale,                  \
                                  const size_t *rank, const int64_t *ids, size_t n,           \
                                  size_t d_in, size_t d_out, size_t n_adapters, size_t r_max, \
                                  size_t parts, int wt, int bt, const LoraPacked *pk);        \
    /* P = panels of M (K, N), or of M^T when trans (M stored (N, K)): ceil(N / panel width)  \
     * panels of K x width elements, zero past N. */                                         \
    void pack_panels_##SUF(T *P, const T *M, size_t K, size_t N, int trans);                 \
    void adam_step_##SUF(T *param, T *m, T *v, const T *grad, size_t numel, long long step,   \
                         double lr, double beta1, double beta2, double eps,                   \
                         double weight_decay, int decoupled);                                \
    void layer_norm_forward_##SUF(T *y, T *mean, T *rstd, const T *x, const T *w, const T *b,   \
                                  double eps, size_t rows, size_t d);                           \
    void layer_norm_backward_##SUF(T *dx, T *dw, T *db, const T *dy, const T *x, const T *mean, \
                                   const T *rstd, const T *w, size_t rows, size_t d);      \
    void attention_forward_##SUF(T *ctx, T *probs, void *scratch, const T *q, const T *k,      \
                                 const T *v, const unsigned char *key_mask, T scale, double p, \
                                 uint64_t seed, const LoraAttnDims *d, size_t parts);          \
    void attention_backward_##SUF(T *dq, T *dk, T *dv, void *scratch, const T *dctx,           \
                                  const T *q, const T *k, const T *v, const T *probs,          \
                                  const unsigned char *key_mask, T scale, double p,            \
                                  uint64_t seed, const LoraAttnDims *d, size_t parts);      \
    /* Llama-family operations (kernels/llama.c, llama_impl.h) */                             \
    void rms_norm_forward_##SUF(T *y, T *rstd, const T *x, const T *w, double eps, size_t rows, \
                                size_t d);                                                    \
    void rms_norm_backward_##SUF(T *dx, T *dw, const T *dy, const T *x, const T *rstd,          \
                                 const T *w, size_t rows, size_t d);                          \
    void rope_forward_##SUF(T *x, const T *cos, const T *sin, size_t batch, size_t seq,         \
                            size_t heads, size_t head_dim, int per_item);                     \
    void rope_backward_##SUF(T *dx, const T *cos, const T *sin, size_t batch, size_t seq,       \
                             size_t heads, size_t head_dim, int per_item);                    \
    void swiglu_forward_##SUF(T *y, const T *gate, const T *up, size_t n);                      \
    void swiglu_backward_##SUF(T *dgate, T *dup, const T *dy, const T *gate, const T *up,       \
                               size_t n);                                                     \
    void causal_attention_forward_##SUF(T *ctx, T *lse, void *scratch, const T *q, const T *k,  \
                                        const T *v, const unsigned char *key_mask, T scale,   \
                                        const LoraGqaDims *d, size_t parts);                  \
    void causal_attention_backward_##SUF(T *dq, T *dk, T *dv, void *scratch, const T *dctx,     \
                                         const T *q, const T *k, const T *v, const T *ctx,    \
                                         const T *lse, const unsigned char *key_mask,         \
                                         T scale, const LoraGqaDims *d, size_t parts);   \
    /* kernels/conv.c: cols (n oh ow, c kh kw) = the patches of x (overwritten); dx = the  \
     * patches' gradient summed back onto the images (overwritten) */                       \
    void im2col_##SUF(T *cols, const T *x, const LoraConvDims *d);                           \
    void col2im_##SUF(T *dx, const T *cols, const LoraConvDims *d);                          \
    /* kernels/lm_loss.c */                                                                   \
    double linear_cross_entropy_##SUF(T *dh, T *dW, void *scratch, const T *h, const T *W,     \
                                      const int64_t *labels, int64_t ignore, T grad_scale,    \
                                      size_t n, size_t d, size_t V, size_t chunk);

LORA_DECLARE(float, f32)
LORA_DECLARE(double, f64)

#undef LORA_DECLARE

#endif /* LORA_KERNELS_H */
