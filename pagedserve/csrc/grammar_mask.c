/* Structured output's logits mask: every token a grammar does not allow gets -inf.
 *
 * bitmask row i (int32 words, xgrammar's layout: bit t % 32 of word t / 32 set = token t allowed) masks
 * logits row rows[i]. Only disallowed entries are written, and a word whose 32 tokens are all allowed is
 * skipped whole, so the cost is a read of the bitmask plus a write per banned logit: memory speed, where
 * torch's unpack + masked_fill_ runs at ~2 ns an element (docs/PERFORMANCE.md, "Client features").
 */
#include <math.h>
#include <stdint.h>

void grammar_mask(float *logits, int64_t row_stride, const int64_t *rows, const int32_t *bitmask,
                  int64_t num_rows, int64_t words, int64_t vocab, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows > 1)
    for (int64_t i = 0; i < num_rows; i++) {
        float *x = logits + rows[i] * row_stride;
        const uint32_t *m = (const uint32_t *)(bitmask + i * words);
        for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
            uint32_t allowed = m[w];
            if (allowed == 0xFFFFFFFFu)
                continue;
            int64_t base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
            if (allowed == 0) { /* the common case inside a grammar: a plain fill the compiler vectorises */
                for (int64_t b = 0; b < n; b++)
                    x[base + b] = -INFINITY;
                continue;
            }
            for (int64_t b = 0; b < n; b++)
                if (!((allowed >> b) & 1u))
                    x[base + b] = -INFINITY;
        }
    }
}
