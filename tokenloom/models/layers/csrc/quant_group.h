// One group of 32 activations quantized to int8, shared by the group-quantized kernels (gq_linear.cpp,
// gq_tiles.cpp) so that both compute exactly the same codes and scales.
//
// Symmetric, per group: d = max|x| / 127, code = round-to-nearest-even(x * 127 / max|x|); returns d and
// writes the codes in input order; `sum` = d * sum(codes), what a group's minimum multiplies.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tokenloom {

template <typename T>
inline float quantize_group32(const T* x, int8_t* codes, float& sum) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(static_cast<float>(x[i])));
  const float d = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int total = 0;
  for (int i = 0; i < 32; ++i) {
    const int v = static_cast<int>(std::nearbyint(static_cast<float>(x[i]) * inv));
    codes[i] = static_cast<int8_t>(v);
    total += v;
  }
  sum = d * static_cast<float>(total);
  return d;
}

}  // namespace tokenloom
