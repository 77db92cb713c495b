// LoRA updates of a batch that mixes adapters: each token adds only its own adapter's low-rank product.
//
// A layer keeps every loaded adapter's rank columns stacked, slot by slot: a [K, in], and for each column k
// its row of B (scaling folded in) over only the output columns it writes, a fused layer's shard (q, k or
// v of q|k|v): b_flat[cols[k, 0] ...] holds cols[k, 2] values for outputs [cols[k, 1], cols[k, 1] + cols[k, 2]).
// `ranges` [slots, 2] gives each slot's columns [begin, end). Token t with slot s (-1: the base model) gets
//   out[t, cols[k,1] + j] += (x[t] . a[k]) * b_flat[cols[k,0] + j]   for k in ranges[s].
// That is 2 r (in + shard) flops and the slot's own weights read, where the masked dense form (every token
// times all K columns, zeroed outside its own) reads and multiplies every loaded adapter's, full width, in
// three torch calls of tens of microseconds each at decode's few rows. The weights are in the activations'
// dtype (bf16 halves what a step reads); sums are float32, the activation row widened once, the output
// rounded once to its dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

template <typename W>
float dot(const float* x, const W* w, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef TOKENLOOM_SIMD
  using namespace tokenloom::simd;
  vf acc0 = vzero(), acc1 = vzero();
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = vfma(vload(x + i), vload(w + i), acc0);
    acc1 = vfma(vload(x + i + kLanes), vload(w + i + kLanes), acc1);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 = vfma(vload(x + i), vload(w + i), acc0);
  s = vsum(vadd(acc0, acc1));
#endif
  for (; i < n; ++i) s += x[i] * static_cast<float>(w[i]);
  return s;
}

// y += h * w
template <typename W>
void axpy(float* y, float h, const W* w, int64_t n) {
  int64_t i = 0;
#ifdef TOKENLOOM_SIMD
  using namespace tokenloom::simd;
  const vf hv = vset1(h);
  for (; i + kLanes <= n; i += kLanes) vstore(y + i, vfma(hv, vload(w + i), vload(y + i)));
#endif
  for (; i < n; ++i) y[i] += h * static_cast<float>(w[i]);
}

template <typename T>
void lora_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b_flat,
               const int64_t* cols, const int64_t* slot, const int64_t* ranges, int64_t num_slots) {
  const int64_t rows = x.size(0), in = x.size(1), width = out.size(1);
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b_flat.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(in), acc(width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t];
      if (s < 0 || s >= num_slots || ranges[2 * s] == ranges[2 * s + 1]) continue;
      for (int64_t i = 0; i < in; ++i) row[i] = static_cast<float>(xp[t * x_stride + i]);
      int64_t lo = width, hi = 0;
      for (int64_t k = ranges[2 * s]; k < ranges[2 * s + 1]; ++k) {
        lo = std::min(lo, cols[3 * k + 1]);
        hi = std::max(hi, cols[3 * k + 1] + cols[3 * k + 2]);
      }
      std::fill(acc.begin() + lo, acc.begin() + hi, 0.f);
      for (int64_t k = ranges[2 * s]; k < ranges[2 * s + 1]; ++k)
        axpy(acc.data() + cols[3 * k + 1], dot(row.data(), ap + k * in, in), bp + cols[3 * k], cols[3 * k + 2]);
      T* o = op + t * out_stride;
      for (int64_t j = lo; j < hi; ++j) o[j] = static_cast<T>(static_cast<float>(o[j]) + acc[j]);
    }
  });
}

}  // namespace

void lora_add(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b_flat, at::Tensor cols, at::Tensor token_slot,
              at::Tensor ranges) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "lora_add: x [T, in], out [T, out]");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "lora_add: rows must be contiguous");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(out.scalar_type() == dtype && a.scalar_type() == dtype && b_flat.scalar_type() == dtype,
              "lora_add: x, out, a and b_flat must have one dtype");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.size(1) == x.size(1) && b_flat.is_contiguous(),
              "lora_add: a [K, in] and b_flat contiguous");
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.is_contiguous() && cols.dim() == 2 && cols.size(0) == a.size(0) &&
                  cols.size(1) == 3,
              "lora_add: cols [K, 3] int64");
  TORCH_CHECK(token_slot.scalar_type() == at::kLong && token_slot.is_contiguous() && token_slot.numel() == x.size(0),
              "lora_add: token_slot [T] int64");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && ranges.is_contiguous() && ranges.dim() == 2 && ranges.size(1) == 2,
              "lora_add: ranges [slots, 2] int64");
  const int64_t* cp = cols.data_ptr<int64_t>();
  const int64_t k = cols.size(0), n = b_flat.numel(), width = out.size(1);
  for (int64_t i = 0; i < k; ++i)
    TORCH_CHECK(cp[3 * i] >= 0 && cp[3 * i + 2] >= 0 && cp[3 * i] + cp[3 * i + 2] <= n && cp[3 * i + 1] >= 0 &&
                    cp[3 * i + 1] + cp[3 * i + 2] <= width,
                "lora_add: column ", i, " reaches outside b_flat or out");
  const int64_t* rp = ranges.data_ptr<int64_t>();
  for (int64_t s = 0; s < ranges.size(0); ++s)
    TORCH_CHECK(rp[2 * s] >= 0 && rp[2 * s] <= rp[2 * s + 1] && rp[2 * s + 1] <= k, "lora_add: bad range of slot ", s);
  const int64_t* sp = token_slot.data_ptr<int64_t>();
  switch (dtype) {
    case at::kFloat: lora_rows<float>(out, x, a, b_flat, cp, sp, rp, ranges.size(0)); break;
    case at::kBFloat16: lora_rows<c10::BFloat16>(out, x, a, b_flat, cp, sp, rp, ranges.size(0)); break;
    case at::kHalf: lora_rows<c10::Half>(out, x, a, b_flat, cp, sp, rp, ranges.size(0)); break;
    default: TORCH_CHECK(false, "lora_add: float32, bfloat16 or float16 activations");
  }
}
