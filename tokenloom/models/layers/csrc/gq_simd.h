// Vectors for the group-quantized kernels (gq_linear.cpp, gq_pack.cpp, gq_tiles.cpp), one set per level of isa.h, so
// that each kernel is written once over them:
//   vf  kLanes float32 lanes: __m512 (16) on avx512, __m256 (8) on avx2, float32x4_t (4) on neon;
//   vi  as many int32 lanes, for the activation quantizer and the group fit;
// and quantize32, one group of 32 activations to int8, bit-identical to tokenloom::quantize_group32 at
// every level (so gq_linear and gq_tiles_linear see the same codes).
// On the portable level nothing but with_rows and quantize32 (the scalar one) is defined, and
// TOKENLOOM_GQ_VECTOR is left undefined: the kernels keep their scalar loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "isa.h"
#include "quant_group.h"

#if defined(TOKENLOOM_AVX512) || defined(TOKENLOOM_AVX2) || defined(TOKENLOOM_NEON)
#define TOKENLOOM_GQ_VECTOR 1
#endif

namespace tokenloom::gq {
// Internal linkage: every level's kernels are built from the same sources with other flags.
namespace {

// fn(std::integral_constant<int, rows>()) for rows in 1..Max: the kernels take their row count as a template
// argument, so that their per-row accumulators are arrays the compiler keeps in registers. Always inlined,
// with fn: left as calls, the chain and the lambda's captures cost ~4% of a 2048 x 640 product.
template <int Max, int R = 1, typename Fn>
__attribute__((always_inline)) inline void with_rows(int rows, Fn&& fn) {
  if constexpr (R <= Max) {
    if (rows == R) return fn(std::integral_constant<int, R>());
    with_rows<Max, R + 1>(rows, std::forward<Fn>(fn));
  }
}

#ifdef TOKENLOOM_GQ_VECTOR
template <typename T>
constexpr bool kLoadable = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
#endif

#if defined(TOKENLOOM_AVX512)

constexpr int kLanes = 16;
using vf = __m512;
using vi = __m512i;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf acc) { return _mm512_fmadd_ps(a, b, acc); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vabs(vf a) { return _mm512_abs_ps(a); }
inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline float vminall(vf a) { return _mm512_reduce_min_ps(a); }
inline float vmaxall(vf a) { return _mm512_reduce_max_ps(a); }

inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline vf vload(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __mmask16 first_lanes(int count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }
// The first `count` values at p (count <= kLanes), zeros after, reading nothing beyond them.
inline vf vload_first(const float* p, int count) { return _mm512_maskz_loadu_ps(first_lanes(count), p); }
inline vf vload_first(const c10::Half* p, int count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(count), p));
}
// 16 unsigned bytes as 16 / kLanes vectors of floats.
inline void vwiden16(const uint8_t* p, vf* out) {
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstore(c10::BFloat16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline void vstore(c10::Half* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Round to nearest even (the default rounding mode) to int32.
inline vi vint(vf a) { return _mm512_cvtps_epi32(a); }
inline vi vadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline int32_t vsum(vi a) { return _mm512_reduce_add_epi32(a); }
// The low byte of each lane, kLanes bytes at p.
inline void vstore_bytes(void* p, vi a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a)); }

// [sum(a), sum(b), sum(c), sum(d)], each in an order that does not depend on the other three, so a vector
// summed alone gives the same float as within four.
inline void vsum4(vf a, vf b, vf c, vf d, float out[4]) {
  auto halves = [](vf v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(halves(a), halves(b)), _mm256_hadd_ps(halves(c), halves(d)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

#elif defined(TOKENLOOM_AVX2)

constexpr int kLanes = 8;
using vf = __m256;
using vi = __m256i;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf acc) { return _mm256_fmadd_ps(a, b, acc); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Horizontal reductions: the two halves, then lanes i and i + 2, then the last pair.
template <typename Op>
inline float vreduce(vf a, Op op) {
  __m128 q = op(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = op(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(op(q, _mm_movehdup_ps(q)));
}
inline float vsum(vf a) { return vreduce(a, [](__m128 x, __m128 y) { return _mm_add_ps(x, y); }); }
inline float vminall(vf a) { return vreduce(a, [](__m128 x, __m128 y) { return _mm_min_ps(x, y); }); }
inline float vmaxall(vf a) { return vreduce(a, [](__m128 x, __m128 y) { return _mm_max_ps(x, y); }); }

inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vf vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf vload_first(const float* p, int count) {
  if (count >= kLanes) return vload(p);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes));
}
// An even count (the minimums come in pairs of groups) is count / 2 words of a masked load; a row ends
// in one of these, and a copy through memory cost a tenth of a 640-wide row.
inline vf vload_first(const c10::Half* p, int count) {
  if (count >= kLanes) return vload(p);
  if (count % 2 == 0) {
    const __m128i words = _mm_cmpgt_epi32(_mm_set1_epi32(count / 2), _mm_setr_epi32(0, 1, 2, 3));
    return _mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p), words));
  }
  uint16_t buffer[kLanes] = {};
  std::memcpy(buffer, p, sizeof(uint16_t) * count);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(buffer)));
}
inline void vwiden16(const uint8_t* p, vf* out) {
  for (int i = 0; i < 2; ++i)
    out[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
}

inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
// Round to nearest even on the bits (as c10::BFloat16 and _mm512_cvtneps_pbh do for finite values).
inline void vstore(c10::BFloat16* p, vf v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}
inline void vstore(c10::Half* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline vi vint(vf a) { return _mm256_cvtps_epi32(a); }
inline vi vadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline int32_t vsum(vi a) {
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  q = _mm_add_epi32(q, _mm_unpackhi_epi64(q, q));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 1)));
}
inline void vstore_bytes(void* p, vi a) {
  const __m256i low = _mm256_shuffle_epi8(a, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                              0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p),
                   _mm_unpacklo_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)));
}

// hadd of hadds: out[0] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), whatever b, c and d hold.
inline void vsum4(vf a, vf b, vf c, vf d, float out[4]) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

#elif defined(TOKENLOOM_NEON)

constexpr int kLanes = 4;
using vf = float32x4_t;
using vi = int32x4_t;

inline vf vzero() { return vdupq_n_f32(0.f); }
inline vf vset1(float x) { return vdupq_n_f32(x); }
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vfma(vf a, vf b, vf acc) { return vfmaq_f32(acc, a, b); }
inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf vabs(vf a) { return vabsq_f32(a); }
inline vf vround(vf a) { return vrndnq_f32(a); }
inline float vsum(vf a) { return vaddvq_f32(a); }
inline float vminall(vf a) { return vminvq_f32(a); }
inline float vmaxall(vf a) { return vmaxvq_f32(a); }

inline vf vload(const float* p) { return vld1q_f32(p); }
inline vf vload(const c10::BFloat16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline vf vload(const c10::Half* p) { return vcvt_f32_f16(vld1_f16(reinterpret_cast<const float16_t*>(p))); }
template <typename T>
inline vf vload_first(const T* p, int count) {
  if (count >= kLanes) return vload(p);
  T buffer[kLanes] = {};
  for (int i = 0; i < count; ++i) buffer[i] = p[i];
  return vload(buffer);
}
inline void vwiden16(const uint8_t* p, vf* out) {
  const uint8x16_t bytes = vld1q_u8(p);
  const uint16x8_t halves[2] = {vmovl_u8(vget_low_u8(bytes)), vmovl_high_u8(bytes)};
  for (int i = 0; i < 2; ++i) {
    out[2 * i] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(halves[i])));
    out[2 * i + 1] = vcvtq_f32_u32(vmovl_high_u16(halves[i]));
  }
}

inline void vstore(float* p, vf v) { vst1q_f32(p, v); }
inline void vstore(c10::BFloat16* p, vf v) {
  const uint32x4_t bits = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  vst1_u16(reinterpret_cast<uint16_t*>(p), vshrn_n_u32(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7FFF))), 16));
}
inline void vstore(c10::Half* p, vf v) { vst1_f16(reinterpret_cast<float16_t*>(p), vcvt_f16_f32(v)); }

inline vi vint(vf a) { return vcvtnq_s32_f32(a); }
inline vi vadd(vi a, vi b) { return vaddq_s32(a, b); }
inline int32_t vsum(vi a) { return vaddvq_s32(a); }
inline void vstore_bytes(void* p, vi a) {
  const int16x4_t half = vmovn_s32(a);
  const uint32_t bytes = vget_lane_u32(vreinterpret_u32_s8(vmovn_s16(vcombine_s16(half, half))), 0);
  std::memcpy(p, &bytes, 4);
}

// Pairwise adds: out[0] = (a0 + a1) + (a2 + a3), whatever b, c and d hold.
inline void vsum4(vf a, vf b, vf c, vf d, float out[4]) {
  vst1q_f32(out, vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d)));
}

#endif

#ifdef TOKENLOOM_GQ_VECTOR
// Any other output type (double): through a float buffer.
template <typename T>
inline void vstore(T* p, vf v) {
  float lanes[kLanes];
  vstore(lanes, v);
  for (int i = 0; i < kLanes; ++i) p[i] = static_cast<T>(lanes[i]);
}
#endif

// One group of 32 activations to int8 (natural order): d = max|x| / 127, codes = x * (127 / max|x|) rounded
// to nearest even, `sum` = d * sum(codes). The same float operations as tokenloom::quantize_group32 (a
// product each, no sums of floats), so the same codes and scales; it is that function for other types.
template <typename T>
inline float quantize32(const T* x, int8_t* codes, float& sum) {
#ifdef TOKENLOOM_GQ_VECTOR
  if constexpr (kLoadable<T>) {
    constexpr int n = 32 / kLanes;
    vf v[n];
    vf amax = vzero();
    for (int i = 0; i < n; ++i) {
      v[i] = vload(x + i * kLanes);
      amax = vmax(amax, vabs(v[i]));
    }
    const float top = vmaxall(amax);
    const float d = top / 127.f;
    const vf inv = vset1(top > 0.f ? 127.f / top : 0.f);
    vi total = vint(vzero());
    for (int i = 0; i < n; ++i) {
      const vi q = vint(vmul(v[i], inv));
      total = vadd(total, q);
      vstore_bytes(codes + i * kLanes, q);
    }
    sum = d * static_cast<float>(vsum(total));
    return d;
  }
#endif
  return tokenloom::quantize_group32(x, codes, sum);
}

}  // namespace
}  // namespace tokenloom::gq
