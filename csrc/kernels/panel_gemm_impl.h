/* kernels/panel_gemm_impl.h: the type-generic bodies of panel_gemm.c, INCLUDED TWICE by it
 * (through instantiate.h), once with T = float and once with T = double; FN(name) makes
 * name_f32 / name_f64. Not a header to include anywhere else.
 *
 * Holds pack_panels and panel_gemm with their micro-kernels; the sizes they are tuned to
 * (lora_panel_mr, the blocking) are in panel_gemm.c.
 */

/* ------------------------------------------------------------------ packed weights
 * A frozen weight that many small batches multiply is worth copying once into the layout a
 * GEMM micro-kernel reads (as MKL's cblas_sgemm_pack or llama.cpp's repacked weights do).
 * OpenBLAS packs W on every call, and at 64 rows of x that costs a quarter of the GEMM.
 *
 * The product C (n, N) += X (n, K) M, M (K, N), reads M as panels: ceil(N / PNR) blocks
 * of K rows by PNR consecutive columns (LORA_PANEL_BYTES, two vectors), row-major inside each,
 * zero past N. The forward's M is W^T and the backward's is W, so a layer keeps one packing
 * per direction (PackedWeight in csrc/packed.c). */
#define PVL (64 / sizeof(T))
#define PNR (LORA_PANEL_BYTES / sizeof(T))

/* P = the panels of M (K, N), or of M^T when trans (M stored (N, K)); overwrites P. */
typedef struct {
    T *P;
    const T *M;
    size_t K, N;
    int trans;
} FN(Pack);

static void FN(pack_range)(void *arg, size_t p0, size_t p1) {
    const FN(Pack) *a = arg;
    const size_t K = a->K, N = a->N;
    for (size_t p = p0; p < p1; p++) {
        T *dst = a->P + p * K * PNR;
        const size_t j0 = p * PNR, w = N - j0 < PNR ? N - j0 : PNR;
        if (!a->trans) {
            for (size_t k = 0; k < K; k++) {
                memcpy(dst + k * PNR, a->M + k * N + j0, w * sizeof(T));
                memset(dst + k * PNR + w, 0, (PNR - w) * sizeof(T));
            }
            continue;
        }
        /* columns of the panel are rows of M: 16 of M's columns at a time, so the reads and
         * the writes both move along cache lines */
        for (size_t k0 = 0; k0 < K; k0 += 16) {
            const size_t k1 = K - k0 < 16 ? K : k0 + 16;
            for (size_t jj = 0; jj < PNR; jj++)
                for (size_t k = k0; k < k1; k++)
                    dst[k * PNR + jj] = jj < w ? a->M[(j0 + jj) * K + k] : (T)0;
        }
    }
}

void FN(pack_panels)(T *P, const T *M, size_t K, size_t N, int trans) {
    FN(Pack) a = {P, M, K, N, trans};
    lora_parallel_for((N + PNR - 1) / PNR, 4, 1, FN(pack_range), &a);
}

/* C (mr, nr) += Xp (kc, MR) Pp (kc, PNR) for one micro-tile: Xp holds MR rows of X
 * interleaved (row i of step k at k * MR + i), Pp is the panel's kc rows. MR x 2 vector
 * accumulators (24 of AVX-512's 32 registers at MR = 12); each step, two loads of the panel
 * and MR broadcasts. mr <= MR and nr <= PNR at the edges. With pf, the panel block read next
 * is prefetched into L2 along the way (two lines a step), since a block is otherwise fetched
 * from memory on first use.
 * MR is a constant at each call site (panel_tile), so the loops unroll. */
static inline __attribute__((always_inline)) void FN(panel_micro)(T *C, size_t ldc,
                                                                   const T *Xp, const T *Pp,
                                                                   const char *pf, size_t kc,
                                                                   int MR, size_t mr, size_t nr) {
    FN(vec) acc[12][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = (FN(vec)){0};
    /* C's rows, ldc apart and often in L3 by then, are fetched into L2 while the tile runs */
    for (size_t i = 0; i < mr; i++) {
        __builtin_prefetch(C + i * ldc, 0, 2);
        __builtin_prefetch(C + i * ldc + PVL, 0, 2);
    }
    for (size_t k = 0; k < kc; k++) {
        /* the panel from L2 into L1, LORA_PANEL_AHEAD steps ahead (past the block's end it
         * fetches the next block of the panel, or nothing: a prefetch never faults) */
        __builtin_prefetch(Pp + (k + LORA_PANEL_AHEAD) * PNR, 0, 3);
        __builtin_prefetch(Pp + (k + LORA_PANEL_AHEAD) * PNR + PVL, 0, 3);
        if (pf) {
            __builtin_prefetch(pf + k * LORA_PANEL_BYTES, 0, 2);
            __builtin_prefetch(pf + k * LORA_PANEL_BYTES + 64, 0, 2);
        }
        const FN(vec) w0 = FN(vload)(Pp + k * PNR), w1 = FN(vload)(Pp + k * PNR + PVL);
        for (int i = 0; i < MR; i++) {
            const T xk = Xp[k * MR + i];
            acc[i][0] += xk * w0;
            acc[i][1] += xk * w1;
        }
    }
    for (size_t i = 0; i < mr; i++) {
        T *c = C + i * ldc;
        if (nr == PNR) {
            FN(vstore)(c, FN(vload)(c) + acc[i][0]);
            FN(vstore)(c + PVL, FN(vload)(c + PVL) + acc[i][1]);
        } else {
            for (size_t j = 0; j < nr; j++) c[j] += j < PVL ? acc[i][0][j] : acc[i][1][j - PVL];
        }
    }
}

/* panel_micro for CPUs without AVX-512 (lora_panel_mr() = 6): one half of the panel at a
 * time, as two 32-byte vectors, for MR <= 6 rows: 12 accumulators of AVX2's 16 registers,
 * the classic 6 x 16 float32 tile. (64-byte vectors there leave GCC keeping the
 * accumulators on the stack.) */
typedef T FN(hvec) __attribute__((vector_size(32)));
#define HVL (32 / sizeof(T))

static inline FN(hvec) FN(hload)(const T *p) {
    FN(hvec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void FN(panel_micro_narrow)(
    T *C, size_t ldc, const T *Xp, const T *Ph, const char *pf, size_t kc, int MR, size_t mr,
    size_t nr) {
    FN(hvec) acc[6][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = (FN(hvec)){0};
    for (size_t k = 0; k < kc; k++) {
        __builtin_prefetch(Ph + (k + LORA_PANEL_AHEAD) * PNR, 0, 3); /* its half: one line */
        if (pf) {
            __builtin_prefetch(pf + k * LORA_PANEL_BYTES, 0, 2);
            __builtin_prefetch(pf + k * LORA_PANEL_BYTES + 64, 0, 2);
        }
        const FN(hvec) w0 = FN(hload)(Ph + k * PNR), w1 = FN(hload)(Ph + k * PNR + HVL);
        for (int i = 0; i < MR; i++) {
            const T xk = Xp[k * MR + i];
            acc[i][0] += xk * w0;
            acc[i][1] += xk * w1;
        }
    }
    for (size_t i = 0; i < mr; i++) {
        T out[2 * HVL];
        memcpy(out, &acc[i][0], sizeof acc[i][0]);
        memcpy(out + HVL, &acc[i][1], sizeof acc[i][1]);
        for (size_t j = 0; j < nr; j++) C[i * ldc + j] += out[j];
    }
}

/* Both halves of the panel (the second only if any of its columns are real); the first
 * prefetches the next block, if asked. */
static inline __attribute__((always_inline)) void FN(panel_halves)(
    T *C, size_t ldc, const T *Xp, const T *Pp, const char *pf, size_t kc, int MR, size_t mr,
    size_t nr) {
    FN(panel_micro_narrow)(C, ldc, Xp, Pp, pf, kc, MR, mr, nr < 2 * HVL ? nr : 2 * HVL);
    if (nr > 2 * HVL)
        FN(panel_micro_narrow)(C + 2 * HVL, ldc, Xp, Pp + 2 * HVL, NULL, kc, MR, mr,
                               nr - 2 * HVL);
}
#undef HVL

static LORA_CLONES LORA_FMA void FN(panel_tile)(T *C, size_t ldc, const T *Xp, const T *Pp,
                                                const char *pf, size_t kc, int MR, size_t mr,
                                                size_t nr) {
    if (lora_panel_mr() == 6) { /* no AVX-512: tiles of 6, 4, 2 and 1 rows */
        if (MR == 6)
            FN(panel_halves)(C, ldc, Xp, Pp, pf, kc, 6, mr, nr);
        else if (MR == 4)
            FN(panel_halves)(C, ldc, Xp, Pp, pf, kc, 4, mr, nr);
        else if (MR == 2)
            FN(panel_halves)(C, ldc, Xp, Pp, pf, kc, 2, mr, nr);
        else
            FN(panel_halves)(C, ldc, Xp, Pp, pf, kc, 1, mr, nr);
        return;
    }
    if (!pf && MR == 12) /* most tiles: no prefetch test in their loop */
        FN(panel_micro)(C, ldc, Xp, Pp, NULL, kc, 12, mr, nr);
    else if (MR == 12)
        FN(panel_micro)(C, ldc, Xp, Pp, pf, kc, 12, mr, nr);
    else if (MR == 8)
        FN(panel_micro)(C, ldc, Xp, Pp, pf, kc, 8, mr, nr);
    else if (MR == 4)
        FN(panel_micro)(C, ldc, Xp, Pp, pf, kc, 4, mr, nr);
    else if (MR == 2)
        FN(panel_micro)(C, ldc, Xp, Pp, pf, kc, 2, mr, nr);
    else
        FN(panel_micro)(C, ldc, Xp, Pp, pf, kc, 1, mr, nr);
}

/* The height of the micro-tile for `left` rows: mr_max, or for the last rows of a block the
 * smallest power of two that holds them, capped at mr_max (64 rows at mr_max = 12: five tiles
 * of 12 and one of 4). At most 3 rows of padding. */
static inline int FN(tile_rows)(size_t left, int mr_max) {
    int m = 1;
    while ((size_t)m < left && m < mr_max) m *= 2;
    return m < mr_max ? m : mr_max;
}

typedef struct {
    T *C, *xp;
    const T *X, *P;
    size_t n, K, N, parts;
    int mr_max, whole; /* whole: lora_panel_whole(n, K), x copied whole before the parts */
    size_t mc, kc, nc; /* else rows and steps per block, panels per chunk */
} FN(PanelGemm);

/* One tile into xp: `rows` rows of X (row stride K) and mr - rows of zeros, kc steps, step k
 * of row ii at dst[k * mr + ii]. Step by step, so the writes run along xp (row by row, the
 * copy costs twice as much). */
static inline __attribute__((always_inline)) void FN(pack_tile)(T *dst, const T *src, size_t K,
                                                                 size_t kc, size_t mr,
                                                                 size_t rows) {
    for (size_t k = 0; k < kc; k++) {
        for (size_t ii = 0; ii < rows; ii++) dst[k * mr + ii] = src[ii * K + k];
        for (size_t ii = rows; ii < mr; ii++) dst[k * mr + ii] = 0;
    }
}

/* Rows [i0, i0 + mc) and the first kc steps of X (row stride K) into xp, tile by tile: the
 * tile at row i (mr rows, zero past mc) goes to xp + i * ld. */
static void FN(pack_rows)(T *xp, size_t ld, const T *X, size_t K, size_t i0, size_t mc,
                          size_t kc, int mr_max) {
    for (size_t i = 0, mr; i < mc; i += mr) {
        mr = (size_t)FN(tile_rows)(mc - i, mr_max);
        const size_t rows = mc - i < mr ? mc - i : mr;
        if (rows == 12) /* the usual tile, its loop unrolled */
            FN(pack_tile)(xp + i * ld, X + (i0 + i) * K, K, kc, 12, 12);
        else
            FN(pack_tile)(xp + i * ld, X + (i0 + i) * K, K, kc, mr, rows);
    }
}

/* The tiles of rows [0, mc) of xp (as pack_rows laid them out) against one block of kc steps
 * of one panel, Pp; next: the block to prefetch meanwhile, or NULL. */
static void FN(panel_block)(T *C, size_t N, const T *xp, size_t ld, size_t k0, const T *Pp,
                            const char *next, size_t mc, size_t kc, size_t nr, int mr_max) {
    for (size_t i = 0, mr; i < mc; i += mr) {
        mr = (size_t)FN(tile_rows)(mc - i, mr_max);
        FN(panel_tile)(C + i * N, N, xp + i * ld + k0 * mr, Pp, i == 0 ? next : NULL, kc,
                       (int)mr, mc - i < mr ? mc - i : mr, nr);
    }
}

/* Part q of panel_gemm: panels [q P / parts, (q + 1) P / parts), every row of X.
 * A small batch (lora_panel_whole) was copied whole into xp before the parts started: each
 * part reads its panels front to back, one stream through memory, each block of
 * LORA_PANEL_WHOLE_KC steps (32 KB) staying in L1 while every tile of rows uses it.
 * A larger one goes by blocks of a->mc rows by a->kc steps, copied by each part into its own
 * xp (about half the L2); each tile of rows of the block then meets a->nc panels' blocks in
 * turn (lora_panel_chunk, lora_panel_kc_bytes), so every panel's block is read once per
 * block of rows and C's tiles once per block of steps. A chunk of one panel keeps its block
 * in L1 for all the tiles and prefetches the next panel's into L2 meanwhile. */
static void FN(panel_part)(void *arg, size_t q0, size_t q1) {
    const FN(PanelGemm) *a = arg;
    const size_t n = a->n, K = a->K, N = a->N, panels = (N + PNR - 1) / PNR;
    const int mr_max = a->mr_max;
    for (size_t q = q0; q < q1; q++) {
        const size_t p0 = q * panels / a->parts, p1 = (q + 1) * panels / a->parts;
        if (a->whole) {
            for (size_t p = p0; p < p1; p++) {
                const size_t j0 = p * PNR, nr = N - j0 < PNR ? N - j0 : PNR;
                const T *Pp = a->P + p * K * PNR;
                for (size_t k0 = 0; k0 < K; k0 += LORA_PANEL_WHOLE_KC) {
                    const size_t kc = K - k0 < LORA_PANEL_WHOLE_KC ? K - k0 : LORA_PANEL_WHOLE_KC;
                    /* the next block in memory: this panel's, or the next panel's first */
                    const int last = p + 1 == p1 && k0 + kc == K;
                    const char *next = last ? NULL : (const char *)(Pp + (k0 + kc) * PNR);
                    FN(panel_block)(a->C + j0, N, a->xp, K, k0, Pp + k0 * PNR, next, n, kc, nr,
                                    mr_max);
                }
            }
            continue;
        }
        T *xp = a->xp + q * a->mc * a->kc;
        for (size_t i0 = 0; i0 < n; i0 += a->mc) {
            const size_t mc = n - i0 < a->mc ? n - i0 : a->mc;
            for (size_t k0 = 0; k0 < K; k0 += a->kc) {
                const size_t kc = K - k0 < a->kc ? K - k0 : a->kc;
                FN(pack_rows)(xp, kc, a->X + k0, K, i0, mc, kc, mr_max);
                for (size_t pc = p0; pc < p1; pc += a->nc) {
                    const size_t pe = p1 - pc < a->nc ? p1 : pc + a->nc;
                    for (size_t i = 0, mr; i < mc; i += mr) {
                        mr = (size_t)FN(tile_rows)(mc - i, mr_max);
                        for (size_t p = pc; p < pe; p++) {
                            const size_t j0 = p * PNR, nr = N - j0 < PNR ? N - j0 : PNR;
                            const T *Pp = a->P + (p * K + k0) * PNR;
                            const int first = a->nc == 1 && i == 0 && p + 1 < p1;
                            FN(panel_tile)(a->C + (i0 + i) * N + j0, N, xp + i * kc, Pp,
                                           first ? (const char *)(Pp + K * PNR) : NULL, kc,
                                           (int)mr, mc - i < mr ? mc - i : mr, nr);
                        }
                    }
                }
            }
        }
    }
}

/* pack_rows for the tiles [t0, t1) of a small batch, all K steps (panel_gemm's first pass). */
static void FN(pack_whole)(void *arg, size_t t0, size_t t1) {
    const FN(PanelGemm) *a = arg;
    const size_t step = (size_t)a->mr_max, i0 = t0 * step;
    const size_t i1 = t1 * step < a->n ? t1 * step : a->n;
    FN(pack_rows)(a->xp + i0 * a->K, a->K, a->X, a->K, i0, i1 - i0, a->K, a->mr_max);
}

/* C (n, N) += X (n, K) M with M as panels (pack_panels), on `parts` threads (lora_panel_parts),
 * xp: lora_panel_scratch_elems(parts, n, K, sizeof(T)) elements of scratch. */
void FN(panel_gemm)(T *C, T *xp, const T *X, const T *P, size_t n, size_t K, size_t N,
                           size_t parts) {
    FN(PanelGemm) a = {C, xp, X, P, n, K, N, parts, lora_panel_mr(),
                       lora_panel_whole(n, K, sizeof(T)), lora_panel_block_rows(n),
                       lora_panel_kc_bytes() / sizeof(T), lora_panel_chunk()};
    if (a.whole) {
        const size_t tiles = (n + a.mr_max - 1) / a.mr_max;
        lora_parallel_for(tiles, (1 << 16) / (K * a.mr_max) + 1, 1, FN(pack_whole), &a);
    }
    lora_parallel_for(parts, 1, 1, FN(panel_part), &a);
}
#undef PVL
#undef PNR
