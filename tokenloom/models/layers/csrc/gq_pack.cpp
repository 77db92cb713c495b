// Packing a float weight into the group-quantized layout of gq_layout.h (gq_pack): per group of 32, the
// codes, fp16 scale and fp16 minimum that fit it best among a few clipped ranges (weight ~= code * d + m),
// the same fit as the torch path of models/layers/group_quant.py. Vectorised levels fit a group over
// gq_simd.h's vectors (fit_group_simd), the portable level one weight at a time (fit_group).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gq_layout.h"
#include "gq_simd.h"
#include "kernels.h"

namespace {

using namespace tokenloom::gq;

// Clipped ranges tried per group, as fractions of its span cut off at the low and the high end.
constexpr float kClips[][2] = {{0.f, 0.f}, {0.f, 0.05f}, {0.05f, 0.f}, {0.05f, 0.05f}, {0.1f, 0.1f}};

inline float round_half(float v) { return static_cast<float>(c10::Half(v)); }

// Codes, scale and minimum of one group of 32 (weight ~= code * d + m, d and m exact in fp16): for each
// clipped range the codes fix a least-squares (d, m); the candidate with the smallest error wins.
void fit_group(const float* w, float levels, uint8_t* codes, float& d_out, float& m_out) {
  float low = w[0], high = w[0];
  for (int i = 1; i < 32; ++i) {
    low = std::min(low, w[i]);
    high = std::max(high, w[i]);
  }
  const float span = high - low;
  float best_err = INFINITY, best_d = 0.f, best_m = low;
  for (const auto& clip : kClips) {
    const float lo = low + clip[0] * span, hi = high - clip[1] * span;
    const float inv = hi > lo ? levels / (hi - lo) : 0.f;
    float sc = 0.f, sw = 0.f, scc = 0.f, scw = 0.f;
    uint8_t q[32];
    for (int i = 0; i < 32; ++i) {
      const float c = std::min(levels, std::max(0.f, std::nearbyint((w[i] - lo) * inv)));
      q[i] = static_cast<uint8_t>(c);
      sc += c;
      sw += w[i];
      scc += c * c;
      scw += c * w[i];
    }
    const float det = 32.f * scc - sc * sc;
    const float d = round_half(det > 0.f ? (32.f * scw - sc * sw) / det : 0.f);
    const float m = round_half((sw - d * sc) / 32.f);
    float err = 0.f;
    for (int i = 0; i < 32; ++i) {
      const float e = q[i] * d + m - w[i];
      err += e * e;
    }
    if (err < best_err) {
      best_err = err;
      best_d = d;
      best_m = m;
    }
  }
  // Codes against the scale and minimum actually stored.
  const float inv = best_d > 0.f ? 1.f / best_d : 0.f;
  for (int i = 0; i < 32; ++i)
    codes[i] = static_cast<uint8_t>(std::min(levels, std::max(0.f, std::nearbyint((w[i] - best_m) * inv))));
  d_out = best_d;
  m_out = best_m;
}

#ifdef TOKENLOOM_GQ_VECTOR
// Sum over i of a[i] * b[i], the last product first (with two vectors: a0 * b0 + a1 * b1 in one FMA).
template <int N>
inline vf products(const vf (&a)[N], const vf (&b)[N]) {
  vf acc = vmul(a[N - 1], b[N - 1]);
  for (int i = N - 2; i >= 0; --i) acc = vfma(a[i], b[i], acc);
  return acc;
}

template <int N>
inline vf total(const vf (&a)[N]) {
  vf acc = a[0];
  for (int i = 1; i < N; ++i) acc = vadd(acc, a[i]);
  return acc;
}

// fit_group on 32 / kLanes vectors: the same candidates and arithmetic per weight; the sums are taken in a
// tree, so a near-tie between two candidates can go the other way (the fit's error is the same to float
// rounding).
void fit_group_simd(const float* w, float levels, uint8_t* codes, float& d_out, float& m_out) {
  constexpr int n = 32 / kLanes;
  vf v[n];
  for (int i = 0; i < n; ++i) v[i] = vload(w + i * kLanes);
  vf lowest = v[0], highest = v[0];
  for (int i = 1; i < n; ++i) {
    lowest = vmin(lowest, v[i]);
    highest = vmax(highest, v[i]);
  }
  const float low = vminall(lowest), high = vmaxall(highest), span = high - low;
  const float sw = vsum(total(v));
  const vf zero = vzero(), top = vset1(levels);
  auto codes_of = [&](vf x, vf lo, vf inv) { return vmin(top, vmax(zero, vround(vmul(vsub(x, lo), inv)))); };
  float best_err = INFINITY, best_d = 0.f, best_m = low;
  for (const auto& clip : kClips) {
    const float lo = low + clip[0] * span, hi = high - clip[1] * span;
    const vf vlo = vset1(lo), inv = vset1(hi > lo ? levels / (hi - lo) : 0.f);
    vf c[n];
    for (int i = 0; i < n; ++i) c[i] = codes_of(v[i], vlo, inv);
    const float sc = vsum(total(c)), scc = vsum(products(c, c)), scw = vsum(products(c, v));
    const float det = 32.f * scc - sc * sc;
    const float d = round_half(det > 0.f ? (32.f * scw - sc * sw) / det : 0.f);
    const float m = round_half((sw - d * sc) / 32.f);
    const vf vd = vset1(d), vm = vset1(m);
    vf e[n];
    for (int i = 0; i < n; ++i) e[i] = vsub(vfma(c[i], vd, vm), v[i]);
    const float err = vsum(products(e, e));
    if (err < best_err) {
      best_err = err;
      best_d = d;
      best_m = m;
    }
  }
  // Codes against the scale and minimum actually stored.
  const vf vm = vset1(best_m), inv = vset1(best_d > 0.f ? 1.f / best_d : 0.f);
  for (int i = 0; i < n; ++i) vstore_bytes(codes + i * kLanes, vint(codes_of(v[i], vm, inv)));
  d_out = best_d;
  m_out = best_m;
}
#endif

}  // namespace

// weight [N, K] float with K % 64 == 0, bits 4, 5 or 8 → (codes uint8 [N, K / 2] ([N, K] for 8 bits), d
// float16 [N, K / 64, 2], m float16 [N, K / 32][, high uint8 [N, K / 8] for 5 bits]) in gq_linear's layout.
std::vector<at::Tensor> gq_pack(at::Tensor weight, int64_t bits) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "gq_pack: a 2-D CPU weight");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "gq_pack: bits must be 4, 5 or 8, got ", bits);
  const float levels = static_cast<float>((1 << bits) - 1);
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % kChunk == 0, "gq_pack: K must be a multiple of 64, got ", k);
  // Rows are widened to float32 one at a time: a whole float32 copy of a 262k x 640 head is 670 MB.
  if (weight.scalar_type() != at::kBFloat16 && weight.scalar_type() != at::kHalf) weight = weight.to(at::kFloat);
  weight = weight.contiguous();
  auto codes = at::empty({n, bits == 8 ? k : k / 2}, weight.options().dtype(at::kByte));
  auto d = at::empty({n, k / kChunk, 2}, weight.options().dtype(at::kHalf));
  auto m = at::empty({n, k / 32}, weight.options().dtype(at::kHalf));
  auto high = bits == 5 ? at::zeros({n, k / 8}, weight.options().dtype(at::kByte)) : at::Tensor();
  uint8_t* hp = bits == 5 ? high.data_ptr<uint8_t>() : nullptr;
  uint8_t* c = codes.data_ptr<uint8_t>();
  c10::Half* dp = d.data_ptr<c10::Half>();
  c10::Half* mp = m.data_ptr<c10::Half>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "gq_pack", [&] {
  const scalar_t* src = weight.data_ptr<scalar_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    uint8_t natural[kChunk];
    float scale[2], low[2];
    std::vector<float> w(k);
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t i = 0; i < k; ++i) w[i] = static_cast<float>(src[row * k + i]);
      for (int64_t chunk = 0; chunk < k / kChunk; ++chunk) {
        const int64_t base = row * k + chunk * kChunk;
        const float* wc = w.data() + chunk * kChunk;
        for (int g = 0; g < 2; ++g) {
#ifdef TOKENLOOM_GQ_VECTOR
          fit_group_simd(wc + 32 * g, levels, natural + 32 * g, scale[g], low[g]);
#else
          fit_group(wc + 32 * g, levels, natural + 32 * g, scale[g], low[g]);
#endif
        }
        if (bits == 8) {
          for (int64_t b = 0; b < kChunk; ++b) c[base + b] = natural[chunk_input(b)];
        } else {
          uint8_t* out = c + base / 2;
          for (int64_t p = 0; p < 32; ++p)
            out[p] = static_cast<uint8_t>((natural[chunk_input(p)] & 0x0F) |
                                          ((natural[chunk_input(p + 32)] & 0x0F) << 4));
        }
        if (hp)
          for (int64_t b = 0; b < kChunk; ++b)
            hp[base / 8 + b / 8] |= static_cast<uint8_t>(((natural[chunk_input(b)] >> 4) & 1) << (b % 8));
        for (int g = 0; g < 2; ++g) {
          dp[(row * (k / kChunk) + chunk) * 2 + g] = c10::Half(scale[g]);
          mp[row * (k / 32) + chunk * 2 + g] = c10::Half(low[g]);
        }
      }
    }
  });
  });
  if (bits == 5) return {codes, d, m, high};
  return {codes, d, m};
}
