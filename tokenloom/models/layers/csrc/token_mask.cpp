// Structured outputs: every logit whose bit is clear in its row's token bitmask becomes -inf. The bitmask
// (llguidance's layout) holds one bit per token, 32 to an int32 word, bit b of word w for token 32w + b.
// Constrained rows are mostly all-allowed words (inside a JSON string) or mostly all-forbidden ones (between
// keys), so whole words are decided first and only mixed words go bit by bit: ~0.1 ms a row of 262k tokens
// where unpacking the bits with tensor ops writes and reads 32 values a word (~2 ms).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>

#include "kernels.h"

// logits float32 [R, V] (modified in place); bitmask int32 [R, W]; rows int64: the rows to mask (row r of the
// bitmask for row r of the logits). Tokens past 32 W are forbidden.
void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, at::Tensor rows) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "apply_token_bitmask: logits must be a contiguous float32 CPU matrix [rows, vocab]");
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 &&
                  bitmask.size(0) == logits.size(0),
              "apply_token_bitmask: bitmask must be int32 [rows, words] with the logits' rows");
  bitmask = bitmask.contiguous();
  rows = rows.to(at::kLong).contiguous();
  const int64_t vocab = logits.size(1), words = bitmask.size(1), count = rows.numel();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* lp = logits.data_ptr<float>();
  const int32_t* bp = bitmask.data_ptr<int32_t>();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = rp[k];
      TORCH_CHECK(r >= 0 && r < logits.size(0), "apply_token_bitmask: row out of range");
      float* x = lp + r * vocab;
      const uint32_t* mask = reinterpret_cast<const uint32_t*>(bp + r * words);
      const int64_t covered = std::min(vocab, words * 32);
      for (int64_t w = 0; w * 32 < covered; ++w) {
        const uint32_t word = mask[w];
        const int64_t base = w * 32, stop = std::min<int64_t>(base + 32, covered);
        if (word == 0xFFFFFFFFu) continue;
        if (word == 0) {
          for (int64_t t = base; t < stop; ++t) x[t] = ninf;
          continue;
        }
        for (int64_t t = base; t < stop; ++t)
          if (!((word >> (t - base)) & 1u)) x[t] = ninf;
      }
      for (int64_t t = covered; t < vocab; ++t) x[t] = ninf;
    }
  });
}
