/* kernels/multi_impl.h: batches whose rows use different adapters (S-LoRA's and Punica's
 * segmented LoRA), type-generic. Part of lora_impl.h's instantiation, included at its end so
 * that it is built from the same row kernels (row_dots, rank_update, transpose); not a header
 * to include anywhere else.
 *
 *   y = x W^T + bias (+ res)                                  every row, one base GEMM
 *   y_i += scale[a] * (x_i A_a^T) B_a^T,  a = ids[i] >= 0     rows with an adapter
 *
 * A_a is (rank[a], d_in) and B_a (d_out, rank[a]): adapters of different ranks and scalings
 * in one call; ids[i] = -1 leaves row i to the base layer. The rows are sorted by adapter
 * (a counting sort of their indices, stable, so each segment keeps the batch's order) and
 * the sorted positions are split evenly over `parts` threads. Each part walks its
 * segments: B_a^T made contiguous once per segment (unless the caller gives B^T), then tiles of up to LORA_BWD_TILE rows,
 * each gathered from x (the one copy of the batch; none when the tile's rows are
 * consecutive), xa = x A_a^T by row_dots, and scale * xa B_a^T by rank_update into a tile
 * that is added to y's rows (or straight into y for consecutive rows). A decode batch, one
 * row per adapter, is the same walk with one-row tiles: each adapter's A and B read once.
 * Adapters of rank >= LORA_GEMM_RANK take OpenBLAS GEMMs on tiles of LORA_MIXED_GEMM_TILE
 * rows instead, on one part (the GEMMs thread themselves).
 * The readable spec is mixed_forward in lora/_reference.py. */

typedef struct {
    T *y, *scratch;
    const T *x;
    const void *const *A, *const *B;
    const double *scale;
    const size_t *rank, *order, *start;
    const int64_t *ids;
    size_t m, d_in, d_out, r_max, parts, part_elems, tile;
    int bt; /* B[a] given transposed, (rank[a], d_out) */
} FN(Mixed);

/* y's rows idx[0..rows) += the rows of the tile yt (rows, d_out). */
static void FN(add_rows)(T *restrict y, const T *restrict yt, const size_t *idx, size_t rows,
                         size_t d_out) {
    for (size_t i = 0; i < rows; i++) {
        T *restrict yi = y + idx[i] * d_out;
        const T *restrict ti = yt + i * d_out;
        for (size_t j = 0; j < d_out; j++) yi[j] += ti[j];
    }
}

/* The sorted positions [lo, hi) of one part: its share of the segments. */
static void FN(mixed_part)(const FN(Mixed) *c, size_t part) {
    const size_t lo = c->m * part / c->parts, hi = c->m * (part + 1) / c->parts;
    const size_t d_in = c->d_in, d_out = c->d_out, r_max = c->r_max;
    T *Bt = c->scratch + part * c->part_elems;
    T *xt = Bt + r_max * d_out, *xat = xt + c->tile * d_in, *yt = xat + c->tile * r_max;
    for (size_t pos = lo; pos < hi;) {
        const size_t a = (size_t)c->ids[c->order[pos]];
        const size_t end = c->start[a + 1] < hi ? c->start[a + 1] : hi;
        const size_t r = c->rank[a];
        const T *A = c->A[a], *B = c->B[a], s = (T)c->scale[a];
        const int rows_kernels = r < LORA_GEMM_RANK;
        const T *V = c->bt ? B : Bt; /* B^T, (r, d_out) */
        if (rows_kernels && !c->bt) FN(transpose)(Bt, B, d_out, r);
        for (size_t t0 = pos; t0 < end; t0 += c->tile) {
            const size_t rows = end - t0 < c->tile ? end - t0 : c->tile;
            const size_t *idx = c->order + t0;
            /* rows of one segment come in increasing order: consecutive iff this holds */
            const int inplace = idx[rows - 1] - idx[0] == rows - 1;
            const T *xin = c->x + idx[0] * d_in;
            if (!inplace) {
                for (size_t i = 0; i < rows; i++)
                    memcpy(xt + i * d_in, c->x + idx[i] * d_in, d_in * sizeof(T));
                xin = xt;
            }
            T *out = inplace ? c->y + idx[0] * d_out : yt;
            if (rows_kernels) {
                FN(row_dots)(xat, xin, A, rows, d_in, r);
                FN(rank_update)(out, xat, r, 1, V, s, rows, d_out, r, !inplace, NULL);
            } else {
                GEMM(ROW, NT, TR, (int)rows, (int)r, (int)d_in, 1, xin, (int)d_in, A, (int)d_in,
                     0, xat, (int)r);
                if (c->bt)
                    GEMM(ROW, NT, NT, (int)rows, (int)d_out, (int)r, s, xat, (int)r, B,
                         (int)d_out, inplace ? 1 : 0, out, (int)d_out);
                else
                    GEMM(ROW, NT, TR, (int)rows, (int)d_out, (int)r, s, xat, (int)r, B, (int)r,
                         inplace ? 1 : 0, out, (int)d_out);
            }
            if (!inplace) FN(add_rows)(c->y, yt, idx, rows, d_out);
        }
        pos = end;
    }
}

static void FN(mixed_parts)(void *arg, size_t begin, size_t end) {
    for (size_t part = begin; part < end; part++) FN(mixed_part)(arg, part);
}

/* The forward of a LoRA linear layer over a batch whose rows use different adapters,
 * overwriting y (n, d_out). A[a], B[a] point to adapter a's (rank[a], d_in) and
 * (d_out, rank[a]) arrays ((rank[a], d_out), B^T, when bt: no transpose per segment, for a
 * caller that keeps them so across calls), scale[a] is its scaling; ids (n) gives each row's
 * adapter or -1.
 * index: lora_mixed_index_elems(n, n_adapters) size_t's; scratch: parts *
 * lora_mixed_part_elems(d_in, d_out, r_max) elements, r_max the largest rank a row uses and
 * parts = lora_mixed_parts(m, d_in, d_out, r_max) for the m rows with an adapter. */
void FN(lora_mixed_forward)(T *y, T *scratch, size_t *index, const T *x, const T *W,
                            const T *bias, const T *res, const void *const *A,
                            const void *const *B, const double *scale, const size_t *rank,
                            const int64_t *ids, size_t n, size_t d_in, size_t d_out,
                            size_t n_adapters, size_t r_max, size_t parts, int wt, int bt,
                            const LoraPacked *pk) {
    if (n == 0) return;
    FN(dense_forward)(y, x, W, bias, res, n, d_in, d_out, wt, pk);
    size_t *start = index, *order = index + n_adapters + 1;
    memset(start, 0, (n_adapters + 1) * sizeof *start);
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0) start[ids[i] + 1]++;
    for (size_t a = 0; a < n_adapters; a++) start[a + 1] += start[a];
    const size_t m = start[n_adapters];
    if (m == 0) return;
    /* order[start[a] ..) = the rows of adapter a; `next` reuses the counts a second time */
    size_t *next = order + m;
    memcpy(next, start, n_adapters * sizeof *next);
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0) order[next[ids[i]]++] = i;
    FN(Mixed) c = {y, scratch, x, A, B, scale, rank, order, start, ids, m, d_in, d_out, r_max,
                   parts, lora_mixed_part_elems(d_in, d_out, r_max),
                   r_max < LORA_GEMM_RANK ? LORA_BWD_TILE : LORA_MIXED_GEMM_TILE, bt};
    lora_parallel_for(parts, 1, 1, FN(mixed_parts), &c);
}
