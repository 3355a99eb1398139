/* kernels/panel_gemm.c: lora's own GEMM on a weight packed once ("packed weights").
 *
 * A frozen weight that many small batches multiply is worth copying once into the layout a
 * GEMM micro-kernel reads, as MKL's cblas_sgemm_pack or llama.cpp's repacked weights do;
 * OpenBLAS packs W again on every call. This file holds the sizes the packed GEMM is tuned to
 * (micro-tile height, blocking, the rows up to which it pays) and, from panel_gemm_impl.h,
 * pack_panels and panel_gemm for both types. It deliberately knows nothing of LoRA: lora.c's
 * base products call panel_gemm when given a LoraPacked.
 */
#include <unistd.h>

#include "internal.h"

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
 * written once per 512 steps, which beats every tile meeting one panel's block in L1 in turn.
 * Without AVX-512 (6-row tiles, half a panel at a time) the latter is the faster order: 1 KB
 * of steps, a chunk of one panel (docs/performance.md, "Packed weights"). */
static size_t lora_panel_kc_bytes(void) { return lora_panel_mr() == 6 ? 1024 : 2048; }
static size_t lora_panel_chunk(void) { return lora_panel_mr() == 6 ? 1 : 8; }

/* Rows up to which the packed GEMM is as fast as OpenBLAS on the weight itself or faster,
 * for elements of `elsize` bytes; the layers use their packed copy up to here. The limits
 * are where the measured ratio crosses 1, per micro-kernel and dtype; the figures are in
 * docs/performance.md ("Packed weights"). */
size_t lora_panel_max_rows(size_t elsize) {
    if (lora_panel_mr() == 6) return elsize == 4 ? 64 : 32;
    return elsize == 4 ? 512 : 64;
}

/* Most tiles of rows in a block of the blocked path: the block takes about half the L2
 * (sysconf; 1 MB if unknown), the panels the other half. With 2 MB, AVX-512: 43 tiles of 12
 * rows, so 512 rows make one block rather than a large one and a small remainder. */
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

#define LORA_IMPL "panel_gemm_impl.h"
#include "instantiate.h"
