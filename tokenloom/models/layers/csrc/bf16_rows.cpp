// bfloat16 matrix x a few rows of activations: the linear layers and LM head of bf16 decode steps.
//
// torch's bf16 GEMM reads a 262k x 640 head at ~23 GB/s for one row (14.5 ms a token, two thirds of a
// bf16 decode step) and rounds the logits to bf16; a whole decode step of gemma-3-270m took 17.6-18.1
// ms through it and 12.7-13.6 ms through this. Here each output is a chain of VDPBF16PS (pairs of
// bf16 products summed in float32) over its row, four rows of weights at a time so each activation
// vector is loaded once per four, and the logits stay float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define TOKENLOOM_BF16_ROWS 1
#endif

namespace {

constexpr int64_t kMaxRows = 8;

#ifdef TOKENLOOM_BF16_ROWS
// Outputs of weight rows w[0..3] for M activation rows; K % 32 == 0.
template <int M>
void four_rows(const c10::BFloat16* w, int64_t k, const c10::BFloat16* x, float (*out)[4]) {
  __m512 acc[M][4];
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    __m512bh wv[4];
    for (int i = 0; i < 4; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(w + i * k + c);
    for (int r = 0; r < M; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k + c);
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xv, wv[i]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i) out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
}

template <int M>
void one_row(const c10::BFloat16* w, int64_t k, const c10::BFloat16* x, float* out) {
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c);
    for (int r = 0; r < M; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + r * k + c), wv);
  }
  for (int r = 0; r < M; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int M, typename O>
void rows_kernel(const c10::BFloat16* w, const c10::BFloat16* x, const float* bias, O* out, int64_t n, int64_t k,
                 int64_t begin, int64_t end) {
  int64_t j = begin;
  float four[M][4];
  for (; j + 4 <= end; j += 4) {
    four_rows<M>(w + j * k, k, x, four);
    for (int r = 0; r < M; ++r)
      for (int i = 0; i < 4; ++i) out[r * n + j + i] = static_cast<O>(four[r][i] + (bias ? bias[j + i] : 0.f));
  }
  float one[M];
  for (; j < end; ++j) {
    one_row<M>(w + j * k, k, x, one);
    for (int r = 0; r < M; ++r) out[r * n + j] = static_cast<O>(one[r] + (bias ? bias[j] : 0.f));
  }
}

template <typename O>
void run_rows(const c10::BFloat16* wp, const c10::BFloat16* xp, const float* bp, O* op, int64_t rows, int64_t n,
              int64_t k) {
  at::parallel_for(0, (n + 3) / 4, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    const int64_t first = 4 * begin, last = std::min(n, 4 * end);
    switch (rows) {
      case 1: return rows_kernel<1, O>(wp, xp, bp, op, n, k, first, last);
      case 2: return rows_kernel<2, O>(wp, xp, bp, op, n, k, first, last);
      case 3: return rows_kernel<3, O>(wp, xp, bp, op, n, k, first, last);
      case 4: return rows_kernel<4, O>(wp, xp, bp, op, n, k, first, last);
      case 5: return rows_kernel<5, O>(wp, xp, bp, op, n, k, first, last);
      case 6: return rows_kernel<6, O>(wp, xp, bp, op, n, k, first, last);
      case 7: return rows_kernel<7, O>(wp, xp, bp, op, n, k, first, last);
      default: return rows_kernel<8, O>(wp, xp, bp, op, n, k, first, last);
    }
  });
}
#endif

}  // namespace

bool bf16_rows_native() {
#ifdef TOKENLOOM_BF16_ROWS
  return true;
#else
  return false;
#endif
}

// x bf16 [M <= 8, K], w bf16 [N, K] (K % 32 == 0), bias [N] or None → [M, N] in float32 (float_out) or bf16.
at::Tensor bf16_rows_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool float_out) {
  TORCH_CHECK(bf16_rows_native(), "bf16_rows_linear: this build has no AVX-512 BF16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_rows_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_rows_linear: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && w.dim() == 2 && x.size(1) == w.size(1),
              "bf16_rows_linear: x [rows <= 8, K] and w [N, K]");
  const int64_t k = x.size(1), n = w.size(0), rows = x.size(0);
  TORCH_CHECK(k % 32 == 0, "bf16_rows_linear: K must be a multiple of 32, got ", k);
  x = x.contiguous();
  w = w.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n, "bf16_rows_linear: bias must have N elements");
  }
  auto out = at::empty({rows, n}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
#ifdef TOKENLOOM_BF16_ROWS
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (float_out)
    run_rows<float>(w.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), bp, out.data_ptr<float>(), rows, n, k);
  else
    run_rows<c10::BFloat16>(w.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), bp,
                            out.data_ptr<c10::BFloat16>(), rows, n, k);
#endif
  return out;
}
