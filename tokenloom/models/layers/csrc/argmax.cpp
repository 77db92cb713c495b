// Row-wise argmax of float32 logits, for greedy sampling. torch's CPU argmax scans a 262k vocabulary
// one element at a time (~145 us a row here) where its max reduction is vectorised (~9 us): this is
// the vectorised max, then a scan for the first position holding it. Same answer as torch.argmax: the
// first maximal index, and the first NaN where a row has one.
//
// Levels: avx512, avx2 and neon run both passes on simd.h's vectors and lane sets (16, 8, 8 lanes), the
// portable build in scalar loops.
//
// A constrained row (structured outputs) takes its argmax under its token bitmask directly: the answer
// torch.argmax gives on the logits with every forbidden token at -inf, without writing them. Forbidden
// words are skipped, so a row between JSON keys (a few allowed tokens) reads a few cache lines, not 1 MB.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

#ifdef TOKENLOOM_SIMD
using namespace tokenloom::simd;

// The row's maximum over x[0..*done), *done a multiple of four vectors, and whether that part has a NaN.
// Four independent maxima, so consecutive compares do not wait on each other.
float max_body(const float* x, int64_t n, int64_t* done, bool* nan) {
  constexpr int64_t kStep = 4 * kLanes;
  vf acc[4];
  for (auto& a : acc) a = vset1(-std::numeric_limits<float>::infinity());
  lanes unordered = nan_lanes(vzero());
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep)
    for (int a = 0; a < 4; ++a) {
      const vf v = vload(x + i + a * kLanes);
      unordered = either(unordered, nan_lanes(v));
      acc[a] = vmax(acc[a], v);
    }
  *done = i;
  *nan = first_lane(unordered) >= 0;
  return vmaxall(vmax(vmax(acc[0], acc[1]), vmax(acc[2], acc[3])));
}

// The first j in [0, n - n % kLanes) with x[j] == value, or that end (where to go on from).
int64_t find_body(const float* x, int64_t n, float value) {
  const vf target = vset1(value);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const int lane = first_lane(equal_lanes(vload(x + j), target));
    if (lane >= 0) return j + lane;
  }
  return j;
}
#else
float max_body(const float*, int64_t, int64_t* done, bool* nan) {
  *done = 0;
  *nan = false;
  return -std::numeric_limits<float>::infinity();
}
int64_t find_body(const float*, int64_t, float) { return 0; }
#endif

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(x[i])) return i;
  return -1;
}

int64_t argmax_row(const float* x, int64_t n) {
  int64_t i;
  bool nan;
  float best = max_body(x, n, &i, &nan);
  for (; i < n; ++i) {
    nan = nan || std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  if (nan) return first_nan(x, n);
  for (int64_t j = find_body(x, n, best); j < n; ++j)
    if (x[j] == best) return j;
  return 0;  // an empty row
}

// The argmax of row x[0, n) counting only the tokens its bitmask allows (the others as -inf, unwritten).
#ifdef TOKENLOOM_SIMD
// Two passes like argmax_row: the maximum (and whether an allowed logit is NaN), then the first allowed
// position holding it. Forbidden words are skipped; a word's lanes are loaded under its bits with -inf
// elsewhere (vload_bits). The last word, where the vocabulary ends inside it, goes bit by bit.
int64_t masked_argmax_row(const float* x, int64_t n, const uint32_t* mask, int64_t words) {
  constexpr float kNinf = -std::numeric_limits<float>::infinity();
  const int64_t full = std::min(words, n / 32);
  vf acc = vset1(kNinf);
  lanes unordered = nan_lanes(vzero());
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = mask[w];
    if (!word) continue;
    for (int k = 0; k < 32; k += kLanes) {
      const vf v = vload_bits(x + w * 32 + k, word >> k, kNinf);
      unordered = either(unordered, nan_lanes(v));
      acc = vmax(acc, v);
    }
  }
  float best = vmaxall(acc);
  bool nan = first_lane(unordered) >= 0;
  const int64_t tail = 32 * full;
  const uint32_t last = full < words && tail < n ? mask[full] : 0u;
  for (uint32_t bits = last; bits; bits &= bits - 1) {
    const int64_t t = tail + __builtin_ctz(bits);
    if (t >= n) break;
    nan = nan || std::isnan(x[t]);
    best = std::max(best, x[t]);
  }
  if (!nan && best == kNinf) return 0;  // the masked row is all -inf: torch says 0
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = mask[w];
    if (!word) continue;
    for (int k = 0; k < 32; k += kLanes) {
      const vf v = vload_bits(x + w * 32 + k, word >> k, kNinf);
      const int lane = first_lane(nan ? nan_lanes(v) : equal_lanes(v, vset1(best)));
      if (lane >= 0) return w * 32 + k + lane;
    }
  }
  for (uint32_t bits = last; bits; bits &= bits - 1) {
    const int64_t t = tail + __builtin_ctz(bits);
    if (t < n && (nan ? std::isnan(x[t]) : x[t] == best)) return t;
  }
  return 0;
}
#else
// Visits the allowed tokens in order, keeping the first strict maximum; the first NaN ends the scan.
int64_t masked_argmax_row(const float* x, int64_t n, const uint32_t* mask, int64_t words) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t at = 0;  // every allowed logit -inf (or none allowed): the masked row is all -inf, torch says 0
  for (int64_t w = 0; w < words && w * 32 < n; ++w)
    for (uint32_t bits = mask[w]; bits; bits &= bits - 1) {
      const int64_t t = w * 32 + __builtin_ctz(bits);
      if (t >= n) break;
      if (std::isnan(x[t])) return t;
      if (x[t] > best) {
        best = x[t];
        at = t;
      }
    }
  return at;
}
#endif

}  // namespace

// x float32 [M, V] → int64 [M]: the index of each row's largest value (its first NaN, where it has one). With
// `bitmask` (int32 [M, W], llguidance's layout) and `masked` (row indices), those rows' argmax counts only the
// tokens their bitmask row allows (tokens past 32 W are forbidden).
at::Tensor argmax_rows(at::Tensor x, c10::optional<at::Tensor> bitmask, c10::optional<at::Tensor> masked) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "argmax_rows: a float32 CPU matrix [rows, vocab]");
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  std::vector<const uint32_t*> masks(rows, nullptr);
  int64_t words = 0;
  at::Tensor bits;
  if (bitmask.has_value() && masked.has_value()) {
    bits = bitmask->contiguous();
    TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.size(0) == rows,
                "argmax_rows: bitmask must be int32 [rows, words] with the logits' rows");
    const at::Tensor which = masked->to(at::kLong).contiguous();
    words = bits.size(1);
    const auto* base = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
    for (int64_t k = 0; k < which.numel(); ++k) {
      const int64_t r = which.data_ptr<int64_t>()[k];
      TORCH_CHECK(r >= 0 && r < rows, "argmax_rows: masked row out of range");
      masks[r] = base + r * words;
    }
  }
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      op[r] = masks[r] ? masked_argmax_row(xp + r * n, n, masks[r], words) : argmax_row(xp + r * n, n);
  });
  return out;
}
