// Float32 vectors of the level's width, for the kernels that share one body across levels
// (dense_rows.cpp, paged_attention.cpp, argmax.cpp). isa.h picks the level; here each gets one type `vf`
// of kLanes float32 lanes, a type `lanes` for the result of a comparison, and the same small set of
// operations on them:
//   avx512  __m512, 16 lanes
//   avx2    __m256, 8 lanes
//   neon    two float32x4_t, 8 lanes: a single q register gives too few independent FMA chains to hide
//           the FMA latency, and 8 lanes make the NEON kernels step through rows exactly as the AVX2 ones
//   portable nothing: TOKENLOOM_SIMD is left undefined and the kernels keep their scalar loops.
// kRegs is how many `vf` the register file holds, for kernels that size their register blocks.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "isa.h"

#if defined(TOKENLOOM_AVX512) || defined(TOKENLOOM_AVX2) || defined(TOKENLOOM_NEON)
#define TOKENLOOM_SIMD 1

namespace tokenloom::simd {
// Internal linkage: every level is built from these sources with other flags, into modules that may share
// a process.
namespace {

#if defined(TOKENLOOM_AVX512)

using vf = __m512;
constexpr int kLanes = 16;
constexpr int kRegs = 32;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf acc) { return _mm512_fmadd_ps(a, b, acc); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vmaxall(vf v) { return _mm512_reduce_max_ps(v); }
inline vf vround(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for whole n in [-126, 127], built in the exponent field.
inline vf vpow2i(vf n) {
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
// bf16 → float32 is the 16 bits moved to the top of a 32-bit lane.
inline vf vload(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline vf vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// 2 * kLanes bf16 at p as two float vectors, its even elements and its odd ones: a lane of 32 bits
// holds one of each, so a shift and a mask widen them without a shuffle.
inline vf bf16_even(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
}
inline vf bf16_odd(const c10::BFloat16* p) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), high));
}

// Lane sets from comparisons (`lanes`): nan_lanes(v), equal_lanes(a, b), their union either(a, b), and
// first_lane(m), the lowest lane in m or -1.
// p[i] where bit i of `bits` is set, else `fill` (a token bitmask's 16 lanes).
inline vf vload_bits(const float* p, uint32_t bits, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>(bits), p);
}
using lanes = __mmask16;
inline lanes nan_lanes(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
inline lanes equal_lanes(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline lanes either(lanes a, lanes b) { return a | b; }
inline int first_lane(lanes m) { return m ? __builtin_ctz(m) : -1; }

#elif defined(TOKENLOOM_AVX2)

using vf = __m256;
constexpr int kLanes = 8;
constexpr int kRegs = 16;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf acc) { return _mm256_fmadd_ps(a, b, acc); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
// Lanes i and i + 4 first, then neighbours, then the two halves: the order NEON's pairwise adds take.
inline float vsum(vf v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehl_ps(pairs, pairs)));
}
inline float vmaxall(vf v) {
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}
inline vf vround(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline vf vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vf vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf bf16_even(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
inline vf bf16_odd(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

inline vf vload_bits(const float* p, uint32_t bits, float fill) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit), lane_bit);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_loadu_ps(p), _mm256_castsi256_ps(on));
}
using lanes = __m256;  // all-ones float lanes
inline lanes nan_lanes(vf v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }
inline lanes equal_lanes(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline lanes either(lanes a, lanes b) { return _mm256_or_ps(a, b); }
inline int first_lane(lanes m) {
  const int bits = _mm256_movemask_ps(m);
  return bits ? __builtin_ctz(bits) : -1;
}

#else  // TOKENLOOM_NEON

struct vf {
  float32x4_t lo, hi;
};
constexpr int kLanes = 8;
constexpr int kRegs = 16;

inline vf vzero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline vf vset1(float x) { return {vdupq_n_f32(x), vdupq_n_f32(x)}; }
inline vf vload(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline void vstore(float* p, vf v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}
inline vf vadd(vf a, vf b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
inline vf vsub(vf a, vf b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
inline vf vmul(vf a, vf b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
inline vf vfma(vf a, vf b, vf acc) { return {vfmaq_f32(acc.lo, a.lo, b.lo), vfmaq_f32(acc.hi, a.hi, b.hi)}; }
// vmaxq_f32 returns NaN where either input is NaN (x86's max returns its second operand); the kernels
// that meet NaN (argmax) test for it separately, so only the maximum of ordered values matters here.
inline vf vmax(vf a, vf b) { return {vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)}; }
inline float vsum(vf v) {
  const float32x4_t q = vaddq_f32(v.lo, v.hi);
  const float32x2_t pairs = vpadd_f32(vget_low_f32(q), vget_high_f32(q));
  return vget_lane_f32(vpadd_f32(pairs, pairs), 0);
}
inline float vmaxall(vf v) { return vmaxvq_f32(vmaxq_f32(v.lo, v.hi)); }
inline vf vround(vf v) { return {vrndnq_f32(v.lo), vrndnq_f32(v.hi)}; }
inline float32x4_t pow2i(float32x4_t n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
inline vf vpow2i(vf n) { return {pow2i(n.lo), pow2i(n.hi)}; }
inline float32x4_t widen_bf16(uint16x4_t raw) { return vreinterpretq_f32_u32(vshll_n_u16(raw, 16)); }
inline vf vload(const c10::BFloat16* p) {
  const uint16x8_t raw = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
  return {widen_bf16(vget_low_u16(raw)), widen_bf16(vget_high_u16(raw))};
}
inline vf vload(const c10::Half* p) {
  const float16x8_t raw = vld1q_f16(reinterpret_cast<const float16_t*>(p));
  return {vcvt_f32_f16(vget_low_f16(raw)), vcvt_high_f32_f16(raw)};
}
inline uint32x4_t bf16_pairs(const c10::BFloat16* p) { return vld1q_u32(reinterpret_cast<const uint32_t*>(p)); }
inline float32x4_t even_of(uint32x4_t pairs) { return vreinterpretq_f32_u32(vshlq_n_u32(pairs, 16)); }
inline float32x4_t odd_of(uint32x4_t pairs) {
  return vreinterpretq_f32_u32(vandq_u32(pairs, vdupq_n_u32(0xFFFF0000u)));
}
inline vf bf16_even(const c10::BFloat16* p) { return {even_of(bf16_pairs(p)), even_of(bf16_pairs(p + 8))}; }
inline vf bf16_odd(const c10::BFloat16* p) { return {odd_of(bf16_pairs(p)), odd_of(bf16_pairs(p + 8))}; }

inline vf vload_bits(const float* p, uint32_t bits, float fill) {
  const uint32x4_t lo_bit = {1, 2, 4, 8}, hi_bit = {16, 32, 64, 128}, word = vdupq_n_u32(bits);
  const float32x4_t f = vdupq_n_f32(fill);
  return {vbslq_f32(vtstq_u32(word, lo_bit), vld1q_f32(p), f), vbslq_f32(vtstq_u32(word, hi_bit), vld1q_f32(p + 4), f)};
}

// All-ones lanes, and no movemask: first_lane tests for any lane across the vector first, and looks
// for which one only after a hit.
struct lanes {
  uint32x4_t lo, hi;
};
inline lanes nan_lanes(vf v) { return {vmvnq_u32(vceqq_f32(v.lo, v.lo)), vmvnq_u32(vceqq_f32(v.hi, v.hi))}; }
inline lanes equal_lanes(vf a, vf b) { return {vceqq_f32(a.lo, b.lo), vceqq_f32(a.hi, b.hi)}; }
inline lanes either(lanes a, lanes b) { return {vorrq_u32(a.lo, b.lo), vorrq_u32(a.hi, b.hi)}; }
inline int first_lane(lanes m) {
  if (vmaxvq_u32(vorrq_u32(m.lo, m.hi)) == 0) return -1;
  uint32_t bits[8];
  vst1q_u32(bits, m.lo);
  vst1q_u32(bits + 4, m.hi);
  int lane = 0;
  while (!bits[lane]) ++lane;
  return lane;
}

#endif

// exp(x) for x <= 88 as 2^n * 2^f, f in [-0.5, 0.5], 2^f by its degree-6 Taylor polynomial. Relative
// error under 1e-6 on [-10, 0], up to 4e-6 towards -87 (from rounding x * log2(e) to float): tiny
// terms of a softmax. x is clamped at -87 so 2^n stays a normal number; exp(-87) is ~1.6e-38, which a
// softmax sum does not see. The same operations at every level, so every level computes the same values.
inline vf vexp(vf x) {
  x = vmax(x, vset1(-87.0f));
  const vf t = vmul(x, vset1(1.44269504088896341f));
  const vf n = vround(t);
  const vf f = vsub(t, n);
  vf p = vset1(1.5403530393381610e-4f);
  p = vfma(p, f, vset1(1.3333558146428443e-3f));
  p = vfma(p, f, vset1(9.6181291076284772e-3f));
  p = vfma(p, f, vset1(5.5504108664821580e-2f));
  p = vfma(p, f, vset1(2.4022650695910071e-1f));
  p = vfma(p, f, vset1(6.9314718055994531e-1f));
  p = vfma(p, f, vset1(1.0f));
  return vmul(p, vpow2i(n));
}

}  // namespace
}  // namespace tokenloom::simd

#endif  // any SIMD level
