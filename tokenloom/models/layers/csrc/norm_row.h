// One row of RMSNorm, shared by the kernels that normalise (rms_norm.cpp, fused.cpp).
//
// r = 1 / sqrt(mean(x^2) + eps), in float32. offset != 0 (Gemma): out = x * r * (offset + w), rounded
// once. offset == 0 (Llama): out = w * round(x * r), the product in the activation dtype, as
// transformers computes it.
//
// Levels: plain loops, which the compiler vectorises at every level (-fopt-info-vec: 32-byte vectors at
// avx2, 16-byte at neon, for float32 and bf16 rows). fp16 rows stay scalar on x86: c10::Half converts
// one element at a time (F16C's scalar instruction), ~3x the time of a bf16 row; not worth kernels of
// their own while fp16 is not a CPU decode dtype in practice.
#pragma once

#include <cmath>
#include <cstdint>

namespace tokenloom {

template <typename T, typename W>
inline void rms_norm_row(const T* x, const W* w, T* o, int64_t dim, float eps, float offset) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < dim; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
  if (offset != 0.f) {
    for (int64_t i = 0; i < dim; ++i)
      o[i] = static_cast<T>(static_cast<float>(x[i]) * inv * (offset + static_cast<float>(w[i])));
  } else {
    for (int64_t i = 0; i < dim; ++i) {
      const T normed = static_cast<T>(static_cast<float>(x[i]) * inv);
      o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

}  // namespace tokenloom
