// Row-wise argmax of float32 logits, for greedy sampling. torch's CPU argmax scans a 262k vocabulary
// one element at a time (~145 us a row here) where its max reduction is vectorised (~9 us): this is
// the vectorised max, then a scan for the first position holding it. Same answer as torch.argmax: the
// first maximal index, and the first NaN where a row has one.
//
// Levels: avx512, avx2 and neon run both passes on simd.h's vectors and lane sets (16, 8, 8 lanes), the
// portable build in scalar loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

}  // namespace

// x float32 [M, V] → int64 [M]: the index of each row's largest value (its first NaN, where it has one).
at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "argmax_rows: a float32 CPU matrix [rows, vocab]");
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}
