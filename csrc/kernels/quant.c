/* kernels/quant.c: quantized weights. GGUF's block formats, bit for bit as ggml and the PyPI
 * `gguf` package's gguf.quants lay them out and round them (Q8_0, Q4_0, Q4_1 both ways; Q4_K
 * and Q6_K read only), and QLoRA's NF4 (Dettmers et al. 2023: blocks of 64, absmax scale,
 * the NormalFloat code book) and its double quantization NF4_DQ (the blocks' scales in 8 bits),
 * both ways; and, from quant_impl.h, the products of a float matrix with a quantized weight
 * that the layers' base products call (lora_impl.h's base_forward / base_backward, when the
 * LoraPacked they are given has a qtype).
 *
 * A quantized tensor is rows of lora_qrow_bytes(qtype, K) bytes, one after another: for the
 * block types a row of K elements is K / block_elems blocks of block_bytes bytes; an NF4_DQ
 * row adds a header (see its section) and holds each block's scale apart from its codes, so
 * rows are independent and read in order. Rounding follows gguf.quants step by step
 * (each product and sum rounded to float32: the build compiles with -ffp-contract=off), so
 * quantize gives its bytes and dequantize its values exactly.
 * It deliberately knows nothing of LoRA or of Python.
 */
#include <math.h>

#include "../blas.h"
#include "internal.h"

/* ------------------------------------------------------------------ float16 */

static inline float f16_to_f32(const uint8_t *p) {
    const uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000u | man << 13;
    else if (exp)
        bits = sign | (exp + 112) << 23 | man << 13;
    else { /* zero or subnormal: man * 2^-24, exact in float32 */
        const float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even, as NumPy's astype(float16): overflow gives inf. */
static inline void f32_to_f16(uint8_t *p, float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = x >> 16 & 0x8000, ax = x & 0x7fffffff;
    uint32_t h;
    if (ax >= 0x7f800000u) /* inf, nan */
        h = 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
    else if (ax >= 0x477ff000u) /* from 65520 up: inf */
        h = 0x7c00;
    else if (ax < 0x38800000u) { /* below 2^-14: a subnormal half, round(|f| * 2^24) */
        float a;
        memcpy(&a, &ax, sizeof a);
        h = (uint32_t)rintf(a * 0x1p24f);
    } else {
        const uint32_t m = ax & 0x7fffff, rem = m & 0x1fff;
        h = ((ax >> 23) - 112) << 10 | m >> 13;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* may carry into the exponent */
    }
    h |= sign;
    p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8);
}

/* ------------------------------------------------------------------ the formats
 * Layouts (ggml-common.h): Q8_0 {f16 d; int8 q[32]}, value q * d. Q4_0 {f16 d; 16 bytes},
 * value (nibble - 8) * d. Q4_1 {f16 d, m; 16 bytes}, value nibble * d + m. In both 4-bit
 * blocks byte i holds element i (low nibble) and i + 16 (high). Q4_K and Q6_K: super-blocks
 * of 256, described at their functions. NF4 (lora's layout; GGUF has no NF4) {float32
 * absmax; 32 bytes}, value code[nibble] * absmax, byte i holding element 2i in its high
 * nibble and 2i + 1 in its low one, as bitsandbytes packs them. */

/* bitsandbytes' NF4 code book (float32, in hex so no decimal rounding intervenes) */
static const float nf4_code[16] = {
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f,
    -0x1.94654p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f,
    -0x1.74f0e2p-4f, 0x0.0p+0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f,
    0x1.f809bap-3f, 0x1.5a0674p-2f, 0x1.c3497p-2f, 0x1.200f56p-1f,
    0x1.722766p-1f, 0x1p+0f};

/* Midpoints between consecutive codes, each the float32 nearest to the exact midpoint of the
 * two float32 codes (in hex: a decimal literal parsed straight to float can round the other
 * way). A normalised value goes to the code above a midpoint it exceeds, so a tie goes to
 * the lower code. */
static const float nf4_mid[15] = {
    -0x1.b239bp-1f, -0x1.38a4ep-1f, -0x1.d709p-2f,
    -0x1.5bd4ecp-2f, -0x1.e079d8p-3f, -0x1.1a7178p-3f,
    -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c4p-4f,
    0x1.a0cfcp-3f, 0x1.2b05a8p-2f, 0x1.8ea7f2p-2f, 0x1.00da08p-1f,
    0x1.491b5ep-1f, 0x1.b913b4p-1f};

static LORA_CLONES void deq_q8_0(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 34, y += 32) {
        const float d = f16_to_f32(b);
        for (int i = 0; i < 32; i++) y[i] = (float)(int8_t)b[2 + i] * d;
    }
}

static LORA_CLONES void deq_q4_0(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 18, y += 32) {
        const float d = f16_to_f32(b);
        for (int i = 0; i < 16; i++) {
            y[i] = (float)((b[2 + i] & 15) - 8) * d;
            y[i + 16] = (float)((b[2 + i] >> 4) - 8) * d;
        }
    }
}

static LORA_CLONES void deq_q4_1(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 20, y += 32) {
        const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
        for (int i = 0; i < 16; i++) {
            y[i] = (float)(b[4 + i] & 15) * d + m;
            y[i + 16] = (float)(b[4 + i] >> 4) * d + m;
        }
    }
}

/* Q4_K {f16 d, dmin; 12 bytes of scales; 128 bytes}: 8 sub-blocks of 32, each with a 6-bit
 * scale sc and min mn packed into the 12 bytes (bytes 0-3: scales 0-3 in the low 6 bits, the
 * high 2 bits of scales 4-7 on top; bytes 4-7 the same for the mins; bytes 8-11 the low 4
 * bits of scales 4-7 (low nibble) and mins 4-7 (high)); value q * (d * sc) - dmin * mn, with
 * bytes 32j..32j+31 holding sub-block 2j in their low nibbles and 2j + 1 in their high. */
static LORA_CLONES void deq_q4_k(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 144, y += 256) {
        const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
        const uint8_t *s = b + 4, *q = b + 16;
        for (int j = 0; j < 8; j++) {
            const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | (s[j - 4] >> 2 & 48);
            const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | (s[j] >> 2 & 48);
            const float ds = d * (float)sc, dm = dmin * (float)mn;
            const uint8_t *qj = q + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            for (int i = 0; i < 32; i++) y[32 * j + i] = (float)(qj[i] >> shift & 15) * ds - dm;
        }
    }
}

/* Q6_K {128 bytes ql; 64 bytes qh; int8 scales[16]; f16 d}: 256 values of 6 bits minus 32,
 * in two halves of 128. In half h, element 32l + i (l < 4, i < 32) takes its low 4 bits from
 * ql[64h + i + 32 (l & 1)] (low nibble for l < 2, high for l >= 2) and its high 2 bits from
 * bits 2l..2l+1 of qh[32h + i]; each 16 values share a scale: value (d * scale) * q. */
static LORA_CLONES void deq_q6_k(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 210, y += 256) {
        const float d = f16_to_f32(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 4; l++) {
                const uint8_t *ql = b + 64 * h + 32 * (l & 1), *qh = b + 128 + 32 * h;
                const int lshift = 4 * (l >> 1), hshift = 2 * l;
                float *yl = y + 128 * h + 32 * l;
                const float s0 = d * (float)sc[(128 * h + 32 * l) / 16];
                const float s1 = d * (float)sc[(128 * h + 32 * l) / 16 + 1];
                for (int i = 0; i < 32; i++) {
                    const int q = ((ql[i] >> lshift & 15) | (qh[i] >> hshift & 3) << 4) - 32;
                    yl[i] = (i < 16 ? s0 : s1) * (float)q;
                }
            }
    }
}

static LORA_CLONES void deq_nf4(float *restrict y, const uint8_t *restrict b, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 36, y += 64) {
        float amax;
        memcpy(&amax, b, sizeof amax);
        for (int i = 0; i < 32; i++) {
            y[2 * i] = nf4_code[b[4 + i] >> 4] * amax;
            y[2 * i + 1] = nf4_code[b[4 + i] & 15] * amax;
        }
    }
}

/* gguf.quants: d = absmax / 127, id = 1 / d (0 when d is 0), q = round(x * id) half away
 * from zero. */
static void q_q8_0(uint8_t *restrict b, const float *restrict x, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 34, x += 32) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        f32_to_f16(b, d);
        for (int i = 0; i < 32; i++) b[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
    }
}

/* gguf.quants: max = the element of largest magnitude (the first such), d = max / -8,
 * q = min(15, trunc(x / d + 8.5)). */
static void q_q4_0(uint8_t *restrict b, const float *restrict x, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 18, x += 32) {
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < 32; i++)
            if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        f32_to_f16(b, d);
        for (int i = 0; i < 16; i++) {
            int lo = (int)(x[i] * id + 8.5f), hi = (int)(x[i + 16] * id + 8.5f);
            lo = lo > 15 ? 15 : lo, hi = hi > 15 ? 15 : hi;
            b[2 + i] = (uint8_t)(lo | hi << 4);
        }
    }
}

/* gguf.quants: d = (max - min) / 15, q = min(15, trunc((x - min) / d + 0.5)), m = min. */
static void q_q4_1(uint8_t *restrict b, const float *restrict x, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 20, x += 32) {
        float max = x[0], min = x[0];
        for (int i = 1; i < 32; i++) {
            max = x[i] > max ? x[i] : max;
            min = x[i] < min ? x[i] : min;
        }
        const float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        f32_to_f16(b, d);
        f32_to_f16(b + 2, min);
        for (int i = 0; i < 16; i++) {
            int lo = (int)((x[i] - min) * id + 0.5f), hi = (int)((x[i + 16] - min) * id + 0.5f);
            lo = lo > 15 ? 15 : lo, hi = hi > 15 ? 15 : hi;
            b[4 + i] = (uint8_t)(lo | hi << 4);
        }
    }
}

/* QLoRA: absmax of the block, each element times 1 / absmax to the nearest code. */
static inline int nf4_index(float v) {
    int q = 0;
    for (int i = 0; i < 15; i++) q += v > nf4_mid[i];
    return q;
}

static inline float nf4_absmax(const float *x) {
    float amax = 0.0f;
    for (int i = 0; i < 64; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    return amax;
}

/* The 32 code bytes of the 64 values x; returns their absmax (the block's scale). */
static inline float nf4_block(uint8_t *restrict codes, const float *restrict x) {
    const float amax = nf4_absmax(x), inv = amax != 0.0f ? 1.0f / amax : 0.0f;
    for (int i = 0; i < 32; i++)
        codes[i] = (uint8_t)(nf4_index(x[2 * i] * inv) << 4 | nf4_index(x[2 * i + 1] * inv));
    return amax;
}

static void q_nf4(uint8_t *restrict b, const float *restrict x, size_t nb) {
    for (size_t k = 0; k < nb; k++, b += 36, x += 64) {
        const float amax = nf4_block(b + 4, x);
        memcpy(b, &amax, sizeof amax);
    }
}

/* ------------------------------------------------------------------ NF4_DQ
 * QLoRA's double quantization (Dettmers et al. 2023, section 3; bitsandbytes' quantize_4bit
 * with compress_statistics=True): the float32 absmax of each NF4 block, less their mean (the
 * offset), quantized to 8 bits with bitsandbytes' signed dynamic map in groups of 256 scales,
 * each group with a float32 absmax of its own. bitsandbytes takes the offset and the groups
 * over the whole tensor; here they are per row (a row's scales split into groups of at most
 * 256, the offset that row's mean absmax), so that rows stay independent for the products.
 * An NF4_DQ row of K = 64 nb elements, ng = ceil(nb / 256) groups:
 *   float32 offset        the mean of the row's nb absmax values
 *   float32 absmax2[ng]   group g's largest |absmax - offset|
 *   uint8 scale[nb]       block k's (absmax - offset) / absmax2, as the nearest dq_code
 *   nb x 32 bytes         each block's NF4 codes, as an NF4 block holds them
 * so 4 + 4 ng + 33 nb bytes. Block k's scale is dq_code[scale[k]] * absmax2 + offset (a
 * float32 product, then a sum) and its values nf4_code[nibble] * that scale. The codes are
 * plain NF4's, against the block's exact absmax: bitsandbytes quantizes the weights first
 * and compresses the statistics afterwards. Rounding, step by step (lora/_reference.py's
 * nf4dq_quantize is the same in NumPy): the offset is the float32 nearest the float64 sum of
 * the absmax values in block order over nb; absmax - offset and its product with 1 / absmax2
 * (0 when absmax2 is 0) are float32. */
#define DQ_GROUP 256

/* bitsandbytes' create_dynamic_map(signed=True) (7 exponent bits, 8 in all): 0, 1 and, for
 * i = 0..6, +-10^(i-6) times the midpoints of linspace(0.1, 1, 2^i + 1), sorted; each the
 * float32 nearest the exact value (torch builds it in float32 and lands within an ulp). */
static const float dq_code[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f,
    -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f,
    -0x1.b46666p-1f, -0x1.ad3334p-1f, -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f,
    -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6666p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, -0x1.4f999ap-1f,
    -0x1.486666p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246666p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.07999ap-1f,
    -0x1.006666p-1f, -0x1.f26666p-2f, -0x1.e4p-2f, -0x1.d5999ap-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d999ap-2f, -0x1.7f3334p-2f,
    -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, -0x1.45999ap-2f, -0x1.373334p-2f,
    -0x1.28ccccp-2f, -0x1.1a6666p-2f, -0x1.0cp-2f, -0x1.fb3334p-3f, -0x1.de6666p-3f,
    -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66666p-4f, -0x1.93d70ap-4f,
    -0x1.8851ecp-4f, -0x1.7cccccp-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f,
    -0x1.4eb852p-4f, -0x1.433334p-4f, -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d8p-4f,
    -0x1.151eb8p-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51eb8p-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, -0x1.5ae148p-5f,
    -0x1.43d70ap-5f, -0x1.2cccccp-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c28p-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451eb8p-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f,
    -0x1.75c29p-7f, -0x1.3e76c8p-7f, -0x1.2c0832p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.560418p-8f,
    -0x1.3126eap-8f, -0x1.0c49bap-8f, -0x1.ced916p-9f, -0x1.851eb8p-9f, -0x1.3b645ap-9f,
    -0x1.e353f8p-10f, -0x1.4fdf3cp-10f, -0x1.eecbfcp-11f, -0x1.b3d07cp-11f, -0x1.78d4fep-11f,
    -0x1.3dd98p-11f, -0x1.02dep-11f, -0x1.8fc504p-12f, -0x1.19ce08p-12f, -0x1.47ae14p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840ep-16f, -0x1.040bfep-17f,
    -0x1.b43526p-19f, -0x1.27476cp-21f, 0x0.0p+0f, 0x1.27476cp-21f, 0x1.b43526p-19f,
    0x1.040bfep-17f, 0x1.64840ep-16f, 0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f,
    0x1.47ae14p-13f, 0x1.19ce08p-12f, 0x1.8fc504p-12f, 0x1.02dep-11f, 0x1.3dd98p-11f,
    0x1.78d4fep-11f, 0x1.b3d07cp-11f, 0x1.eecbfcp-11f, 0x1.4fdf3cp-10f, 0x1.e353f8p-10f,
    0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced916p-9f, 0x1.0c49bap-8f, 0x1.3126eap-8f,
    0x1.560418p-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f,
    0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c0832p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451eb8p-6f, 0x1.733334p-6f, 0x1.a147aep-6f,
    0x1.cf5c28p-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, 0x1.2cccccp-5f, 0x1.43d70ap-5f,
    0x1.5ae148p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51eb8p-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151eb8p-4f, 0x1.20a3d8p-4f,
    0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb852p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7cccccp-4f, 0x1.8851ecp-4f, 0x1.93d70ap-4f,
    0x1.b66666p-4f, 0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f,
    0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3334p-3f, 0x1.0cp-2f,
    0x1.1a6666p-2f, 0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.45999ap-2f, 0x1.54p-2f, 0x1.626666p-2f,
    0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d999ap-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f,
    0x1.c73334p-2f, 0x1.d5999ap-2f, 0x1.e4p-2f, 0x1.f26666p-2f, 0x1.006666p-1f, 0x1.07999ap-1f,
    0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246666p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f,
    0x1.3ap-1f, 0x1.413334p-1f, 0x1.486666p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f,
    0x1.653334p-1f, 0x1.6c6666p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f,
    0x1.906666p-1f, 0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f,
    0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f,
    0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f};

/* The nearest code to v, a tie to the lower one: how many midpoints v exceeds (a binary
 * search). Each midpoint is the float32 nearest the exact one (the sum of two float32 is
 * exact in double). */
static inline int dq_index(float v) {
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int m = (lo + hi) / 2;
        const float mid = (float)(((double)dq_code[m] + (double)dq_code[m + 1]) * 0.5);
        if (v > mid)
            lo = m + 1;
        else
            hi = m;
    }
    return lo;
}

/* Bytes before an NF4_DQ row's scale codes: the offset and one absmax2 per group. */
static inline size_t dq_header(size_t nb) { return 4 + 4 * ((nb + DQ_GROUP - 1) / DQ_GROUP); }

/* An NF4_DQ row of nb blocks as its readers take it: the offset, the scale codes, the NF4
 * codes; dq_absmax2 reads group g's absmax2. */
typedef struct {
    float offset;
    const uint8_t *scale, *codes;
} DqRow;

static inline DqRow dq_row(const uint8_t *row, size_t nb) {
    DqRow r = {0.0f, row + dq_header(nb), row + dq_header(nb) + nb};
    memcpy(&r.offset, row, sizeof r.offset);
    return r;
}

static inline float dq_absmax2(const uint8_t *row, size_t g) {
    float a2;
    memcpy(&a2, row + 4 + 4 * g, sizeof a2);
    return a2;
}

/* One row of nb blocks: the codes and the sum of the scales first, then each group's scales
 * against the offset (their absmax read again from x: a row's absmax values are not kept). */
static void q_nf4dq_row(uint8_t *restrict row, const float *restrict x, size_t nb) {
    uint8_t *scale = row + dq_header(nb), *codes = scale + nb;
    double sum = 0.0;
    for (size_t k = 0; k < nb; k++) sum += nf4_block(codes + 32 * k, x + 64 * k);
    const float offset = (float)(sum / (double)nb);
    memcpy(row, &offset, sizeof offset);
    for (size_t g0 = 0; g0 < nb; g0 += DQ_GROUP) {
        const size_t m = nb - g0 < DQ_GROUP ? nb - g0 : DQ_GROUP;
        float c[DQ_GROUP], a2 = 0.0f;
        for (size_t j = 0; j < m; j++) {
            c[j] = nf4_absmax(x + 64 * (g0 + j)) - offset;
            a2 = fabsf(c[j]) > a2 ? fabsf(c[j]) : a2;
        }
        const float inv = a2 != 0.0f ? 1.0f / a2 : 0.0f;
        memcpy(row + 4 + 4 * (g0 / DQ_GROUP), &a2, sizeof a2);
        for (size_t j = 0; j < m; j++) scale[g0 + j] = (uint8_t)dq_index(c[j] * inv);
    }
}

/* count blocks of one group: NF4 codes (32 bytes each, in order) times their scales. */
static LORA_CLONES void deq_nf4dq_group(float *restrict y, const uint8_t *restrict codes,
                                        const uint8_t *restrict scale, float absmax2,
                                        float offset, size_t count) {
    for (size_t k = 0; k < count; k++, codes += 32, y += 64) {
        const float s = dq_code[scale[k]] * absmax2 + offset;
        for (int i = 0; i < 32; i++) {
            y[2 * i] = nf4_code[codes[i] >> 4] * s;
            y[2 * i + 1] = nf4_code[codes[i] & 15] * s;
        }
    }
}

typedef void (*deq_fn)(float *restrict, const uint8_t *restrict, size_t);
typedef void (*quant_fn)(uint8_t *restrict, const float *restrict, size_t);

/* bytes: of a block; NF4_DQ's 33 (a scale code and 32 bytes of codes) exclude its row header.
 * deq and quant take whole blocks; NF4_DQ has neither (its rows go to the functions above). */
static const struct {
    const char *name;
    size_t elems, bytes;
    deq_fn deq;
    quant_fn quant; /* NULL: read only (but NF4_DQ) */
} formats[LORA_QTYPES] = {
    [LORA_Q8_0] = {"Q8_0", 32, 34, deq_q8_0, q_q8_0},
    [LORA_Q4_0] = {"Q4_0", 32, 18, deq_q4_0, q_q4_0},
    [LORA_Q4_1] = {"Q4_1", 32, 20, deq_q4_1, q_q4_1},
    [LORA_Q4_K] = {"Q4_K", 256, 144, deq_q4_k, NULL},
    [LORA_Q6_K] = {"Q6_K", 256, 210, deq_q6_k, NULL},
    [LORA_NF4] = {"NF4", 64, 36, deq_nf4, q_nf4},
    [LORA_NF4_DQ] = {"NF4_DQ", 64, 33, NULL, NULL},
};

int lora_qtype_from_name(const char *name) {
    for (int q = 1; q < LORA_QTYPES; q++)
        if (!strcmp(formats[q].name, name)) return q;
    return 0;
}

const char *lora_qtype_name(int qtype) { return formats[qtype].name; }
size_t lora_qblock_elems(int qtype) { return formats[qtype].elems; }
int lora_qtype_writable(int qtype) { return qtype == LORA_NF4_DQ || formats[qtype].quant; }

size_t lora_qrow_bytes(int qtype, size_t K) {
    const size_t nb = K / formats[qtype].elems;
    return nb * formats[qtype].bytes + (qtype == LORA_NF4_DQ ? dq_header(nb) : 0);
}

static inline void deq_blocks(float *y, const uint8_t *row, size_t row_nb, size_t b0, size_t nb,
                              int qtype);

/* Units [begin, end) of a tensor, in either direction, on lora's threads: blocks (the tensor
 * one row of them, the block types), or rows of K elements (NF4_DQ). */
typedef struct {
    float *x;
    uint8_t *q;
    size_t K;
    int qtype, write;
} Blocks;

static void blocks_range(void *arg, size_t begin, size_t end) {
    const Blocks *a = arg;
    const size_t e = formats[a->qtype].elems;
    if (a->qtype == LORA_NF4_DQ) {
        const size_t nb = a->K / e, rb = lora_qrow_bytes(a->qtype, a->K);
        for (size_t r = begin; r < end; r++)
            if (a->write)
                q_nf4dq_row(a->q + r * rb, a->x + r * a->K, nb);
            else
                deq_blocks(a->x + r * a->K, a->q + r * rb, nb, 0, nb, a->qtype);
    } else if (a->write)
        formats[a->qtype].quant(a->q + begin * formats[a->qtype].bytes, a->x + begin * e,
                                end - begin);
    else
        deq_blocks(a->x + begin * e, a->q, 0, begin, end - begin, a->qtype);
}

/* Threads split blocks (rows for NF4_DQ), grain blocks apiece at least. */
static void blocks_run(Blocks *a, size_t rows, size_t grain) {
    const size_t nb = a->K / formats[a->qtype].elems;
    if (a->qtype == LORA_NF4_DQ)
        lora_parallel_for(rows, grain / nb + 1, 1, blocks_range, a);
    else
        lora_parallel_for(rows * nb, grain, 1, blocks_range, a);
}

void lora_dequantize(float *y, const uint8_t *q, size_t rows, size_t K, int qtype) {
    Blocks a = {y, (uint8_t *)q, K, qtype, 0};
    blocks_run(&a, rows, 4096);
}

void lora_quantize(uint8_t *q, const float *x, size_t rows, size_t K, int qtype) {
    Blocks a = {(float *)x, q, K, qtype, 1};
    blocks_run(&a, rows, 512);
}

/* ------------------------------------------------------------------ decode dot products
 * acc[i] = x_i . w for the n <= LORA_QDOT_ROWS float32 rows x_i (ldx apart) and one row w of
 * nb blocks, straight from the blocks: each block's quants widened to float in registers and
 * multiplied with x there, its scales applied once per block (d * (q . x) + m * sum(x) for
 * Q4_1, with m = -8 d for Q4_0; NF4's codes looked up with two vpermps tables, NF4_DQ's
 * scale decoded for each block beside that work). The sums
 * are reassociated against dequantize-then-dot, so they agree with it within float32
 * rounding, not bit for bit. Written with AVX2/FMA/F16C intrinsics (GCC's generic vectors
 * lower byte-to-float widening to scalar code) and used when the CPU has them; otherwise,
 * and for Q4_K and Q6_K, the generic path runs (a chunk of the row dequantized into L1, then
 * plain dot products). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LORA_AVX2 __attribute__((target("avx2,fma,f16c")))

static LORA_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static LORA_AVX2 inline __m256 f16_splat(const uint8_t *p) {
    return _mm256_set1_ps(_cvtsh_ss((unsigned short)(p[0] | p[1] << 8)));
}

/* 8 bytes at p (unsigned or signed) as 8 floats. */
static LORA_AVX2 inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static LORA_AVX2 inline __m256 i8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* n is a constant at each call (dot_avx2's switch), so the accumulators stay in registers.
 * xsum[i * nb + k]: the sum of x_i over block k (the m term of every row of W needs it). */
static LORA_AVX2 inline __attribute__((always_inline)) void
dot_q4_n(float *acc, const uint8_t *b, const float *x, const float *xsum, size_t ldx,
         size_t nb, int with_min, const int n) {
    __m256 t[LORA_QDOT_ROWS];
    float u[LORA_QDOT_ROWS];
    for (int i = 0; i < n; i++) t[i] = _mm256_setzero_ps(), u[i] = 0.0f;
    const size_t bytes = with_min ? 20 : 18;
    const __m128i m4 = _mm_set1_epi8(15);
    for (size_t k = 0; k < nb; k++, b += bytes) {
        uint32_t dm;
        memcpy(&dm, b, sizeof dm);
        const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm)); /* d, m (Q4_1) */
        const __m256 d = _mm256_broadcastss_ps(dmf);
        const float m = with_min ? _mm_cvtss_f32(_mm_movehdup_ps(dmf)) : -8.0f * _mm_cvtss_f32(dmf);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + bytes - 16));
        const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        const __m256 q0 = u8x8(lo), q1 = u8x8(_mm_srli_si128(lo, 8));
        const __m256 q2 = u8x8(hi), q3 = u8x8(_mm_srli_si128(hi, 8));
        for (int i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * ldx + 32 * k;
            __m256 s = _mm256_mul_ps(q0, _mm256_loadu_ps(xi));
            s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xi + 8), s);
            s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xi + 16), s);
            s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xi + 24), s);
            t[i] = _mm256_fmadd_ps(d, s, t[i]);
            u[i] += m * xsum[(size_t)i * nb + k];
        }
    }
    for (int i = 0; i < n; i++) acc[i] = hsum256(t[i]) + u[i];
}

static LORA_AVX2 inline __attribute__((always_inline)) void
dot_q8_n(float *acc, const uint8_t *b, const float *x, size_t ldx, size_t nb, const int n) {
    __m256 t[LORA_QDOT_ROWS], u[LORA_QDOT_ROWS];
    for (int i = 0; i < n; i++) t[i] = u[i] = _mm256_setzero_ps();
    for (size_t k = 0; k < nb; k++, b += 34) {
        const __m256 d = f16_splat(b);
        const __m256 q0 = i8x8(b + 2), q1 = i8x8(b + 10), q2 = i8x8(b + 18), q3 = i8x8(b + 26);
        for (int i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * ldx + 32 * k;
            __m256 s = _mm256_mul_ps(q0, _mm256_loadu_ps(xi));
            s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xi + 8), s);
            __m256 s2 = _mm256_mul_ps(q2, _mm256_loadu_ps(xi + 16));
            s2 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xi + 24), s2);
            t[i] = _mm256_fmadd_ps(d, s, t[i]);
            u[i] = _mm256_fmadd_ps(d, s2, u[i]);
        }
    }
    for (int i = 0; i < n; i++) acc[i] = hsum256(_mm256_add_ps(t[i], u[i]));
}

/* NF4: 8 codes (lanes of idx, 0..15) to their floats: two 8-entry vpermps tables and a
 * blend on bit 3. The 32 codes of 16 bytes in element order: byte i holds elements 2i (high
 * nibble) and 2i + 1 (low). */
static LORA_AVX2 inline __m256 nf4_values(__m256i idx, __m256 tab_lo, __m256 tab_hi) {
    const __m256 lo = _mm256_permutevar8x32_ps(tab_lo, idx), hi = _mm256_permutevar8x32_ps(tab_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static LORA_AVX2 inline void nf4_codes(const uint8_t *p, __m256i idx[4]) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4), lo = _mm_and_si128(raw, m4);
    const __m128i e0 = _mm_unpacklo_epi8(hi, lo), e1 = _mm_unpackhi_epi8(hi, lo);
    idx[0] = _mm256_cvtepu8_epi32(e0), idx[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(e0, 8));
    idx[2] = _mm256_cvtepu8_epi32(e1), idx[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(e1, 8));
}

/* Block k's scale: NF4's float32 just before its codes, or NF4_DQ's decoded scale code. */
static inline float nf4_scale(const uint8_t *codes, const uint8_t *scale, size_t k,
                              float absmax2, float offset) {
    float amax;
    if (scale) return dq_code[scale[k]] * absmax2 + offset;
    memcpy(&amax, codes - 4, sizeof amax);
    return amax;
}

/* The 32 code bytes of block k at codes + k * stride; its scale, for NF4 (scale NULL) the
 * float32 just before its codes, for NF4_DQ dq_code[scale[k]] * absmax2 + offset (decoded
 * here, beside the vector work, not in a pass of its own). */
static LORA_AVX2 inline __attribute__((always_inline)) void
dot_nf4_n(float *acc, const uint8_t *codes, size_t stride, const uint8_t *scale, float absmax2,
          float offset, const float *x, size_t ldx, size_t nb, const int n) {
    const __m256 tab_lo = _mm256_loadu_ps(nf4_code), tab_hi = _mm256_loadu_ps(nf4_code + 8);
    __m256 t[LORA_QDOT_ROWS];
    for (int i = 0; i < n; i++) t[i] = _mm256_setzero_ps();
    for (size_t k = 0; k < nb; k++, codes += stride) {
        const __m256 a = _mm256_set1_ps(nf4_scale(codes, scale, k, absmax2, offset));
        __m256 v[8];
        for (int h = 0; h < 2; h++) {
            __m256i idx[4];
            nf4_codes(codes + 16 * h, idx);
            for (int j = 0; j < 4; j++) v[4 * h + j] = nf4_values(idx[j], tab_lo, tab_hi);
        }
        for (int i = 0; i < n; i++) {
            const float *xi = x + (size_t)i * ldx + 64 * k;
            __m256 s0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xi));
            __m256 s1 = _mm256_mul_ps(v[1], _mm256_loadu_ps(xi + 8));
            for (int j = 2; j < 8; j += 2) {
                s0 = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xi + 8 * j), s0);
                s1 = _mm256_fmadd_ps(v[j + 1], _mm256_loadu_ps(xi + 8 * j + 8), s1);
            }
            t[i] = _mm256_fmadd_ps(a, _mm256_add_ps(s0, s1), t[i]);
        }
    }
    for (int i = 0; i < n; i++) acc[i] = hsum256(t[i]);
}

/* NF4_DQ: NF4's dot a group of blocks at a time (one absmax2 each). */
static LORA_AVX2 void dot_nf4dq(float *acc, const uint8_t *row, const float *x, size_t ldx,
                                size_t n, size_t nb) {
    const DqRow r = dq_row(row, nb);
    const float offset = r.offset;
    float part[LORA_QDOT_ROWS];
    for (size_t i = 0; i < n; i++) acc[i] = 0.0f;
    for (size_t k = 0; k < nb; k += DQ_GROUP) {
        const size_t m = nb - k < DQ_GROUP ? nb - k : DQ_GROUP;
        const uint8_t *c = r.codes + 32 * k, *s = r.scale + k;
        const float *xk = x + 64 * k, a2 = dq_absmax2(row, k / DQ_GROUP);
        switch (n) {
        case 1: dot_nf4_n(part, c, 32, s, a2, offset, xk, ldx, m, 1); break;
        case 2: dot_nf4_n(part, c, 32, s, a2, offset, xk, ldx, m, 2); break;
        case 3: dot_nf4_n(part, c, 32, s, a2, offset, xk, ldx, m, 3); break;
        default: dot_nf4_n(part, c, 32, s, a2, offset, xk, ldx, m, 4); break;
        }
        for (size_t i = 0; i < n; i++) acc[i] += part[i];
    }
}

static LORA_AVX2 void dot_avx2(float *acc, const uint8_t *row, const float *x,
                               const float *xsum, size_t ldx, size_t n, size_t nb, int qtype) {
    const int q8 = qtype == LORA_Q8_0, nf4 = qtype == LORA_NF4, m = qtype == LORA_Q4_1;
    if (qtype == LORA_NF4_DQ) {
        dot_nf4dq(acc, row, x, ldx, n, nb);
        return;
    }
#define LORA_DOT_CASE(N)                                                                      \
    case N:                                                                                   \
        if (q8)                                                                               \
            dot_q8_n(acc, row, x, ldx, nb, N);                                                \
        else if (nf4)                                                                         \
            dot_nf4_n(acc, row + 4, 36, NULL, 0.0f, 0.0f, x, ldx, nb, N);                     \
        else                                                                                  \
            dot_q4_n(acc, row, x, xsum, ldx, nb, m, N);                                       \
        break;
    switch (n) {
        LORA_DOT_CASE(1)
        LORA_DOT_CASE(2)
        LORA_DOT_CASE(3)
        default: LORA_DOT_CASE(4)
    }
#undef LORA_DOT_CASE
}

/* NF4 blocks (codes and scales as dot_nf4_n takes them) dequantized: code times scale. */
static LORA_AVX2 inline __attribute__((always_inline)) void
deq_nf4_avx2(float *restrict y, const uint8_t *restrict codes, size_t stride,
             const uint8_t *restrict scale, float absmax2, float offset, size_t nb) {
    const __m256 tab_lo = _mm256_loadu_ps(nf4_code), tab_hi = _mm256_loadu_ps(nf4_code + 8);
    for (size_t k = 0; k < nb; k++, codes += stride, y += 64) {
        const __m256 a = _mm256_set1_ps(nf4_scale(codes, scale, k, absmax2, offset));
        for (int h = 0; h < 2; h++) {
            __m256i idx[4];
            nf4_codes(codes + 16 * h, idx);
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(y + 32 * h + 8 * j,
                                 _mm256_mul_ps(nf4_values(idx[j], tab_lo, tab_hi), a));
        }
    }
}

static LORA_AVX2 void deq_nf4dq_avx2(float *restrict y, const uint8_t *restrict codes,
                                     const uint8_t *restrict scale, float absmax2, float offset,
                                     size_t count) {
    deq_nf4_avx2(y, codes, 32, scale, absmax2, offset, count);
}

/* Rows of blocks dequantized with the same widening, each value rounded as gguf.quants
 * rounds it (a product, then a sum: no FMA), so bit for bit as the scalar loops. */
static LORA_AVX2 void deq_avx2(float *restrict y, const uint8_t *restrict b, size_t nb,
                               int qtype) {
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi32(8);
    if (qtype == LORA_NF4) {
        deq_nf4_avx2(y, b + 4, 36, NULL, 0.0f, 0.0f, nb);
        return;
    }
    for (size_t k = 0; k < nb; k++, y += 32) {
        if (qtype == LORA_Q8_0) {
            const __m256 d = f16_splat(b);
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(i8x8(b + 2 + 8 * j), d));
            b += 34;
            continue;
        }
        const int with_min = qtype == LORA_Q4_1;
        const size_t bytes = with_min ? 20 : 18;
        const __m256 d = f16_splat(b);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + bytes - 16));
        const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        if (with_min) {
            const __m256 m = f16_splat(b + 2);
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(y + 8 * j, _mm256_add_ps(_mm256_mul_ps(u8x8(parts[j]), d), m));
        } else {
            for (int j = 0; j < 4; j++) {
                const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[j]), eight);
                _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
            }
        }
        b += bytes;
    }
}

/* 8-bit activations (QuantWeight(..., activations="q8"), a decoding option): each row of x
 * is quantized in blocks of 32 as llama.cpp's Q8_1 does (d = amax / 127, q = x / d rounded
 * to the nearest, ties to even; xs = d * sum(q) kept per block), and a block's product is
 * taken in integers: maddubs of W's 4-bit codes (or |q| of Q8_0, x's sign moved onto them)
 * with x's 8-bit ones, pairs summed to 32 bits, one float FMA with dw * dx. Q4_1 adds
 * m * xs, Q4_0 takes -8 dw xs. About a third of the float path's instructions per weight; the
 * result is W times x's 8-bit rounding (within float32 rounding), not W times x. */
static LORA_AVX2 inline __m256 i8_dot(__m256i wu, __m256i xs) {
    const __m256i p16 = _mm256_maddubs_epi16(wu, xs);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* W's 32 4-bit codes of a Q4_0/Q4_1 block (16 bytes at p) as bytes in element order: the
 * low nibbles are elements 0..15, the high ones 16..31. */
static LORA_AVX2 inline __m256i q4_codes32(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw),
                                                 _mm_srli_epi16(raw, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* One block k of W (at b) against the n rows' block k, into the accumulators t and u. */
static LORA_AVX2 inline __attribute__((always_inline)) void
q8x_block(__m256 *t, float *u, const uint8_t *b, const int8_t *xq, const float *xd,
          const float *xs, size_t ldq, size_t nb, size_t k, const int qtype, const int n) {
    uint32_t dm;
    memcpy(&dm, b, sizeof dm);
    const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
    const float dw = _mm_cvtss_f32(dmf);
    if (qtype == LORA_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(b + 2));
        const __m256i wa = _mm256_sign_epi8(w, w);
        for (int i = 0; i < n; i++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)i * ldq + 32 * k));
            t[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[(size_t)i * nb + k]),
                                   i8_dot(wa, _mm256_sign_epi8(x, w)), t[i]);
        }
        return;
    }
    const float m = qtype == LORA_Q4_1 ? _mm_cvtss_f32(_mm_movehdup_ps(dmf)) : -8.0f * dw;
    const __m256i w = q4_codes32(b + (qtype == LORA_Q4_1 ? 4 : 2));
    for (int i = 0; i < n; i++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)i * ldq + 32 * k));
        t[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[(size_t)i * nb + k]), i8_dot(w, x), t[i]);
        u[i] += m * xs[(size_t)i * nb + k];
    }
}

/* qtype and n are constants at each call (dot_q8x_avx2's switch). Blocks alternate between
 * two sets of accumulators, so that a block's FMA does not wait on the one before. */
static LORA_AVX2 inline __attribute__((always_inline)) void
dot_q8x_n(float *acc, const uint8_t *b, const int8_t *xq, const float *xd, const float *xs,
          size_t ldq, size_t nb, const int qtype, const int n) {
    __m256 t0[LORA_QDOT_ROWS], t1[LORA_QDOT_ROWS];
    float u0[LORA_QDOT_ROWS], u1[LORA_QDOT_ROWS];
    for (int i = 0; i < n; i++) t0[i] = t1[i] = _mm256_setzero_ps(), u0[i] = u1[i] = 0.0f;
    const size_t bytes = qtype == LORA_Q8_0 ? 34 : qtype == LORA_Q4_1 ? 20 : 18;
    size_t k = 0;
    for (; k + 2 <= nb; k += 2, b += 2 * bytes) {
        q8x_block(t0, u0, b, xq, xd, xs, ldq, nb, k, qtype, n);
        q8x_block(t1, u1, b + bytes, xq, xd, xs, ldq, nb, k + 1, qtype, n);
    }
    if (k < nb) q8x_block(t0, u0, b, xq, xd, xs, ldq, nb, k, qtype, n);
    for (int i = 0; i < n; i++) acc[i] = hsum256(_mm256_add_ps(t0[i], t1[i])) + (u0[i] + u1[i]);
}

static LORA_AVX2 void dot_q8x_avx2(float *acc, const uint8_t *row, const int8_t *xq,
                                   const float *xd, const float *xs, size_t ldq, size_t n,
                                   size_t nb, int qtype) {
#define LORA_Q8X_CASE(Q, N)                                                                   \
    case N: dot_q8x_n(acc, row, xq, xd, xs, ldq, nb, Q, N); break;
#define LORA_Q8X_TYPE(Q)                                                                      \
    switch (n) {                                                                              \
        LORA_Q8X_CASE(Q, 1)                                                                   \
        LORA_Q8X_CASE(Q, 2)                                                                   \
        LORA_Q8X_CASE(Q, 3)                                                                   \
        default: LORA_Q8X_CASE(Q, 4)                                                          \
    }
    if (qtype == LORA_Q8_0)
        LORA_Q8X_TYPE(LORA_Q8_0)
    else if (qtype == LORA_Q4_1)
        LORA_Q8X_TYPE(LORA_Q4_1)
    else
        LORA_Q8X_TYPE(LORA_Q4_0)
#undef LORA_Q8X_TYPE
#undef LORA_Q8X_CASE
}

/* One row of x (K elements) into 8-bit blocks: q (K bytes), d and xs (K / 32 each). */
static LORA_AVX2 void quantize_x_q8(int8_t *q, float *d, float *xs, const float *x, size_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t k = 0; k < K / 32; k++, x += 32, q += 32) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256i qi[4];
        for (int j = 0; j < 4; j++)
            qi[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                       _MM_FROUND_TO_NEAREST_INT |
                                                           _MM_FROUND_NO_EXC));
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]),
                                               _mm256_add_epi32(qi[2], qi[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        /* 32-bit lanes to bytes in element order (packs interleave 128-bit halves) */
        const __m256i w16 = _mm256_packs_epi32(qi[0], qi[1]), w16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i b8 = _mm256_packs_epi16(w16, w16b);
        const __m256i ordered = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)q, ordered);
        d[k] = amax / 127.0f;
        xs[k] = d[k] * (float)_mm_cvtsi128_si32(s4);
    }
}

/* Checked at run time (not through an ifunc), so sanitizer builds run these paths too. */
static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif

/* acc[i] = x_i . row on the direct path (xsum: the block sums of x for Q4_0 and Q4_1, see
 * dot_q4_n); 0 (acc untouched) without one. */
static int dot_row_f32(float *acc, const uint8_t *row, const float *x, const float *xsum,
                       size_t ldx, size_t n, size_t nb, int qtype) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2()) {
        dot_avx2(acc, row, x, xsum, ldx, n, nb, qtype);
        return 1;
    }
#endif
    (void)acc, (void)row, (void)x, (void)xsum, (void)ldx, (void)n, (void)nb, (void)qtype;
    return 0;
}

/* The 8-bit activation path: q8_path says whether qtype has it on this CPU; q8_rows puts x's
 * n rows (K elements each) in 8-bit blocks into buf (lora_quant_scratch_elems with act8: n K
 * bytes of q, then n K / 32 floats of d and of xs); dot_row_q8 sets acc[i] = x_i . row from
 * them (1; 0, acc untouched, without the path, as dot_row_f32). */
static int q8_path(int qtype) {
#if defined(__x86_64__) && defined(__GNUC__)
    return (qtype == LORA_Q4_0 || qtype == LORA_Q4_1 || qtype == LORA_Q8_0) && have_avx2();
#else
    (void)qtype;
    return 0;
#endif
}

static size_t q8_bytes(size_t n, size_t K) { return n * K + 2 * n * (K / 32) * sizeof(float); }

static void q8_rows(void *buf, const float *x, size_t n, size_t K) {
#if defined(__x86_64__) && defined(__GNUC__)
    int8_t *q = buf;
    float *d = (float *)(q + n * K), *xs = d + n * (K / 32);
    for (size_t i = 0; i < n; i++)
        quantize_x_q8(q + i * K, d + i * (K / 32), xs + i * (K / 32), x + i * K, K);
#else
    (void)buf, (void)x, (void)n, (void)K;
#endif
}

static int dot_row_q8(float *acc, const uint8_t *row, const void *buf, size_t n, size_t K,
                      int qtype) {
#if defined(__x86_64__) && defined(__GNUC__)
    const int8_t *q = buf;
    const float *d = (const float *)(q + n * K), *xs = d + n * (K / 32);
    dot_q8x_avx2(acc, row, q, d, xs, K, n, K / 32, qtype);
    return 1;
#else
    (void)acc, (void)row, (void)buf, (void)n, (void)K, (void)qtype;
    return 0;
#endif
}

/* The types with a direct dot path on this CPU. */
static int has_dot_path(int qtype) {
#if defined(__x86_64__) && defined(__GNUC__)
    return (qtype == LORA_Q4_0 || qtype == LORA_Q4_1 || qtype == LORA_Q8_0 || qtype == LORA_NF4 ||
            qtype == LORA_NF4_DQ) &&
           have_avx2();
#else
    (void)qtype;
    return 0;
#endif
}

/* Blocks [b0, b0 + m) of an NF4_DQ row of row_nb blocks, a group at a time. */
static void deq_nf4dq(float *y, const uint8_t *row, size_t row_nb, size_t b0, size_t m) {
    const DqRow r = dq_row(row, row_nb);
    for (size_t k = b0, end = b0 + m; k < end;) {
        const size_t g = k / DQ_GROUP, stop = end < (g + 1) * DQ_GROUP ? end : (g + 1) * DQ_GROUP;
        const float a2 = dq_absmax2(row, g);
#if defined(__x86_64__) && defined(__GNUC__)
        if (have_avx2())
            deq_nf4dq_avx2(y, r.codes + 32 * k, r.scale + k, a2, r.offset, stop - k);
        else
#endif
            deq_nf4dq_group(y, r.codes + 32 * k, r.scale + k, a2, r.offset, stop - k);
        y += 64 * (stop - k), k = stop;
    }
}

/* One row's blocks [b0, b0 + nb) into y (nb * block_elems floats); row_nb, the row's blocks,
 * matters to NF4_DQ alone (where its codes start). */
static inline void deq_blocks(float *y, const uint8_t *row, size_t row_nb, size_t b0, size_t nb,
                              int qtype) {
    if (qtype == LORA_NF4_DQ) {
        deq_nf4dq(y, row, row_nb, b0, nb);
        return;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_dot_path(qtype)) {
        deq_avx2(y, row + b0 * formats[qtype].bytes, nb, qtype);
        return;
    }
#endif
    formats[qtype].deq(y, row + b0 * formats[qtype].bytes, nb);
}

#define LORA_IMPL "quant_impl.h"
#include "instantiate.h"

size_t lora_quant_tile_rows(size_t K, size_t rows, size_t elem) {
    size_t tr = LORA_QTILE_BYTES / (K * elem + 1);
    tr = tr ? tr : 1;
    return tr < rows ? tr : rows;
}

size_t lora_quant_scratch_elems(size_t n, size_t d_in, size_t d_out, size_t elem, int backward,
                                int act8) {
    if (!backward && n <= LORA_QDOT_ROWS) return act8 ? (q8_bytes(n, d_in) + elem - 1) / elem : 0;
    return lora_quant_tile_rows(d_in, d_out, elem) * d_in;
}
