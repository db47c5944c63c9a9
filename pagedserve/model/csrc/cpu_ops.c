/* The small float32 ops of a decoder layer, fused, for CPU: residual add + RMSNorm, SiLU-and-mul, rotary
 * embedding. In eager torch each is several ops (RMSNorm alone is pow, mean, add, rsqrt, mul, mul, with
 * their allocations), and in a one-stream decode step their dispatch costs more than their arithmetic.
 *
 * Each matches the torch reference to float32 rounding: sums of squares are accumulated in double, the
 * rest is the reference's own formula. Rows are split across torch's OpenMP team only when a call is
 * big enough to pay for waking it. Built by pagedserve/native.py (`cc -O3 -march=native`, no fast-math).
 */
#include <math.h>
#include <stdint.h>

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

/* out[r] = silu(gate_up[r][:dim]) * gate_up[r][dim:], silu(g) = g / (1 + exp(-g)). */
void silu_and_mul(float *out, const float *gate_up, int64_t rows, int64_t dim, int64_t in_stride,
                  int64_t out_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * in_stride, *u = g + dim;
        float *o = out + r * out_stride;
        for (int64_t j = 0; j < dim; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
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
