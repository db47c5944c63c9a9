/* Fused paged decode attention for CPU: one query token per sequence, K/V read straight from the
 * paged cache through the block tables (no gather copy), fp32 accumulation.
 *
 * For each unit (sequence s, KV head h) with L = seq_lens[s]:
 *   scores[g][t] = scale * q[s, h*G+g] . K[t]     t < L, K[t] = k_cache[bt[s][t / B], t % B, h]
 *   p = softmax(scores[g]);  out[s, h*G+g] = sum_t p[g][t] * V[t]
 * Two passes per unit: all scores (K read once), then the V sum (V read once); the G query heads
 * of a KV head share each K/V row while it is in registers.
 *
 * Built by pagedserve/attention/cpu_kernel.py with `cc -O3 -march=native` (no -ffast-math: the
 * float32 path must stay within 1e-5 of a float64 reference). Float reductions are written with
 * explicit vector lanes (GCC/Clang vector extensions), so they vectorize without reassociation.
 * Threads are plain pthreads: an OpenMP runtime here would fight the one torch ships.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));

/* Mirrored by ctypes in cpu_kernel.py: keep the field order and types in sync. Strides in elements. */
typedef struct {
    const void *q;              /* [S, Hq, D], last dim contiguous */
    int64_t q_stride_s, q_stride_h;
    const void *k_cache;        /* [N, B, Hkv, D] contiguous */
    const void *v_cache;
    const int64_t *block_tables; /* [S, >= ceil(L / B)], rows block_table_stride apart */
    int64_t block_table_stride;
    const int64_t *seq_lens;    /* [S] */
    void *out;                  /* [S, Hq, D], last dim contiguous, dtype of q */
    int64_t out_stride_s, out_stride_h;
    int32_t num_seqs, num_q_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int32_t q_bf16, cache_bf16; /* 1: bfloat16, 0: float32 */
} DecodeArgs;

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

static inline vfloat splat(float x) { return (vfloat){0} + x; }

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

/* LANES elements of a cache row as floats; `bf16` is a compile-time constant at every call site. */
static inline __attribute__((always_inline)) vfloat load_row(const void *row, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)row + i) : load_f32((const float *)row + i);
}

static inline __attribute__((always_inline)) float row_at(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static inline float hsum(vfloat v) { /* fixed pairwise order: deterministic */
#if defined(__clang__) || __GNUC__ >= 12
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
#endif
}

/* exp(x) for x <= 0 (scores minus their max), ~1 ulp (Cephes expf polynomial); x < -87 -> 0. */
static inline vfloat vexp(vfloat x) {
    const vfloat magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vint keep = x > splat(-87.0f);
    x = (vfloat)(((vint)x & keep) | ((vint)splat(-87.0f) & ~keep));
    vfloat t = x * splat(1.44269504088896341f) + magic;
    vfloat n = t - magic;
    vint ni = (vint)t - (vint)magic;
    vfloat r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
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

/* One (sequence, KV head) unit. cache_bf16 is a compile-time constant (two instantiations). */
static inline __attribute__((always_inline)) void attend_unit(const DecodeArgs *a, int64_t s, int h,
                                                              float *qf, float *scores, int64_t ld,
                                                              float *acc, int cache_bf16) {
    const int G = a->num_q_heads / a->num_kv_heads, D = a->head_dim, B = a->block_size;
    const int64_t L = a->seq_lens[s];
    const int64_t row_stride = (int64_t)a->num_kv_heads * D; /* elements between slots */
    const int64_t esz = cache_bf16 ? 2 : 4;
    const int64_t *bt = a->block_tables + s * a->block_table_stride;
    const int Dv = D - D % LANES;

    for (int g = 0; g < G; g++) { /* q rows as scaled floats */
        int64_t off = s * a->q_stride_s + (int64_t)(h * G + g) * a->q_stride_h;
        for (int d = 0; d < D; d++) {
            float x = a->q_bf16 ? bf16_to_f32(((const uint16_t *)a->q)[off + d]) : ((const float *)a->q)[off + d];
            qf[g * D + d] = x * a->scale;
        }
    }

    /* Pass 1: scores[g][t] (rows ld apart, padded to LANES). */
    for (int64_t t0 = 0; t0 < L; t0 += B) {
        const char *base = (const char *)a->k_cache + ((bt[t0 / B] * B) * row_stride + (int64_t)h * D) * esz;
        int64_t n = L - t0 < B ? L - t0 : B;
        for (int64_t o = 0; o < n; o++) {
            const void *row = base + o * row_stride * esz;
            for (int g = 0; g < G; g++) {
                const float *qg = qf + g * D;
                vfloat v = {0};
                for (int d = 0; d < Dv; d += LANES) v += load_f32(qg + d) * load_row(row, d, cache_bf16);
                float dot = hsum(v);
                for (int d = Dv; d < D; d++) dot += qg[d] * row_at(row, d, cache_bf16);
                scores[g * ld + t0 + o] = dot;
            }
        }
    }

    /* Softmax numerators in place; padding lanes are -87 below the max, so exp gives 0. */
    float inv_sum[G];
    for (int g = 0; g < G; g++) {
        float *sc = scores + g * ld;
        float m = sc[0];
        for (int64_t t = 1; t < L; t++) m = sc[t] > m ? sc[t] : m;
        for (int64_t t = L; t < ld; t++) sc[t] = m - 1000.0f;
        vfloat sum = {0}, mv = splat(m);
        for (int64_t t = 0; t < ld; t += LANES) {
            vfloat e = vexp(load_f32(sc + t) - mv);
            memcpy(sc + t, &e, sizeof e);
            sum += e;
        }
        inv_sum[g] = 1.0f / hsum(sum);
    }

    /* Pass 2: acc[g] = sum_t p[g][t] * V[t]. */
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int64_t t0 = 0; t0 < L; t0 += B) {
        const char *base = (const char *)a->v_cache + ((bt[t0 / B] * B) * row_stride + (int64_t)h * D) * esz;
        int64_t n = L - t0 < B ? L - t0 : B;
        for (int64_t o = 0; o < n; o++) {
            const void *row = base + o * row_stride * esz;
            for (int d = 0; d < Dv; d += LANES) {
                vfloat v = load_row(row, d, cache_bf16);
                for (int g = 0; g < G; g++) {
                    vfloat x = load_f32(acc + g * D + d) + splat(scores[g * ld + t0 + o]) * v;
                    memcpy(acc + g * D + d, &x, sizeof x);
                }
            }
            for (int d = Dv; d < D; d++) {
                float v = row_at(row, d, cache_bf16);
                for (int g = 0; g < G; g++) acc[g * D + d] += scores[g * ld + t0 + o] * v;
            }
        }
    }

    for (int g = 0; g < G; g++) {
        int64_t off = s * a->out_stride_s + (int64_t)(h * G + g) * a->out_stride_h;
        for (int d = 0; d < D; d++) {
            float x = acc[g * D + d] * inv_sum[g];
            if (a->q_bf16) ((uint16_t *)a->out)[off + d] = f32_to_bf16(x);
            else ((float *)a->out)[off + d] = x;
        }
    }
}

static void zero_unit(const DecodeArgs *a, int64_t s, int h) { /* empty context: no keys to attend */
    const int G = a->num_q_heads / a->num_kv_heads, D = a->head_dim;
    size_t esz = a->q_bf16 ? 2 : 4;
    for (int g = 0; g < G; g++) {
        int64_t off = s * a->out_stride_s + (int64_t)(h * G + g) * a->out_stride_h;
        memset((char *)a->out + off * (int64_t)esz, 0, (size_t)D * esz);
    }
}

/* Units [begin, end) of the flattened (sequence, KV head) index u = s * Hkv + h. Returns 0, or -1
 * if scratch memory could not be allocated. */
int paged_decode_range(const DecodeArgs *a, int64_t begin, int64_t end) {
    const int Hkv = a->num_kv_heads, G = a->num_q_heads / Hkv, D = a->head_dim;
    int64_t max_len = 0;
    for (int64_t u = begin; u < end; u++) max_len = a->seq_lens[u / Hkv] > max_len ? a->seq_lens[u / Hkv] : max_len;
    int64_t ld = (max_len + LANES - 1) / LANES * LANES;
    /* scratch: q rows and accumulators [G, D] each, scores [G, ld] */
    float *buf = malloc(sizeof(float) * (size_t)(2 * (int64_t)G * D + G * ld));
    if (!buf) return -1;
    float *qf = buf, *acc = buf + G * D, *scores = buf + 2 * G * D;
    for (int64_t u = begin; u < end; u++) {
        int64_t s = u / Hkv;
        int h = (int)(u % Hkv);
        if (a->seq_lens[s] <= 0) zero_unit(a, s, h);
        else if (a->cache_bf16) attend_unit(a, s, h, qf, scores, ld, acc, 1);
        else attend_unit(a, s, h, qf, scores, ld, acc, 0);
    }
    free(buf);
    return 0;
}

typedef struct {
    const DecodeArgs *a;
    int64_t begin, end;
    int rc;
} Job;

static void *run_job(void *p) {
    Job *j = p;
    j->rc = paged_decode_range(j->a, j->begin, j->end);
    return NULL;
}

#define MAX_THREADS 256
#define UNIT_OVERHEAD 8      /* fixed cost of a unit, in context tokens */
#define MIN_TOKENS_PER_THREAD 4096 /* below this a thread's start-up (~20 us) outweighs its share */

/* All units on up to num_threads threads (the caller's included), split into contiguous ranges of
 * about equal total context length. Returns 0, or -1 on an allocation failure. */
int paged_decode(const DecodeArgs *a, int num_threads) {
    const int Hkv = a->num_kv_heads;
    const int64_t units = (int64_t)a->num_seqs * Hkv;
    int64_t total = 0;
    for (int64_t s = 0; s < a->num_seqs; s++) total += (a->seq_lens[s] + UNIT_OVERHEAD) * Hkv;
    int64_t T = total / MIN_TOKENS_PER_THREAD;
    if (T > num_threads) T = num_threads;
    if (T > units) T = units;
    if (T > MAX_THREADS) T = MAX_THREADS;
    if (T <= 1) return paged_decode_range(a, 0, units);

    Job jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t u = 0, done = 0;
    for (int64_t i = 0; i < T; i++) { /* range i ends where the running cost first reaches (i+1)/T */
        int64_t goal = total * (i + 1) / T, begin = u;
        while (u < units && (i == T - 1 || done < goal)) done += a->seq_lens[u++ / Hkv] + UNIT_OVERHEAD;
        jobs[i] = (Job){a, begin, u, 0};
    }
    for (int64_t i = 1; i < T; i++) started[i] = pthread_create(&tids[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    int rc = jobs[0].rc;
    for (int64_t i = 1; i < T; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else run_job(&jobs[i]); /* no thread to spare: do it here */
        rc |= jobs[i].rc;
    }
    return rc;
}
