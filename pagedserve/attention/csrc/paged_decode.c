/* Fused paged decode attention for CPU: one query token per sequence, K/V read straight from the
 * paged cache through the block tables (no gather copy), fp32 accumulation.
 *
 * For each sequence s and KV head h, with L = seq_lens[s] and G = Hq / Hkv:
 *   score[g][t] = scale * q[s, h*G+g] . K[t]      t < L, K[t] = k_cache[bt[s][t / B], t % B, h]
 *   out[s, h*G+g] = sum_t softmax(score[g])[t] * V[t]
 * Two passes per unit of work (a sequence, or some of its KV heads): all scores (K read once), then
 * the weighted V sum (V read once). A unit's KV heads are done together, so each slot's K/V (Hkv
 * heads side by side) is read as one stretch, and the G query heads of a KV head share every K/V
 * row while it is in registers.
 *
 * The cost is memory latency: blocks sit at random places, so the hardware prefetchers cannot see
 * them coming. Rows are software-prefetched two chunks ahead along the unit's whole read stream
 * (K chunks, then V chunks, then the next unit's K), spread over the work; that took a layer call
 * on cold caches from 4.2 to 1.5 ms (see docs/PERFORMANCE.md).
 *
 * Built by pagedserve/attention/cpu_kernel.py with `cc -O3 -march=native` and no -ffast-math (the
 * float32 results must stay within 1e-5 of a float64 reference). Float reductions are written with
 * explicit vector lanes (GCC/Clang vector extensions), so they vectorize without reassociation and
 * sum in a fixed order. Threads come from torch's OpenMP team (see paged_decode).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Floats per vector: one register's worth. With AVX-512 that is 16; on AVX2 machines 16-lane vectors
 * would be split in two and the per-chunk accumulators spill (measured 4-5x slower on a Zen 3). */
#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#endif
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));

#if defined(__clang__) || __GNUC__ >= 12
#define HAVE_SHUFFLE 1 /* two-vector __builtin_shufflevector */
#else
#define HAVE_SHUFFLE 0
#endif

/* Mirrored by ctypes in cpu_kernel.py: keep the field order and types in sync. Strides in elements. */
typedef struct {
    const void *q; /* [S, Hq, D], last dim contiguous */
    int64_t q_stride_s, q_stride_h;
    const void *k_cache; /* [N, B, Hkv, D] contiguous */
    const void *v_cache;
    const int64_t *block_tables; /* [S, >= ceil(L / B)], rows block_table_stride apart */
    int64_t block_table_stride;
    const int64_t *seq_lens; /* [S] */
    void *out;               /* [S, Hq, D], last dim contiguous, dtype of q */
    int64_t out_stride_s, out_stride_h;
    int32_t num_seqs, num_q_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int32_t q_bf16, cache_bf16; /* 1: bfloat16, 0: float32 */
} DecodeArgs;

/* ---- scalar and vector helpers ---- */

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline vfloat splat(float x) { /* not 0 + x: without -ffast-math that is an add */
    return (vfloat){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

static inline vfloat load_f32(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat load_bf16(const uint16_t *p) {
    vhalf h;
    memcpy(&h, p, sizeof h);
    return (vfloat)(__builtin_convertvector(h, vuint) << 16);
}

static inline vfloat vselect(vint mask, vfloat a, vfloat b) { /* mask ? a : b, lane-wise */
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

/* LANES elements of a cache row as floats; bf16 is a compile-time constant at every call site. */
static inline __attribute__((always_inline)) vfloat load_row(const void *row, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)row + i) : load_f32((const float *)row + i);
}

static inline __attribute__((always_inline)) float row_at(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* LANES elements of a row from d0 on, zero past D (the last, partial chunk of an odd head_dim). */
static inline __attribute__((always_inline)) vfloat load_tail(const void *row, int d0, int D, int bf16) {
    float t[LANES] = {0};
    for (int d = d0; d < D; d++) t[d - d0] = row_at(row, d, bf16);
    return load_f32(t);
}

static inline float hsum(vfloat v) { /* pairwise, fixed order */
#if HAVE_SHUFFLE && LANES == 16
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#elif HAVE_SHUFFLE && LANES == 8
    typedef float v4 __attribute__((vector_size(16)));
    v4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
#endif
}

/* Lane i of the result is the sum of p[i]'s lanes: a LANES x LANES transpose folded into the adds
 * (for 16 lanes: 15 adds and 30 shuffles for 16 dot products instead of about 8 operations per hsum). */
static inline vfloat sum_lanes(const vfloat *p) {
#define SH(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#if HAVE_SHUFFLE && LANES == 16
    vfloat a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* lanes 0-7: 8 partial sums of p[2i], 8-15: of p[2i+1] */
        a[i] = SH(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SH(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++) /* 4 lanes each for p[4i] .. p[4i+3] */
        b[i] = SH(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SH(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++) /* 2 lanes each for p[8i] .. p[8i+7] */
        c[i] = SH(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SH(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SH(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SH(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif HAVE_SHUFFLE && LANES == 8
    vfloat a[4], b[2];
    for (int i = 0; i < 4; i++) /* lanes 0-3: 4 partial sums of p[2i], 4-7: of p[2i+1] */
        a[i] = SH(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) + SH(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++) /* 2 lanes each for p[4i] .. p[4i+3] */
        b[i] = SH(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) + SH(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SH(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) + SH(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
#else
    vfloat r;
    for (int i = 0; i < LANES; i++) r[i] = hsum(p[i]);
    return r;
#endif
#undef SH
}

/* exp(x) for x <= 0 (scores minus their max), about 1 ulp (Cephes expf polynomial); x <= -87 -> 0. */
static inline vfloat vexp(vfloat x) {
    const vfloat magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vint keep = x > splat(-87.0f);           /* also drops -inf padding */
    x = vselect(keep, x, splat(-87.0f));
    vfloat t = x * splat(1.44269504088896341f) + magic;
    vfloat n = t - magic;
    vint ni = (vint)t - (vint)magic;
    vfloat r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f); /* x - n ln2, in two parts */
    vfloat p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    vfloat y = p * r * r + r + splat(1.0f);
    y = (vfloat)((vint)y + (ni << 23)); /* y * 2^n; n >= -126 after the clamp */
    return (vfloat)((vint)y & keep);
}

/* ---- inner loops: one chunk of up to LANES consecutive positions ----
 * A chunk is named by its rows' addresses, so any block size works (a chunk may span blocks). The
 * loops take C query rows of one KV head (byte offset `off` into each slot); C (1..MAX_C) and bf16
 * are compile-time constants in each instance, so the C accumulators live in registers; a table picks
 * the instance per chunk and head. Float rows (q, acc) are Dp = D rounded up to LANES, zero-padded. */
#define MAX_C 4

/* Rows to prefetch while computing a chunk, one per position: a burst of prefetches fills the miss
 * queues and stalls (measured slower). L2 hint (locality 1): an L1 hint also measured slower. */
typedef struct {
    const char *const *rows;
    int n;
    int64_t span; /* bytes from each row */
} Prefetch;

static inline __attribute__((always_inline)) void prefetch_row(const Prefetch *pf, int o) {
    if (o < pf->n)
        for (int64_t i = 0; i < pf->span; i += 64) __builtin_prefetch(pf->rows[o] + i, 0, 1);
}

/* sc[c * ld + o] = q[c] . K[o] for o < LANES (lanes past m get 0). pf: NULL or rows to prefetch. */
static inline __attribute__((always_inline)) void qk_rows(const char *const *rows, int m, int64_t off, int D,
                                                          const float *q, float *sc, int64_t ld,
                                                          const Prefetch *pf, const int C, const int bf16) {
    const int Dv = D - D % LANES, Dp = (D + LANES - 1) / LANES * LANES;
    vfloat part[MAX_C][LANES];
    for (int o = 0; o < LANES; o++) {
        if (pf) prefetch_row(pf, o);
        vfloat acc[MAX_C];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[c] = (vfloat){0};
        if (o < m) {
            const char *row = rows[o] + off;
            for (int d = 0; d < Dp; d += LANES) {
                vfloat kv = d < Dv ? load_row(row, d, bf16) : load_tail(row, d, D, bf16);
#pragma GCC unroll 4
                for (int c = 0; c < C; c++) acc[c] += load_f32(q + c * Dp + d) * kv;
            }
        }
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) part[c][o] = acc[c];
    }
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
        vfloat dots = sum_lanes(part[c]);
        memcpy(sc + c * ld, &dots, sizeof dots);
    }
}

/* acc[c] += sum_{o < m} p[c * ld + o] * V[o]. pf: NULL or rows to prefetch. */
static inline __attribute__((always_inline)) void pv_rows(const char *const *rows, int m, int64_t off, int D,
                                                          const float *p, int64_t ld, float *acc,
                                                          const Prefetch *pf, const int C, const int bf16) {
    const int Dv = D - D % LANES, Dp = (D + LANES - 1) / LANES * LANES;
    for (int d = 0; d < Dp; d += LANES) {
        vfloat sum[MAX_C];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) sum[c] = load_f32(acc + c * Dp + d);
        for (int o = 0; o < m; o++) {
            if (pf && d == 0) prefetch_row(pf, o);
            const char *row = rows[o] + off;
            vfloat vv = d < Dv ? load_row(row, d, bf16) : load_tail(row, d, D, bf16);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) sum[c] += splat(p[c * ld + o]) * vv;
        }
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) memcpy(acc + c * Dp + d, &sum[c], sizeof sum[c]);
    }
}

typedef void (*QkFn)(const char *const *, int, int64_t, int, const float *, float *, int64_t, const Prefetch *);
typedef void (*PvFn)(const char *const *, int, int64_t, int, const float *, int64_t, float *, const Prefetch *);
#define INSTANCE(C, bf16)                                                                                  \
    static void qk_##C##_##bf16(const char *const *rows, int m, int64_t off, int D, const float *q,       \
                                float *sc, int64_t ld, const Prefetch *pf) {                              \
        qk_rows(rows, m, off, D, q, sc, ld, pf, C, bf16);                                                 \
    }                                                                                                      \
    static void pv_##C##_##bf16(const char *const *rows, int m, int64_t off, int D, const float *p,       \
                                int64_t ld, float *acc, const Prefetch *pf) {                             \
        pv_rows(rows, m, off, D, p, ld, acc, pf, C, bf16);                                                \
    }
INSTANCE(1, 0) INSTANCE(2, 0) INSTANCE(3, 0) INSTANCE(4, 0)
INSTANCE(1, 1) INSTANCE(2, 1) INSTANCE(3, 1) INSTANCE(4, 1)
static const QkFn QK[2][MAX_C + 1] = {{0, qk_1_0, qk_2_0, qk_3_0, qk_4_0}, {0, qk_1_1, qk_2_1, qk_3_1, qk_4_1}};
static const PvFn PV[2][MAX_C + 1] = {{0, pv_1_0, pv_2_0, pv_3_0, pv_4_0}, {0, pv_1_1, pv_2_1, pv_3_1, pv_4_1}};

/* ---- one unit: KV heads [h0, h1) of one sequence ---- */

/* Rows of positions [t0, t0 + m) of a sequence, m = min(LANES, L - t0):
 * rows[i] = cache + slot(t0 + i) * slot_bytes + off. Returns m. */
static int chunk_rows(const char **rows, const char *cache, const int64_t *bt, int64_t B, int64_t t0, int64_t L,
                      int64_t slot_bytes, int64_t off) {
    int m = L - t0 < LANES ? (int)(L - t0) : LANES;
    int64_t j = t0 / B, o = t0 - j * B;
    for (int i = 0; i < m; i++) {
        rows[i] = cache + (bt[j] * B + o) * slot_bytes + off;
        if (++o == B) o = 0, j++;
    }
    return m;
}

#define AHEAD 2 /* chunks; 1 and 3 measured about the same */

/* KV heads [h0, h1) of sequence s; next_s: the sequence of the next unit on this thread (-1: none),
 * whose first K chunks are prefetched during this unit's last V chunks.
 * buf: scratch of H * G * (2 * Dp + ld) floats, H = h1 - h0; ld >= L, a multiple of LANES. */
static void attend(const DecodeArgs *a, int64_t s, int h0, int h1, int64_t next_s, float *buf, int64_t ld) {
    const int G = a->num_q_heads / a->num_kv_heads, D = a->head_dim, H = h1 - h0, bf16 = a->cache_bf16;
    const int Dp = (D + LANES - 1) / LANES * LANES, R = H * G; /* R query rows, in head order */
    const int64_t L = a->seq_lens[s], Lp = (L + LANES - 1) / LANES * LANES, B = a->block_size;
    const int64_t esz = bf16 ? 2 : 4, hbytes = (int64_t)D * esz, off0 = (int64_t)h0 * hbytes;
    const int64_t slot = (int64_t)a->num_kv_heads * hbytes, span = (int64_t)H * hbytes;
    const int64_t *bt = a->block_tables + s * a->block_table_stride;
    const int64_t *next_bt = next_s >= 0 ? a->block_tables + next_s * a->block_table_stride : NULL;
    const int64_t next_L = next_s >= 0 ? a->seq_lens[next_s] : 0;
    const char *kc = a->k_cache, *vc = a->v_cache;
    float *qf = buf, *acc = buf + (int64_t)R * Dp, *scores = buf + 2 * (int64_t)R * Dp;
    const char *rows[LANES], *ahead[LANES];

    for (int r = 0; r < R; r++) { /* q rows as floats, pre-scaled, zero-padded to Dp */
        int64_t off = s * a->q_stride_s + (int64_t)(h0 * G + r) * a->q_stride_h;
        for (int d = 0; d < Dp; d++)
            qf[r * Dp + d] = d >= D ? 0.0f
                                    : a->scale * (a->q_bf16 ? bf16_to_f32(((const uint16_t *)a->q)[off + d])
                                                            : ((const float *)a->q)[off + d]);
    }

    /* Pass 1: scores[r][t] = q[r] . K[t]; prefetch K AHEAD chunks on, then the first V chunks. */
    for (int64_t t0 = 0; t0 < L; t0 += LANES) {
        int m = chunk_rows(rows, kc, bt, B, t0, L, slot, off0);
        int64_t ta = t0 + AHEAD * LANES;
        Prefetch pf = {ahead, 0, span};
        if (ta < L) pf.n = chunk_rows(ahead, kc, bt, B, ta, L, slot, off0);
        else if (ta - Lp < L) pf.n = chunk_rows(ahead, vc, bt, B, ta - Lp, L, slot, off0);
        for (int h = 0; h < H; h++)
            for (int g = 0; g < G; g += MAX_C) {
                int c = G - g < MAX_C ? G - g : MAX_C, r = h * G + g;
                QK[bf16][c](rows, m, h * hbytes, D, qf + (int64_t)r * Dp, scores + r * ld + t0, ld, r ? NULL : &pf);
            }
    }

    /* Softmax numerators in place; padding past L is -inf, so exp gives 0 there. */
    float inv_sum[R];
    for (int r = 0; r < R; r++) {
        float *sc = scores + r * ld;
        for (int64_t t = L; t < Lp; t++) sc[t] = -__builtin_inff();
        vfloat mv = load_f32(sc);
        for (int64_t t = LANES; t < Lp; t += LANES) {
            vfloat x = load_f32(sc + t);
            mv = vselect(x > mv, x, mv);
        }
        float mx = mv[0];
        for (int i = 1; i < LANES; i++) mx = mv[i] > mx ? mv[i] : mx;
        vfloat sum = {0};
        mv = splat(mx);
        for (int64_t t = 0; t < Lp; t += LANES) {
            vfloat e = vexp(load_f32(sc + t) - mv);
            memcpy(sc + t, &e, sizeof e);
            sum += e;
        }
        inv_sum[r] = 1.0f / hsum(sum);
    }

    /* Pass 2: acc[r] = sum_t p[r][t] * V[t]; prefetch V AHEAD chunks on, then the next unit's first K. */
    memset(acc, 0, sizeof(float) * (size_t)R * Dp);
    for (int64_t t0 = 0; t0 < L; t0 += LANES) {
        int m = chunk_rows(rows, vc, bt, B, t0, L, slot, off0);
        int64_t ta = t0 + AHEAD * LANES;
        Prefetch pf = {ahead, 0, span};
        if (ta < L) pf.n = chunk_rows(ahead, vc, bt, B, ta, L, slot, off0);
        else if (ta - Lp < next_L) pf.n = chunk_rows(ahead, kc, next_bt, B, ta - Lp, next_L, slot, 0);
        for (int h = 0; h < H; h++)
            for (int g = 0; g < G; g += MAX_C) {
                int c = G - g < MAX_C ? G - g : MAX_C, r = h * G + g;
                PV[bf16][c](rows, m, h * hbytes, D, scores + r * ld + t0, ld, acc + (int64_t)r * Dp, r ? NULL : &pf);
            }
    }

    for (int r = 0; r < R; r++) {
        int64_t off = s * a->out_stride_s + (int64_t)(h0 * G + r) * a->out_stride_h;
        for (int d = 0; d < D; d++) {
            float x = acc[r * Dp + d] * inv_sum[r];
            if (a->q_bf16) ((uint16_t *)a->out)[off + d] = f32_to_bf16(x);
            else ((float *)a->out)[off + d] = x;
        }
    }
}

static void zero_heads(const DecodeArgs *a, int64_t s, int h0, int h1) { /* empty context: nothing to attend */
    const int G = a->num_q_heads / a->num_kv_heads;
    const int64_t esz = a->q_bf16 ? 2 : 4;
    for (int r = h0 * G; r < h1 * G; r++)
        memset((char *)a->out + (s * a->out_stride_s + (int64_t)r * a->out_stride_h) * esz, 0,
               (size_t)(a->head_dim * esz));
}

/* ---- work split and threads ---- */

/* Units [begin, end) of the flattened (sequence, KV head) index u = s * Hkv + h; the heads of one
 * sequence within the range go together. Returns 0, or -1 if scratch memory could not be allocated. */
static int decode_range(const DecodeArgs *a, int64_t begin, int64_t end) {
    const int Hkv = a->num_kv_heads, G = a->num_q_heads / Hkv, Dp = (a->head_dim + LANES - 1) / LANES * LANES;
    int64_t max_len = 0;
    for (int64_t u = begin; u < end; u++) max_len = a->seq_lens[u / Hkv] > max_len ? a->seq_lens[u / Hkv] : max_len;
    const int64_t ld = (max_len + LANES - 1) / LANES * LANES;
    float *buf = malloc(sizeof(float) * (size_t)((int64_t)Hkv * G * (2 * Dp + ld)));
    if (!buf) return -1;
    for (int64_t u = begin; u < end;) {
        int64_t s = u / Hkv;
        int h0 = (int)(u - s * Hkv), h1 = end - s * Hkv < Hkv ? (int)(end - s * Hkv) : Hkv;
        int64_t next_s = s * Hkv + h1 < end ? s + 1 : -1;
        if (a->seq_lens[s] <= 0) zero_heads(a, s, h0, h1);
        else attend(a, s, h0, h1, next_s, buf, ld);
        u = s * Hkv + h1;
    }
    free(buf);
    return 0;
}

#define MAX_THREADS 64
#define UNIT_OVERHEAD 8             /* fixed cost of a unit, in context tokens */
#define MIN_TOKENS_PER_THREAD 2048 /* context tokens x KV heads; less does not pay for waking a thread */

/* The one entry point: all units on up to num_threads threads (the caller's included), in contiguous
 * ranges of about equal total context length. Returns 0, or -1 on an allocation failure.
 *
 * Threads come from OpenMP, built against the libgomp that torch already loaded (same soname), so the
 * kernel runs on torch's own thread team instead of a private pool: two engines in one process share it
 * as torch's own ops do, and torch's spin/yield settings (GOMP_SPINCOUNT) apply. */
int paged_decode(const DecodeArgs *a, int num_threads) {
    const int Hkv = a->num_kv_heads;
    const int64_t units = (int64_t)a->num_seqs * Hkv;
    int64_t total = 0;
    for (int64_t s = 0; s < a->num_seqs; s++) total += (a->seq_lens[s] + UNIT_OVERHEAD) * Hkv;
    int64_t T = total / MIN_TOKENS_PER_THREAD;
    if (T > num_threads) T = num_threads;
    if (T > units) T = units;
    if (T > MAX_THREADS) T = MAX_THREADS;
    if (T <= 1) return decode_range(a, 0, units);

    int64_t bounds[MAX_THREADS + 1];
    int64_t u = 0, done = 0;
    bounds[0] = 0;
    for (int64_t i = 0; i < T; i++) { /* range i ends once the running cost reaches (i + 1) / T of the total */
        int64_t goal = total * (i + 1) / T;
        while (u < units && (i == T - 1 || done < goal)) done += a->seq_lens[u++ / Hkv] + UNIT_OVERHEAD;
        bounds[i + 1] = u;
    }
    int rc = 0;
#pragma omp parallel for num_threads(T) schedule(static, 1) reduction(| : rc)
    for (int64_t i = 0; i < T; i++) rc |= decode_range(a, bounds[i], bounds[i + 1]);
    return rc;
}
