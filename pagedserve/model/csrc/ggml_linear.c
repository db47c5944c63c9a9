/* Linear layers over GGUF's block-quantized weights, kept quantized in memory: y = x W^T (+ b).
 *
 * W holds a GGUF tensor's bytes, N rows of K weights, each row K/32 blocks of 32 weights
 *   Q4_0: fp16 d, 16 bytes of nibbles          w = d * (q - 8)
 *   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles  w = d * q + m
 *   Q8_0: fp16 d, 32 signed bytes              w = d * q
 * (byte j holds weight j in its low nibble and weight j + 16 in its high one), regrouped within each row
 * (ggml_linear.py, same size): all the row's quants, then its d's, then (Q4_1) its m's. The scales
 * of a row then convert eight at a time, and the inner loop is only quants.
 *
 * Decode reads every weight once a token, so its time is the bytes it reads: Q4_1 is 5 bits a weight
 * against 32 for float32. The product is done as llama.cpp does it: each 32-value block of an input
 * row is quantized to int8 with its own scale (xd) and exact sum (xs), and a block's dot product is an
 * integer one (AVX2: vpmaddubsw + vpmaddwd) scaled once:
 *   sum_j w_j x_j ~= d * xd * sum_j q_j xq_j + m * xs        (Q4_0: m = -8 d)
 * The cost of that int8 rounding is measured in docs/PERFORMANCE.md (greedy agreement, perplexity).
 *
 * A row of W is used for every input row while it is in L1 (rows outer, inputs inner), so the weights
 * are read from memory once a call whatever M is. Output rows are split across torch's OpenMP team.
 * Built by pagedserve/model/quant_linear.py with `cc -O3 -march=native`; without AVX2 the scalar loop
 * does the same integer math.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define USE_AVX2 1
#else
#define USE_AVX2 0
#endif

enum { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8 }; /* ggml's type ids */
#define QK 32

/* Mirrored by ctypes in quant_linear.py: keep the field order and types in sync. */
typedef struct {
    const uint8_t *w;    /* [N, row_bytes] */
    int64_t row_bytes;
    int32_t type;
    int64_t n, k;        /* W is [n, k]; k % 32 == 0 */
    const float *x;      /* [m, k], rows x_stride apart */
    int64_t x_stride;
    int64_t m;
    float *y;            /* [m, n], rows y_stride apart */
    int64_t y_stride;
    const float *bias;   /* [n] or NULL */
} LinearArgs;

static float half_to_float(uint16_t h) {
#if USE_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) { /* zero or subnormal */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000 | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Bytes of one block's quants. */
static int quant_bytes(int type) {
    return type == GGML_Q8_0 ? QK : type == GGML_Q4_0 || type == GGML_Q4_1 ? QK / 2 : 0;
}

/* Where a row's quants, d's and m's (NULL but for Q4_1) start. */
typedef struct {
    const uint8_t *qs;
    const uint16_t *d, *m;
} Row;

static Row row_parts(const uint8_t *row, int type, int64_t nb) {
    const uint16_t *d = (const uint16_t *)(row + nb * quant_bytes(type));
    return (Row){row, d, type == GGML_Q4_1 ? d + nb : NULL};
}

/* Block b's scale and offset (Q4_0: -8 d, Q8_0: 0). */
static void block_scale(Row r, int type, int64_t b, float *d, float *m) {
    *d = half_to_float(r.d[b]);
    *m = type == GGML_Q4_1 ? half_to_float(r.m[b]) : type == GGML_Q4_0 ? -8.0f * *d : 0.0f;
}

/* The block's 32 quants as integers: nibbles 0..15 for the Q4 types, -128..127 for Q8_0. */
static void block_quants(const uint8_t *qs, int type, int32_t q[QK]) {
    if (type == GGML_Q8_0) {
        for (int j = 0; j < QK; j++) q[j] = (int8_t)qs[j];
    } else {
        for (int j = 0; j < QK / 2; j++) {
            q[j] = qs[j] & 0x0f;
            q[j + QK / 2] = qs[j] >> 4;
        }
    }
}

/* Dequantize rows of W into out (float32, k per row): rows[i] of W, or row i when rows is NULL. */
int ggml_dequant_rows(const uint8_t *w, int64_t row_bytes, int32_t type, int64_t k, const int64_t *rows,
                      int64_t count, float *out, int num_threads) {
    if (quant_bytes(type) == 0 || k % QK) return 1;
    const int64_t nb = k / QK;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < count; i++) {
        const Row r = row_parts(w + (rows ? rows[i] : i) * row_bytes, type, nb);
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            int32_t q[QK];
            block_scale(r, type, b, &d, &m);
            block_quants(r.qs + b * quant_bytes(type), type, q);
            for (int j = 0; j < QK; j++) out[i * k + b * QK + j] = d * (float)q[j] + m;
        }
    }
    return 0;
}

/* x's rows as int8 blocks: xq = round(x / xd) with xd = max|x| / 127 per block, and each block's sum.
 * paired: each even/odd pair of blocks is stored as the two blocks' first halves, then their second
 * halves, the order a 32-byte load of the pair's nibbles unpacks into (pair_fma); an odd last block stays
 * as it is. */
static void quantize_inputs(const LinearArgs *a, int paired, int8_t *xq, float *xd, float *xs) {
    const int64_t nb = a->k / QK;
    for (int64_t i = 0; i < a->m; i++) {
        const float *x = a->x + i * a->x_stride;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + b * QK;
            float amax = 0.0f, sum = 0.0f;
            for (int j = 0; j < QK; j++) {
                amax = fmaxf(amax, fabsf(xb[j]));
                sum += xb[j];
            }
            /* A NaN or infinity makes the block's scale NaN, so every product with it is NaN (as in float);
             * its int8 values are then 0 rather than an undefined cast. */
            const int finite = isfinite(amax) && isfinite(sum);
            const float d = finite ? amax / 127.0f : NAN, inv = finite && d > 0.0f ? 1.0f / d : 0.0f;
            const int in_pair = paired && (b % 2 == 1 || b + 1 < nb);
            int8_t *dst = xq + (i * nb + b - (in_pair ? b % 2 : 0)) * QK;
            for (int j = 0; j < QK; j++) {
                const int at = in_pair ? (j < QK / 2 ? 0 : QK) + (int)(b % 2) * (QK / 2) + j % (QK / 2) : j;
                dst[at] = (int8_t)nearbyintf(xb[j] * inv);
            }
            xd[i * nb + b] = d;
            xs[i * nb + b] = sum;
        }
    }
}

#if USE_AVX2
static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Input rows handled together against one weight row: their accumulators stay in registers. */
#define ROWS 4
/* Blocks whose scales are worked out together, ahead of their dot products (a stack array). */
#define CHUNK 64
#define PREFETCH_ROWS 4

#if USE_AVX2
/* acc[i] += scale[i][sb] * (block's quants . input row i's int8 block), for `rows` input rows. */
static inline __attribute__((always_inline)) void block_fma(const int type, const uint8_t *qs, const int8_t *xq,
                                                            int64_t nb, int64_t i0, int64_t b, const int rows,
                                                            float scale[][CHUNK], int64_t sb, __m256 *acc) {
    __m256i q; /* unsigned quants for the Q4 types; |q| for Q8_0, its signs moved onto x */
    if (type == GGML_Q8_0) {
        q = _mm256_loadu_si256((const __m256i *)qs);
    } else {
        const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
        q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0f));
    }
    for (int i = 0; i < rows; i++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + ((i0 + i) * nb + b) * QK));
        __m256i qv = q;
        if (type == GGML_Q8_0) {
            xv = _mm256_sign_epi8(xv, q);
            qv = _mm256_sign_epi8(q, q);
        }
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qv, xv), _mm256_set1_epi16(1)));
        acc[i] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&scale[i][sb]), acc[i]);
    }
}

/* Blocks b and b + 1 of a Q4 row at once: one 32-byte load holds both blocks' nibbles, so its low nibbles
 * are the two blocks' first halves and its high nibbles their second halves, against paired inputs
 * (quantize_inputs). acc[i] += the pair's scales (scale2[i]: b's four times, then b + 1's) times the
 * two integer dot products, summed in 16 bits first (each term at most 2 * 15 * 127). */
static inline __attribute__((always_inline)) void pair_fma(const uint8_t *qs, const int8_t *xq, int64_t nb,
                                                           int64_t i0, int64_t b, const int rows,
                                                           const float *scale2, __m256 *acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), v = _mm256_loadu_si256((const __m256i *)qs);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    for (int i = 0; i < rows; i++) {
        const int8_t *x = xq + ((i0 + i) * nb + b) * QK;
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + QK))));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        acc[i] = _mm256_fmadd_ps(dot, _mm256_loadu_ps(scale2 + i * (CHUNK / 2) * 8), acc[i]);
    }
}
#endif


/* y[i][r] for the input rows i0 .. i0 + rows - 1 and one weight row r. Always inlined with a constant
 * type and `rows`, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_row(const LinearArgs *a, const int type, const Row w,
                                                          const int8_t *xq, const float *xd, const float *xs,
                                                          int64_t i0, const int rows, int64_t r) {
    const int qb = quant_bytes(type);
    const int64_t nb = a->k / QK;
    float scale[ROWS][CHUNK]; /* d_b * xd_b for the chunk's blocks */
    float off[ROWS] = {0};    /* sum_b m_b * xs_b */
#if USE_AVX2
    float scale2[ROWS][CHUNK / 2][8]; /* Q4 pairs (pair_fma): each pair's two scales, four times each */
    const __m256i spread[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                               _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
#endif
#if USE_AVX2
    /* Two chains, even and odd blocks: one row's FMAs would otherwise wait on each other's latency. */
    __m256 acc0[ROWS], acc1[ROWS];
    for (int i = 0; i < rows; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
#else
    float acc[ROWS] = {0};
#endif
    for (int64_t c0 = 0; c0 < nb; c0 += CHUNK) {
        const int64_t cn = nb - c0 < CHUNK ? nb - c0 : CHUNK;
        for (int i = 0; i < rows; i++) {
            const float *xdi = xd + (i0 + i) * nb + c0, *xsi = xs + (i0 + i) * nb + c0;
            int64_t b = 0;
#if USE_AVX2
            __m256 offv = _mm256_setzero_ps();
            for (; b + 8 <= cn; b += 8) {
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.d + c0 + b)));
                const __m256 sv = _mm256_mul_ps(d, _mm256_loadu_ps(xdi + b));
                _mm256_storeu_ps(scale[i] + b, sv);
                if (type != GGML_Q8_0) {
                    for (int k = 0; k < 4; k++) _mm256_storeu_ps(scale2[i][b / 2 + k], _mm256_permutevar8x32_ps(sv, spread[k]));
                    const __m256 m = type == GGML_Q4_1
                        ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.m + c0 + b)))
                        : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
                    offv = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsi + b), offv);
                }
            }
            off[i] += hsum(offv);
#endif
            for (; b < cn; b++) {
                float d, m;
                block_scale(w, type, c0 + b, &d, &m);
                scale[i][b] = d * xdi[b];
                off[i] += m * xsi[b];
#if USE_AVX2
                for (int l = 0; l < 4; l++) scale2[i][b / 2][(b % 2) * 4 + l] = scale[i][b];
#endif
            }
        }
#if USE_AVX2
        int64_t b = 0;
        if (type != GGML_Q8_0) { /* pairs of pairs: two accumulator chains */
            for (; b + 4 <= cn; b += 4) {
                pair_fma(w.qs + (c0 + b) * qb, xq, nb, i0, c0 + b, rows, scale2[0][b / 2], acc0);
                pair_fma(w.qs + (c0 + b + 2) * qb, xq, nb, i0, c0 + b + 2, rows, scale2[0][b / 2 + 1], acc1);
            }
            if (b + 2 <= cn) {
                pair_fma(w.qs + (c0 + b) * qb, xq, nb, i0, c0 + b, rows, scale2[0][b / 2], acc0);
                b += 2;
            }
        }
        for (; b + 2 <= cn; b += 2) {
            block_fma(type, w.qs + (c0 + b) * qb, xq, nb, i0, c0 + b, rows, scale, b, acc0);
            block_fma(type, w.qs + (c0 + b + 1) * qb, xq, nb, i0, c0 + b + 1, rows, scale, b + 1, acc1);
        }
        if (b < cn) block_fma(type, w.qs + (c0 + b) * qb, xq, nb, i0, c0 + b, rows, scale, b, acc0);
#else
        for (int64_t b = 0; b < cn; b++) {
            int32_t q[QK];
            block_quants(w.qs + (c0 + b) * qb, type, q);
            for (int i = 0; i < rows; i++) {
                const int8_t *x = xq + ((i0 + i) * nb + c0 + b) * QK;
                int32_t dot = 0;
                for (int j = 0; j < QK; j++) dot += q[j] * x[j];
                acc[i] += (float)dot * scale[i][b];
            }
        }
#endif
    }
    for (int i = 0; i < rows; i++) {
#if USE_AVX2
        const float sum = hsum(_mm256_add_ps(acc0[i], acc1[i]));
#else
        const float sum = acc[i];
#endif
        a->y[(i0 + i) * a->y_stride + r] = sum + off[i] + (a->bias ? a->bias[r] : 0.0f);
    }
}

/* Every input row against weight row r; inlined with a constant type, so each type gets its own loop. */
static inline __attribute__((always_inline)) void row_all(const LinearArgs *a, const int type, const int8_t *xq,
                                                          const float *xd, const float *xs, int64_t r) {
    const Row wrow = row_parts(a->w + r * a->row_bytes, type, a->k / QK);
    /* Ask for the row PREFETCH_ROWS ahead now: one row is a few hundred bytes of work, too little for the
     * hardware prefetcher to run far enough ahead of a stream from memory on its own. */
    const uint8_t *ahead = a->w + (r + PREFETCH_ROWS) * a->row_bytes;
    if (r + PREFETCH_ROWS < a->n)
        for (int64_t off = 0; off < a->row_bytes; off += 64) __builtin_prefetch(ahead + off, 0, 0);
    int64_t i0 = 0;
    for (; i0 + ROWS <= a->m; i0 += ROWS) dot_row(a, type, wrow, xq, xd, xs, i0, ROWS, r);
    switch (a->m - i0) {
    case 3: dot_row(a, type, wrow, xq, xd, xs, i0, 3, r); break;
    case 2: dot_row(a, type, wrow, xq, xd, xs, i0, 2, r); break;
    case 1: dot_row(a, type, wrow, xq, xd, xs, i0, 1, r); break;
    default: break;
    }
}

/* y = x W^T (+ bias). Returns 0, 1 for a bad type or k, 2 when scratch cannot be allocated. */
int ggml_linear(const LinearArgs *a, int num_threads) {
    if (quant_bytes(a->type) == 0 || a->k % QK) return 1;
    const int64_t nb = a->k / QK;
    int8_t *xq = malloc((size_t)(a->m * a->k) + 32);
    float *xd = malloc(sizeof(float) * (size_t)(a->m * nb + 1));
    float *xs = malloc(sizeof(float) * (size_t)(a->m * nb + 1));
    int rc = 0;
    if (!xq || !xd || !xs) {
        rc = 2;
    } else {
        quantize_inputs(a, USE_AVX2 && a->type != GGML_Q8_0, xq, xd, xs);
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t r = 0; r < a->n; r++) {
            switch (a->type) {
            case GGML_Q4_0: row_all(a, GGML_Q4_0, xq, xd, xs, r); break;
            case GGML_Q4_1: row_all(a, GGML_Q4_1, xq, xd, xs, r); break;
            default: row_all(a, GGML_Q8_0, xq, xd, xs, r); break;
            }
        }
    }
    free(xq);
    free(xd);
    free(xs);
    return rc;
}
