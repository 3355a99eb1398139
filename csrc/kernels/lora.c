/* kernels/lora.c: the LoRA linear layer and the plain dense layer, for float32 and float64.
 *
 * Holds the scratch sizes of the LoRA forward and backward, the lane-sum tree of row_dots
 * and, from lora_impl.h, the kernels themselves (lora_forward/backward, lora_merge and its
 * naive spec, dense_forward/backward, lora_mixed_forward from multi_impl.h) with the row
 * kernels they are built from. It
 * deliberately holds neither the packed GEMM (panel_gemm.c) nor the dropout mask
 * (elementwise.c), only calls them.
 */
#include <math.h>

#include "../blas.h"
#include "internal.h"


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

/* Batches mixing adapters (multi_impl.h): a part's B^T, and a tile's rows of x, xa and
 * the update; the sort's counts, order and cursors; parts of at least ~256k FMAs, one part
 * when a rank takes the GEMM path (whose GEMMs thread themselves). */
size_t lora_mixed_part_elems(size_t d_in, size_t d_out, size_t r_max) {
    const size_t tile = r_max < LORA_GEMM_RANK ? LORA_BWD_TILE : LORA_MIXED_GEMM_TILE;
    return (r_max * d_out + tile * (d_in + r_max + d_out) + 15) / 16 * 16;
}

size_t lora_mixed_index_elems(size_t n, size_t n_adapters) { return n + 2 * n_adapters + 1; }

size_t lora_mixed_parts(size_t m, size_t d_in, size_t d_out, size_t r_max) {
    if (r_max >= LORA_GEMM_RANK) return 1;
    const size_t parts = lora_threads(m * (d_in + d_out) * r_max / (1 << 18));
    return parts < m ? parts : (m ? m : 1);
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

#define LORA_IMPL "lora_impl.h"
#include "instantiate.h"
