// One chunk of the packed layout (gq_layout.h: 64 inputs, two groups of 32) per level of isa.h:
// its codes and its int8 activations in vector order, their lane-wise products, and the permutations
// between vector order and input order. A float lane of `dot` covers vector positions of one group only
// (lane i: group i % 2 at every level), so one vector of alternating scales (d0, d1, d0, d1, ...) scales it:
//   avx512  a chunk is one __m512i; lane i of vpdpbusd sums positions 4i..4i+3.
//   avx2    two __m256i, positions 0..31 and 32..63; vpmaddubsw of both halves, added as int16 (at most
//           2 * 2 * 31 * 127 = 15748), then vpmaddwd by ones: lane i sums positions 4i..4i+3 and 32+4i..32+4i+3.
//   neon    four int8x16_t of 16 positions; four sdot (codes <= 31 are int8 too): lane i sums positions
//           16j+4i..16j+4i+3 for j = 0..3.
#pragma once

#include "gq_simd.h"

#ifdef TOKENLOOM_GQ_VECTOR

namespace tokenloom::gq {
namespace {

#if defined(TOKENLOOM_AVX512)

// Vector position b takes input chunk_input(b) = 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4 ...
alignas(64) constexpr uint8_t kVectorOrder[64] = {
    0,  1,  2,  3,  32, 33, 34, 35, 4,  5,  6,  7,  36, 37, 38, 39, 8,  9,  10, 11, 40, 41,
    42, 43, 12, 13, 14, 15, 44, 45, 46, 47, 16, 17, 18, 19, 48, 49, 50, 51, 20, 21, 22, 23,
    52, 53, 54, 55, 24, 25, 26, 27, 56, 57, 58, 59, 28, 29, 30, 31, 60, 61, 62, 63};
// ... and input i is at vector position kInverse[i].
alignas(64) constexpr uint8_t kInverse[64] = {
    0,  1,  2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 32, 33, 34, 35, 40, 41,
    42, 43, 48, 49, 50, 51, 56, 57, 58, 59, 4,  5,  6,  7,  12, 13, 14, 15, 20, 21, 22, 23,
    28, 29, 30, 31, 36, 37, 38, 39, 44, 45, 46, 47, 52, 53, 54, 55, 60, 61, 62, 63};

using Chunk = __m512i;

inline Chunk load_chunk(const void* p) { return _mm512_loadu_si512(p); }

// 32 bytes of nibbles → 64 codes: the bytes loaded into both halves, the upper half shifted down by 4,
// then masked. Decode of a few rows is bound by instructions per chunk (one core does ~17 GB/s of 4-bit
// weights, two ~34), so this is three instructions rather than five. Bits == 5 adds the fifth bits at high.
template <int Bits>
inline Chunk load_codes(const uint8_t* codes, const uint8_t* high) {
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  __m512i w = _mm512_and_si512(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), _mm512_set1_epi8(0x0F));
  if constexpr (Bits == 5) {
    uint64_t bits;
    std::memcpy(&bits, high, 8);
    w = _mm512_or_si512(w, _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), _mm512_set1_epi8(16)));
  }
  return w;
}

inline vf dot(Chunk w, Chunk x) { return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x)); }

inline vf chunk_scales(const c10::Half* d) {
  int32_t pair;
  std::memcpy(&pair, d, 4);
  return _mm512_cvtph_ps(_mm256_set1_epi32(pair));
}

// 8 bits: the scales of float vector q of a chunk (lane e holds position kLanes * q + e, of group
// (e / 4) % 2), for even q and for odd q.
inline void float_scales(const c10::Half* d, vf& even, vf& odd) {
  even = odd = _mm512_mask_blend_ps(0xF0F0, vset1(static_cast<float>(d[0])), vset1(static_cast<float>(d[1])));
}

inline void natural_order(Chunk w, uint8_t* out) {
  _mm512_storeu_si512(out, _mm512_permutexvar_epi8(_mm512_load_si512(kInverse), w));
}
inline void vector_order(const int8_t* natural, int8_t* out) {
  _mm512_storeu_si512(out, _mm512_permutexvar_epi8(_mm512_load_si512(kVectorOrder), _mm512_loadu_si512(natural)));
}

#elif defined(TOKENLOOM_AVX2)

struct Chunk {
  __m256i lo, hi;  // vector positions 0..31, 32..63
};

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store32(void* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

inline Chunk load_chunk(const void* p) { return {load32(p), load32(static_cast<const uint8_t*>(p) + 32)}; }

// 16 where bit j % 8 of byte `spread` j (a byte of the fifth bits copied to 8 lanes) is set, else 0.
inline __m256i fifth_bits(__m256i bits, __m256i spread) {
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(bits, spread), select);
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, select), _mm256_set1_epi8(16));
}

// The low nibbles are positions 0..31, the high ones 32..63 (five instructions for 64 codes, against
// three on AVX-512, where the dot is one instruction instead of four).
template <int Bits>
inline Chunk load_codes(const uint8_t* codes, const uint8_t* high) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i v = load32(codes);
  Chunk w{_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)};
  if constexpr (Bits == 5) {
    int64_t word;
    std::memcpy(&word, high, 8);
    const __m256i bits = _mm256_set1_epi64x(word);  // byte j / 8 holds the bit of position j
    w.lo = _mm256_or_si256(w.lo, fifth_bits(bits, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                   2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)));
    w.hi = _mm256_or_si256(w.hi, fifth_bits(bits, _mm256_setr_epi8(4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                                                                   6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7)));
  }
  return w;
}

inline vf dot(const Chunk& w, const Chunk& x) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, x.lo), _mm256_maddubs_epi16(w.hi, x.hi));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

inline vf chunk_scales(const c10::Half* d) {
  int32_t pair;
  std::memcpy(&pair, d, 4);
  return _mm256_cvtph_ps(_mm_set1_epi32(pair));
}

inline void float_scales(const c10::Half* d, vf& even, vf& odd) {
  even = odd = _mm256_blend_ps(vset1(static_cast<float>(d[0])), vset1(static_cast<float>(d[1])), 0xF0);
}

// In 32-bit words of 4 inputs, lo holds inputs 0, 32, 4, 36, 8, 40, 12, 44 and hi 16, 48, ..., 28, 60:
// the even words of both, in order, are group 0; the odd ones group 1.
inline void natural_order(const Chunk& w, uint8_t* out) {
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i lo = _mm256_permutevar8x32_epi32(w.lo, split), hi = _mm256_permutevar8x32_epi32(w.hi, split);
  store32(out, _mm256_permute2x128_si256(lo, hi, 0x20));
  store32(out + 32, _mm256_permute2x128_si256(lo, hi, 0x31));
}
inline void vector_order(const int8_t* natural, int8_t* out) {
  const __m256i g0 = load32(natural), g1 = load32(natural + 32);
  const __m256i a = _mm256_unpacklo_epi32(g0, g1), b = _mm256_unpackhi_epi32(g0, g1);
  store32(out, _mm256_permute2x128_si256(a, b, 0x20));
  store32(out + 32, _mm256_permute2x128_si256(a, b, 0x31));
}

#elif defined(TOKENLOOM_NEON)

struct Chunk {
  int8x16_t v[4];  // vector positions 16j..16j+15
};

inline Chunk load_chunk(const void* p) {
  const int8_t* b = static_cast<const int8_t*>(p);
  return {{vld1q_s8(b), vld1q_s8(b + 16), vld1q_s8(b + 32), vld1q_s8(b + 48)}};
}

// The low nibbles of bytes 0..15 and 16..31 are positions 0..31, the high ones 32..63. Bits == 5: byte
// j / 8 of the 8 at `high` spread over 16 lanes by a table lookup, each lane testing its own bit.
template <int Bits>
inline Chunk load_codes(const uint8_t* codes, const uint8_t* high) {
  const uint8x16_t c0 = vld1q_u8(codes), c1 = vld1q_u8(codes + 16), mask = vdupq_n_u8(0x0F);
  uint8x16_t w[4] = {vandq_u8(c0, mask), vandq_u8(c1, mask), vshrq_n_u8(c0, 4), vshrq_n_u8(c1, 4)};
  if constexpr (Bits == 5) {
    const uint8x8_t raw = vld1_u8(high);
    const uint8x16_t bits = vcombine_u8(raw, raw);
    const uint8x16_t select = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t spread = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    for (int j = 0; j < 4; ++j) {
      const uint8x16_t bytes = vqtbl1q_u8(bits, vaddq_u8(spread, vdupq_n_u8(static_cast<uint8_t>(2 * j))));
      w[j] = vorrq_u8(w[j], vandq_u8(vtstq_u8(bytes, select), vdupq_n_u8(16)));
    }
  }
  return {{vreinterpretq_s8_u8(w[0]), vreinterpretq_s8_u8(w[1]), vreinterpretq_s8_u8(w[2]), vreinterpretq_s8_u8(w[3])}};
}

// Two chains of two sdot, so that they overlap.
inline vf dot(const Chunk& w, const Chunk& x) {
  const int32x4_t zero = vdupq_n_s32(0);
  const int32x4_t a = vdotq_s32(vdotq_s32(zero, w.v[0], x.v[0]), w.v[2], x.v[2]);
  const int32x4_t b = vdotq_s32(vdotq_s32(zero, w.v[1], x.v[1]), w.v[3], x.v[3]);
  return vcvtq_f32_s32(vaddq_s32(a, b));
}

inline vf chunk_scales(const c10::Half* d) {
  uint32_t pair;
  std::memcpy(&pair, d, 4);
  return vcvt_f32_f16(vreinterpret_f16_u32(vdup_n_u32(pair)));
}

// Float vector q holds positions 4q..4q+3: all of group q % 2.
inline void float_scales(const c10::Half* d, vf& even, vf& odd) {
  even = vset1(static_cast<float>(d[0]));
  odd = vset1(static_cast<float>(d[1]));
}

// In 32-bit words of 4 inputs, v[0] holds inputs 0, 32, 4, 36, v[1] 8, 40, 12, 44, v[2] 16, 48, 20, 52 and
// v[3] 24, 56, 28, 60: the even words are group 0, the odd ones group 1.
inline void natural_order(const Chunk& w, uint8_t* out) {
  uint32x4_t v[4];
  for (int j = 0; j < 4; ++j) v[j] = vreinterpretq_u32_s8(w.v[j]);
  vst1q_u8(out, vreinterpretq_u8_u32(vuzp1q_u32(v[0], v[1])));
  vst1q_u8(out + 16, vreinterpretq_u8_u32(vuzp1q_u32(v[2], v[3])));
  vst1q_u8(out + 32, vreinterpretq_u8_u32(vuzp2q_u32(v[0], v[1])));
  vst1q_u8(out + 48, vreinterpretq_u8_u32(vuzp2q_u32(v[2], v[3])));
}
inline void vector_order(const int8_t* natural, int8_t* out) {
  for (int h = 0; h < 2; ++h) {
    const uint32x4_t g0 = vreinterpretq_u32_s8(vld1q_s8(natural + 16 * h));
    const uint32x4_t g1 = vreinterpretq_u32_s8(vld1q_s8(natural + 32 + 16 * h));
    vst1q_s8(out + 32 * h, vreinterpretq_s8_u32(vzip1q_u32(g0, g1)));
    vst1q_s8(out + 32 * h + 16, vreinterpretq_s8_u32(vzip2q_u32(g0, g1)));
  }
}

#endif

}  // namespace
}  // namespace tokenloom::gq

#endif  // TOKENLOOM_GQ_VECTOR
