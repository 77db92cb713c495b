// A dense matrix times a few rows of activations: the linear layers and LM head of decode steps.
//
// With one to eight activation rows a product is a matrix-vector product bound by the rate the weights
// are read at. torch's GEMM falls well short of that on a few rows: its bf16 GEMM read a 262k x 640 bf16
// head at ~23 GB/s (and rounds the logits to bf16); its fp32 GEMV reads ~8.8 GB/s on a Zen 3. Here the
// weights stream four rows at a time, each activation vector is loaded once per four rows, and every
// output is a float32 sum. Weight and activation types (w, x):
//   bf16, bf16   avx512: VDPBF16PS (a pair of bf16 products per float lane);
//                avx2, neon: both widened to float32 (a 16-bit shift), products by FMA;
//   bf16, fp32   float32 activations with bf16 weights (CPUs without native bf16 arithmetic): the
//                weights widened, the activations exact;
//   fp32, fp32   FMA.
// The portable build has none of these (dense_rows_supported says false; Python uses torch's GEMM).
//
// A row's outputs do not depend on how many activation rows share the call: each output is its own
// chain of vector FMAs in K order, reduced across lanes in a fixed order, then the K % step tail in
// scalar K order. The rows of a call are taken in groups sized for the register file (a later group
// re-reads the four weight rows from L1), and each quad of weight rows prefetches the next one: a
// 640-wide row is only 20 cache lines, too short a stream for the hardware prefetcher (the 262k x 640
// bf16 head went from 18 to 25 GB/s with it, 2 threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "simd.h"

namespace {

constexpr int64_t kMaxRows = 8;

#ifdef TOKENLOOM_SIMD
using namespace tokenloom::simd;

// How a weight type meets an activation type. kStep elements of K per step, taken in kParts parts;
// load_w/load_x give the part's vectors (of a pair of elements per lane for VDPBF16PS), madd adds
// their products to a float accumulator. kGroup: activation rows per register block (below).

// Where the weights are widened in registers, a block holds its 4 x G accumulators, the four weight
// vectors and an activation vector (avx512: 7 rows, avx2 and neon: 3; measured at least as fast as
// 2 to 8 rows).
constexpr int kWidenedGroup = (kRegs - 4) / 4;

// fp32 weights, fp32 activations.
struct F32 {
  using W = float;
  using X = float;
  using WV = vf;
  using XV = vf;
  static constexpr int kStep = kLanes, kParts = 1;
  // FMAs take the weights straight from memory, so all eight rows in one block: that measured faster
  // than two passes over the weights, also at avx2, where the 32 accumulators do not all fit.
  static constexpr int kGroup = kMaxRows;
  static WV load_w(const W* p, int) { return vload(p); }
  static XV load_x(const X* p, int) { return vload(p); }
  static vf madd(vf acc, WV w, XV x) { return vfma(w, x, acc); }
};

// bf16 weights widened to fp32: each step holds 2 * kLanes weights, its even elements then its odd ones,
// and the activations are stored in that order (see deinterleave) so both parts load them directly.
struct WidenBF16 {
  using W = c10::BFloat16;
  using X = float;
  using WV = vf;
  using XV = vf;
  static constexpr int kStep = 2 * kLanes, kParts = 2, kGroup = kWidenedGroup;
  static WV load_w(const W* p, int part) { return part == 0 ? bf16_even(p) : bf16_odd(p); }
  static XV load_x(const X* p, int part) { return vload(p + part * kLanes); }
  static vf madd(vf acc, WV w, XV x) { return vfma(w, x, acc); }
};

#ifdef TOKENLOOM_AVX512
// bf16 weights and activations: VDPBF16PS adds the pair of products in each 32-bit lane.
struct DotBF16 {
  using W = c10::BFloat16;
  using X = c10::BFloat16;
  using WV = __m512bh;
  using XV = __m512bh;
  static constexpr int kStep = 32, kParts = 1, kGroup = kWidenedGroup;
  static WV load_w(const W* p, int) { return (__m512bh)_mm512_loadu_si512(p); }
  static XV load_x(const X* p, int) { return (__m512bh)_mm512_loadu_si512(p); }
  static vf madd(vf acc, WV w, XV x) { return _mm512_dpbf16_ps(acc, x, w); }
};
#endif

// Sums of weight rows w[0..R) with activation rows x[0..G), all rows k long. Prefetches the R rows
// after them into L2, one per cache line read.
template <typename P, int R, int G>
void block(const typename P::W* w, int64_t k, const typename P::X* x, float (*sums)[4]) {
  vf acc[G][R];
  for (int r = 0; r < G; ++r)
    for (int i = 0; i < R; ++i) acc[r][i] = vzero();
  const int64_t body = k - k % P::kStep;
  for (int64_t c = 0; c < body; c += P::kStep)
    for (int part = 0; part < P::kParts; ++part) {
      typename P::WV wv[R];
      for (int i = 0; i < R; ++i) wv[i] = P::load_w(w + i * k + c, part);
      if (part == 0 && (c * sizeof(typename P::W)) % 64 == 0)  // a step is half a line at avx2 and neon
        for (int i = 0; i < R; ++i) __builtin_prefetch(w + (R + i) * k + c, 0, 2);
      for (int r = 0; r < G; ++r) {
        const typename P::XV xv = P::load_x(x + r * k + c, part);
        for (int i = 0; i < R; ++i) acc[r][i] = P::madd(acc[r][i], wv[i], xv);
      }
    }
  for (int r = 0; r < G; ++r)
    for (int i = 0; i < R; ++i) {
      float s = vsum(acc[r][i]);
      for (int64_t c = body; c < k; ++c)  // fused like the vector part, whatever the compiler contracts
        s = std::fma(static_cast<float>(w[i * k + c]), static_cast<float>(x[r * k + c]), s);
      sums[r][i] = s;
    }
}

// block<P, R, G> for G = g at run time.
template <typename P, int R, int G = P::kGroup>
void block_of(int g, const typename P::W* w, int64_t k, const typename P::X* x, float (*sums)[4]) {
  if constexpr (G > 1) {
    if (g < G) return block_of<P, R, G - 1>(g, w, k, x, sums);
  }
  block<P, R, G>(w, k, x, sums);
}

// The call's operands as the kernel reads them: weights [n, k]; activations [rows, k] in P's layout.
template <typename P, typename O>
struct Problem {
  const typename P::W* w;
  const typename P::X* x;
  const float* bias;
  O* out;
  int64_t rows, n, k;
};

// Weight rows [j, j + R) against every activation row, a register block of rows at a time.
template <typename P, int R, typename O>
void weight_rows(const Problem<P, O>& p, int64_t j) {
  float sums[P::kGroup][4];
  for (int64_t r0 = 0; r0 < p.rows; r0 += P::kGroup) {
    const int g = static_cast<int>(std::min<int64_t>(P::kGroup, p.rows - r0));
    block_of<P, R>(g, p.w + j * p.k, p.k, p.x + r0 * p.k, sums);
    for (int r = 0; r < g; ++r)
      for (int i = 0; i < R; ++i)
        p.out[(r0 + r) * p.n + j + i] = static_cast<O>(sums[r][i] + (p.bias ? p.bias[j + i] : 0.f));
  }
}

template <typename P, typename O>
void run(const Problem<P, O>& p) {
  // Tasks are quads of weight rows, so a row's path (a quad or the single-row tail) is fixed by N alone.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(p.k, 1));
  at::parallel_for(0, (p.n + 3) / 4, grain, [&](int64_t begin, int64_t end) {
    const int64_t last = std::min(p.n, 4 * end);
    int64_t j = 4 * begin;
    for (; j + 4 <= last; j += 4) weight_rows<P, 4>(p, j);
    for (; j < last; ++j) weight_rows<P, 1>(p, j);
  });
}

// Activations for WidenBF16 as float32 [rows, k]: within each step of 2 * kLanes, its even elements
// then its odd ones (the order bf16_even/bf16_odd widen the weights in); the K tail stays in order.
template <typename T>
at::Tensor deinterleave(const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1), step = 2 * kLanes, body = k - k % step;
  auto out = at::empty({rows, k}, x.options().dtype(at::kFloat));
  const T* src = x.data_ptr<T>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r, src += k, dst += k) {
    for (int64_t c = 0; c < body; c += step)
      for (int64_t e = 0; e < kLanes; ++e) {
        dst[c + e] = static_cast<float>(src[c + 2 * e]);
        dst[c + kLanes + e] = static_cast<float>(src[c + 2 * e + 1]);
      }
    for (int64_t c = body; c < k; ++c) dst[c] = static_cast<float>(src[c]);
  }
  return out;
}

template <typename P>
void run_into(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), n = w.size(0), k = w.size(1);
  const auto* wp = static_cast<const typename P::W*>(w.data_ptr());
  const auto* xp = static_cast<const typename P::X*>(x.data_ptr());
  if (out.scalar_type() == at::kFloat)
    run(Problem<P, float>{wp, xp, bias, out.data_ptr<float>(), rows, n, k});
  else
    run(Problem<P, c10::BFloat16>{wp, xp, bias, out.data_ptr<c10::BFloat16>(), rows, n, k});
}
#endif  // TOKENLOOM_SIMD

}  // namespace

bool dense_rows_supported(at::ScalarType x, at::ScalarType w) {
#ifdef TOKENLOOM_SIMD
  return (w == at::kBFloat16 && (x == at::kBFloat16 || x == at::kFloat)) || (w == at::kFloat && x == at::kFloat);
#else
  (void)x;
  (void)w;
  return false;
#endif
}

// x [M <= 8, K], w [N, K], bias [N] or None → [M, N] in x's dtype, or float32 with float_out. Pairs
// (x, w): (bf16, bf16), (fp32, bf16), (fp32, fp32), where dense_rows_supported says so; any K.
at::Tensor dense_rows_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "dense_rows_linear: CPU tensors only");
  TORCH_CHECK(dense_rows_supported(x.scalar_type(), w.scalar_type()), "dense_rows_linear: no ", TOKENLOOM_ISA_NAME,
              " kernel for x ", x.scalar_type(), " and w ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && w.dim() == 2 && x.size(1) == w.size(1),
              "dense_rows_linear: x [rows <= 8, K] and w [N, K]");
  const int64_t n = w.size(0), rows = x.size(0);
  x = x.contiguous();
  w = w.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n, "dense_rows_linear: bias must have N elements");
  }
  auto out = at::empty({rows, n}, x.options().dtype(float_out ? at::kFloat : x.scalar_type()));
#ifdef TOKENLOOM_SIMD
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (w.scalar_type() == at::kFloat) {
    run_into<F32>(x, w, bp, out);
  } else if (x.scalar_type() == at::kFloat) {
    run_into<WidenBF16>(deinterleave<float>(x), w, bp, out);
  } else {
#ifdef TOKENLOOM_AVX512
    run_into<DotBF16>(x, w, bp, out);
#else
    run_into<WidenBF16>(deinterleave<c10::BFloat16>(x), w, bp, out);
#endif
  }
#endif
  return out;
}
