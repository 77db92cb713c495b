// The integer part of gq_tiles.cpp's product, per level of isa.h: the sums over one group of 32 inputs of
// code x int8 activation for the rows of a tile, kLanes rows (one `part`) at a time:
//   avx512  16 rows in one pass, vpdpbusd on broadcast activations, two chains per row;
//   avx2    two passes of 8 rows (a 32-byte half of each 64-byte block, the other half read from L1 on
//           the second); vpmaddubsw summed as int16 over the whole group (at most 8 * 2 * 15 * 127 = 30480),
//           one vpmaddwd per group;
//   neon    four passes of 4 rows, sdot by lane (the activations' 32-bit lane picked in the instruction).
// kTileRows is how many activation rows a pass keeps in registers.
//
// 5-bit tiles add the fifth bits (gq_tiles.cpp: high, 16 bytes a block): the first 8 bytes a bit per byte of
// the block for its low-nibble code, the next 8 for its high-nibble code (bit i of each 64-bit word: byte i).
// avx2 sums at most 8 products of a 5-bit code per int16 lane (2 * 4 * 31 * 127 = 31496), so it widens a
// group's sums to int32 after two blocks. neon has no 5-bit tiles (gq_tiles_high_supported()).
#pragma once

#include <cstdint>
#include <cstring>

#include "gq_simd.h"

namespace tokenloom::gq {
namespace {

constexpr int64_t kTileBlock = 64;      // bytes of a tile for 8 inputs (16 rows x 8 codes)
constexpr int64_t kTileHighBlock = 16;  // bytes of fifth bits for the same (5 bits only)

#ifdef TOKENLOOM_GQ_VECTOR

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(TOKENLOOM_AVX512)

constexpr int kTileRows = 8;

constexpr bool kTileHighBits = true;

// Sums of the group's 4 blocks at `blocks` against x[r] (the row's 32 activations of the group), as floats.
template <int M, int Bits = 4>
inline void group_dots(const uint8_t* blocks, const uint8_t* high, int /*part*/, const int8_t* const* x, vf* dots) {
  __m512i lo_sum[M], hi_sum[M];  // two integer chains per row: half the dependent latency
  for (int r = 0; r < M; ++r) lo_sum[r] = hi_sum[r] = _mm512_setzero_si512();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int b = 0; b < 4; ++b) {
    const __m512i v = _mm512_loadu_si512(blocks + b * kTileBlock);
    __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    if constexpr (Bits == 5) {
      uint64_t lo_bits, hi_bits;
      std::memcpy(&lo_bits, high + b * kTileHighBlock, 8);
      std::memcpy(&hi_bits, high + b * kTileHighBlock + 8, 8);
      lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(_cvtu64_mask64(lo_bits), _mm512_set1_epi8(16)));
      hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(_cvtu64_mask64(hi_bits), _mm512_set1_epi8(16)));
    }
    for (int r = 0; r < M; ++r) {
      lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, _mm512_set1_epi32(four_bytes(x[r] + 8 * b)));
      hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, _mm512_set1_epi32(four_bytes(x[r] + 8 * b + 4)));
    }
  }
  for (int r = 0; r < M; ++r) dots[r] = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum[r], hi_sum[r]));
}

#elif defined(TOKENLOOM_AVX2)

constexpr int kTileRows = 4;  // 16 registers: M int16 sums + M accumulators + the block's codes
constexpr bool kTileHighBits = true;

// 16 where bit i of the 32-bit word at p is set (byte i of the vector), else 0: a part's fifth bits.
inline __m256i fifth_bits32(const uint8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                          3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(word), spread), select);
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, select), _mm256_set1_epi8(16));
}

// Block b's codes for part `part` (8 rows x 4 inputs each): inputs 8b..8b+3 in lo, 8b+4..8b+7 in hi.
template <int Bits>
inline void block_codes(const uint8_t* blocks, const uint8_t* high, int b, int part, __m256i& lo, __m256i& hi) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks + b * kTileBlock + 32 * part));
  lo = _mm256_and_si256(v, low);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  if constexpr (Bits == 5) {
    lo = _mm256_or_si256(lo, fifth_bits32(high + b * kTileHighBlock + 4 * part));
    hi = _mm256_or_si256(hi, fifth_bits32(high + b * kTileHighBlock + 8 + 4 * part));
  }
}

// Rows 8 * part .. 8 * part + 7: the 32-byte half `part` of each block.
template <int M, int Bits = 4>
inline void group_dots(const uint8_t* blocks, const uint8_t* high, int part, const int8_t* const* x, vf* dots) {
  __m256i sums[M], wide[M];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < M; ++r) sums[r] = wide[r] = _mm256_setzero_si256();
  for (int b = 0; b < 4; ++b) {
    __m256i lo, hi;
    block_codes<Bits>(blocks, high, b, part, lo, hi);
    for (int r = 0; r < M; ++r) {
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four_bytes(x[r] + 8 * b))),
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four_bytes(x[r] + 8 * b + 4))));
      sums[r] = _mm256_add_epi16(sums[r], pairs);
    }
    if (Bits == 5 && b == 1)
      for (int r = 0; r < M; ++r) {
        wide[r] = _mm256_madd_epi16(sums[r], ones);
        sums[r] = _mm256_setzero_si256();
      }
  }
  for (int r = 0; r < M; ++r) {
    const __m256i total = _mm256_madd_epi16(sums[r], ones);
    dots[r] = _mm256_cvtepi32_ps(Bits == 5 ? _mm256_add_epi32(wide[r], total) : total);
  }
}

#elif defined(TOKENLOOM_NEON)

constexpr int kTileRows = 4;
constexpr bool kTileHighBits = false;  // 4-bit tiles only

// Block B of a group, rows 4 * part .. 4 * part + 3: its inputs 8B..8B+3 are 32-bit lane 2 (B % 2) of the
// group's activation register B / 2, inputs 8B+4..8B+7 the next lane (lanes are immediates, hence B).
template <int B, int M>
inline void block_dots(const uint8_t* blocks, int part, const int8x16_t (*x)[2], int32x4_t* lo, int32x4_t* hi) {
  const uint8x16_t v = vld1q_u8(blocks + B * kTileBlock + 16 * part);
  const int8x16_t codes_lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
  const int8x16_t codes_hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
  for (int r = 0; r < M; ++r) {
    lo[r] = vdotq_laneq_s32(lo[r], codes_lo, x[r][B / 2], 2 * (B % 2));
    hi[r] = vdotq_laneq_s32(hi[r], codes_hi, x[r][B / 2], 2 * (B % 2) + 1);
  }
}

template <int M, int Bits = 4>
inline void group_dots(const uint8_t* blocks, const uint8_t* /*high*/, int part, const int8_t* const* x, vf* dots) {
  static_assert(Bits == 4, "5-bit tiles need avx2 or avx512");
  int8x16_t xv[M][2];
  int32x4_t lo[M], hi[M];
  for (int r = 0; r < M; ++r) {
    xv[r][0] = vld1q_s8(x[r]);
    xv[r][1] = vld1q_s8(x[r] + 16);
    lo[r] = hi[r] = vdupq_n_s32(0);
  }
  block_dots<0, M>(blocks, part, xv, lo, hi);
  block_dots<1, M>(blocks, part, xv, lo, hi);
  block_dots<2, M>(blocks, part, xv, lo, hi);
  block_dots<3, M>(blocks, part, xv, lo, hi);
  for (int r = 0; r < M; ++r) dots[r] = vcvtq_f32_s32(vaddq_s32(lo[r], hi[r]));
}

#endif

#endif  // TOKENLOOM_GQ_VECTOR

}  // namespace
}  // namespace tokenloom::gq
