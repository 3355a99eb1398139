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

#define LORA_IMPL "panel_gemm_impl.h"
#include "instantiate.h"
