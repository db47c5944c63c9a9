/* The small float32 ops of a decoder layer, fused, for CPU: residual add + RMSNorm, SiLU-and-mul, rotary
 * embedding; and the K/V cache write the decode graph (model/decode_graph.py) calls. In eager torch each is several ops (RMSNorm alone is pow, mean, add, rsqrt, mul, mul, with
 * their allocations), and in a one-stream decode step their dispatch costs more than their arithmetic.
 *
 * Each matches the torch reference to float32 rounding: sums of squares are accumulated in double, the
 * rest is the reference's own formula. Rows are split across torch's OpenMP team only when a call is
 * big enough to pay for waking it. Built by pagedserve/native.py (`cc -O3 -march=native`, no fast-math).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define USE_AVX2 1
#else
#define USE_AVX2 0
#endif

/* Below this many elements a call runs on the calling thread: a parallel region costs a few us. */
#define PARALLEL_MIN 32768

/* RMSNorm of x's rows into out: out = x / sqrt(mean(x^2) + eps) * w. With residual (not NULL):
 * residual += x first, and the sum is what is normalised (out may be x). Rows `stride` apart. */
void rms_norm(float *out, const float *x, float *residual, const float *w, int64_t rows, int64_t dim,
              int64_t x_stride, int64_t out_stride, int64_t res_stride, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        const float *src = xr;
        if (residual) {
            float *res = residual + r * res_stride;
            for (int64_t j = 0; j < dim; j++) res[j] += xr[j];
            src = res;
        }
        double ss = 0.0;
        for (int64_t j = 0; j < dim; j++) ss += (double)src[j] * src[j];
        const float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        for (int64_t j = 0; j < dim; j++) o[j] = (src[j] * inv) * w[j];
    }
}

#if USE_AVX2
/* exp of 8 floats to about 1 ulp (libm's expf does not vectorize without -ffast-math): x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n put into exponent bits. */
static __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.72f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: exact n * hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n as 2^(n/2) 2^(n - n/2): n reaches 128 near the top of the range, past one exponent field. */
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

/* out[r] = silu(gate_up[r][:dim]) * gate_up[r][dim:], silu(g) = g / (1 + exp(-g)). */
void silu_and_mul(float *out, const float *gate_up, int64_t rows, int64_t dim, int64_t in_stride,
                  int64_t out_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * in_stride, *u = g + dim;
        float *o = out + r * out_stride;
        int64_t j = 0;
#if USE_AVX2
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; j + 8 <= dim; j += 8) {
            const __m256 gv = _mm256_loadu_ps(g + j);
            const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
        }
#endif
        for (; j < dim; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* Rotate x in place, halves layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per head, with
 * token t's cos/sin from row positions[t] of cos_sin ([P, D]: cos of the D/2 angles, then their sin).
 * x: [T, heads, D], tokens t_stride apart, heads D apart. */
void rotary(float *x, const int64_t *positions, const float *cos_sin, int64_t tokens, int64_t heads,
            int64_t head_dim, int64_t t_stride, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens * heads * head_dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_sin + positions[t] * head_dim, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * t_stride + h * head_dim, *x2 = x1 + half;
            for (int64_t j = 0; j < half; j++) {
                const float a = x1[j], b = x2[j];
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[j] + a * s[j];
            }
        }
    }
}

/* The new tokens' K and V, read from their rows of a fused qkv buffer (row_stride apart, K at k_offset and
 * V at v_offset in a row), into their cache slots: [N, B, Hkv, D] caches, slot s at s * kv_size. */
void kv_cache_write(float *k_cache, float *v_cache, const float *qkv, const int64_t *slots, int64_t tokens,
                    int64_t kv_size, int64_t row_stride, int64_t k_offset, int64_t v_offset) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = qkv + t * row_stride;
        memcpy(k_cache + slots[t] * kv_size, row + k_offset, sizeof(float) * (size_t)kv_size);
        memcpy(v_cache + slots[t] * kv_size, row + v_offset, sizeof(float) * (size_t)kv_size);
    }
}
