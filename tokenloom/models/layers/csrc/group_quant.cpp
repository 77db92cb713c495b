// Group-quantized weight x activation products for steps of a few rows (decode): 4- and 5-bit codes x
// int8 activations on AVX-512 VNNI, 8-bit codes x float activations; and the dequantization that larger
// steps multiply with a dense GEMM.
//
// Single-stream decode reads every weight once per token, so it is bound by memory bandwidth: the
// format has to be small (5 bits a weight for int4 here: 4-bit codes, an fp16 scale and minimum per group
// of 32; 6 for int5) and the arithmetic has to keep up with the bytes. Activations are quantized to int8 per group of
// 32 on the fly (as llama.cpp's Q4_1 x Q8_1), so 64 weights cost one `vpdpbusd`; the group scales are
// applied in float per lane. torch's `_weight_int4pack_mm_for_cpu` widens every weight to float instead.
//
// Layout, built by gq_pack (weight ~= code * d + m, code in 0..15, 0..31 with 5 bits, 0..255 with 8):
//   codes  uint8 [N, K / 2]: per chunk of 64 inputs (two groups), 32 bytes; byte p holds the code of
//          vector position p in its low nibble and of position p + 32 in its high nibble.
//          8 bits: uint8 [N, K], per chunk 64 bytes, byte p the code of vector position p.
//   d      fp16  [N, K / 64, 2]: per chunk the scales (d0, d1) of its two groups.
//   m      fp16  [N, K / 32]: per group its minimum.
//   high   uint8 [N, K / 8] (5 bits only): per chunk 64 bits, bit b the fifth bit of vector position b.
// "Vector position" b holds input 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4 of the chunk: 32-bit lanes
// alternate between the two groups, so one broadcast pair (d0, d1) scales all 16 lanes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_group.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TOKENLOOM_GQ_AVX512 1
#endif

namespace {

constexpr int64_t kChunk = 64;
constexpr int64_t kMaxRows = 8;

// Input index (within its chunk) of vector position b.
inline int64_t chunk_input(int64_t b) { return 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4; }

// Activations of one row, quantized per group of 32, in vector order.
struct QuantizedRow {
  std::vector<int8_t> q;     // [chunks * 64]
  std::vector<float> scale;  // [chunks * 16]: lane-wise group scale (d0, d1, d0, d1, ...)
  std::vector<float> sum;    // [groups]: scale * sum(q) of each group (what a minimum multiplies)
};

#if defined(TOKENLOOM_GQ_AVX512) && defined(__AVX512VBMI__)
// chunk_input as a byte permutation: vector position b takes natural input chunk_input(b).
alignas(64) constexpr uint8_t kVectorOrder[kChunk] = {
    0,  1,  2,  3,  32, 33, 34, 35, 4,  5,  6,  7,  36, 37, 38, 39, 8,  9,  10, 11, 40, 41,
    42, 43, 12, 13, 14, 15, 44, 45, 46, 47, 16, 17, 18, 19, 48, 49, 50, 51, 20, 21, 22, 23,
    52, 53, 54, 55, 24, 25, 26, 27, 56, 57, 58, 59, 28, 29, 30, 31, 60, 61, 62, 63};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One chunk of 64 activations, quantized per group of 32 exactly as quantize_group32 does (float products,
// round to nearest even), written in vector order. Returns false for types it does not load.
template <typename T>
bool quantize_chunk_avx512(const T* x, int8_t* q, float d[2], float s[2]) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, c10::BFloat16> && !std::is_same_v<T, c10::Half>) {
    return false;
  } else {
    __m128i bytes[4];
    for (int g = 0; g < 2; ++g) {
      const __m512 a = load16(x + 32 * g), b = load16(x + 32 * g + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      d[g] = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
      s[g] = d[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
      bytes[2 * g] = _mm512_cvtepi32_epi8(qa);
      bytes[2 * g + 1] = _mm512_cvtepi32_epi8(qb);
    }
    __m512i natural = _mm512_castsi128_si512(bytes[0]);
    natural = _mm512_inserti32x4(natural, bytes[1], 1);
    natural = _mm512_inserti32x4(natural, bytes[2], 2);
    natural = _mm512_inserti32x4(natural, bytes[3], 3);
    _mm512_storeu_si512(q, _mm512_permutexvar_epi8(_mm512_load_si512(kVectorOrder), natural));
    return true;
  }
}
#endif

template <typename T>
void quantize_row(const T* x, int64_t k, QuantizedRow& out) {
  const int64_t chunks = k / kChunk;
  out.q.resize(chunks * kChunk);
  out.scale.resize(chunks * 16);
  out.sum.resize(chunks * 2);
  for (int64_t c = 0; c < chunks; ++c) {
    float d[2], s[2];
#if defined(TOKENLOOM_GQ_AVX512) && defined(__AVX512VBMI__)
    if (quantize_chunk_avx512(x + c * kChunk, out.q.data() + c * kChunk, d, s)) {
      for (int lane = 0; lane < 16; ++lane) out.scale[c * 16 + lane] = d[lane % 2];
      out.sum[c * 2] = s[0];
      out.sum[c * 2 + 1] = s[1];
      continue;
    }
#endif
    int8_t codes[kChunk];
    for (int g = 0; g < 2; ++g) d[g] = tokenloom::quantize_group32(x + c * kChunk + 32 * g, codes + 32 * g, s[g]);
    for (int64_t b = 0; b < kChunk; ++b) out.q[c * kChunk + b] = codes[chunk_input(b)];
    for (int lane = 0; lane < 16; ++lane) out.scale[c * 16 + lane] = d[lane % 2];
    out.sum[c * 2] = s[0];
    out.sum[c * 2 + 1] = s[1];
  }
}

// Activations of one row in float32 and vector order, for 8-bit weights: those are the accurate format
// (weight-only: the activations are not rounded), and at a byte a weight the product is still bound by
// reading the weights.
struct FloatRow {
  std::vector<float> x;    // [chunks * 64]
  std::vector<float> sum;  // [groups]: sum of each group (what a minimum multiplies)
};

template <typename T>
void float_row(const T* x, int64_t k, FloatRow& out) {
  const int64_t chunks = k / kChunk;
  out.x.resize(chunks * kChunk);
  out.sum.assign(chunks * 2, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t b = 0; b < kChunk; ++b) {
      const int64_t i = chunk_input(b);
      const float v = static_cast<float>(x[c * kChunk + i]);
      out.x[c * kChunk + b] = v;
      out.sum[c * 2 + i / 32] += v;
    }
}

// Sum over groups of minimum * (scale * sum of codes): the part of each output the minimums add.
inline float min_term(const c10::Half* m, const float* sums, int64_t groups) {
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) total += static_cast<float>(m[g]) * sums[g];
  return total;
}

#ifdef TOKENLOOM_GQ_AVX512
// 32 bytes of nibbles → 64 codes: the bytes loaded into both halves, the upper half shifted down by 4,
// then masked. Decode of a few rows is bound by instructions per chunk (one core does ~17 GB/s of 4-bit
// weights, two ~34), so this is three instructions rather than five.
inline __m512i load_codes(const uint8_t* p) {
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), _mm512_set1_epi8(0x0F));
}

inline __m512 load_scales(const c10::Half* d) {
  int32_t pair;
  std::memcpy(&pair, d, 4);
  return _mm512_cvtph_ps(_mm256_set1_epi32(pair));
}

// The sums of four vectors: [sum(a), sum(b), sum(c), sum(d)], each in an order that does not depend on
// the other three (so one vector summed alone gives the same float).
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto halves = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(halves(a), halves(b)), _mm256_hadd_ps(halves(c), halves(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// One accumulator per activation row, chunks in order, the minimums last, then reduce4: the same
// arithmetic, in the same order, as dot_rows4, so an output does not depend on which of the two
// computed it (nor, therefore, on how many rows the step has).
template <int M, int Bits>
void dot_rows(const uint8_t* codes, const uint8_t* high, const c10::Half* d, const c10::Half* m,
              const QuantizedRow* xs, int64_t chunks, float* out) {
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  const __m512i sixteen = _mm512_set1_epi8(16);
  for (int64_t c = 0; c < chunks; ++c) {
    if ((c & 1) == 0)  // the codes of the row four ahead (rows are chunks * 32 bytes apart)
      _mm_prefetch(reinterpret_cast<const char*>(codes + 4 * chunks * 32 + c * 32), _MM_HINT_T0);
    __m512i w = load_codes(codes + c * 32);
    if constexpr (Bits == 5) {
      uint64_t bits;
      std::memcpy(&bits, high + c * 8, 8);
      w = _mm512_or_si512(w, _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), sixteen));
    }
    const __m512 scales = load_scales(d + c * 2);
    for (int r = 0; r < M; ++r) {
      const __m512i dot = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(xs[r].q.data() + c * kChunk));
      const __m512 scale = _mm512_mul_ps(scales, _mm512_loadu_ps(xs[r].scale.data() + c * 16));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
    }
  }
  // The minimums' part, 16 groups at a time, folded into the same horizontal sum.
  const int64_t groups = chunks * 2;
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m + g));
    for (int r = 0; r < M; ++r)
      acc[r] = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(mask, xs[r].sum.data() + g), acc[r]);
  }
  for (int r = 0; r < M; ++r) out[r] = _mm_cvtss_f32(reduce4(acc[r], acc[r], acc[r], acc[r]));
}
#endif

#ifdef TOKENLOOM_GQ_AVX512
// dot_rows for four consecutive weight rows at once (one or two activation rows: single-stream decode).
// Per row of weights, dot_rows spends as much on its ending (the horizontal sum, the minimums) as on
// ten chunks of 64; here each activation chunk is loaded once for four rows, the four rows' sums are
// reduced together, and four independent accumulators per activation row keep the FMA unit busy.
// 4-bit LM head of gemma-3-270m, one row, 2 threads: 3.0-3.2 -> 2.85 ms.
template <int M, int Bits>
void dot_rows4(const uint8_t* codes, int64_t row_bytes, const uint8_t* high, const c10::Half* d, const c10::Half* m,
               const QuantizedRow* xs, int64_t chunks, float (*out)[kMaxRows]) {
  __m512 acc[4][M];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  const __m512i sixteen = _mm512_set1_epi8(16);
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i xq[M];
    __m512 xscale[M];
    for (int r = 0; r < M; ++r) {
      xq[r] = _mm512_loadu_si512(xs[r].q.data() + c * kChunk);
      xscale[r] = _mm512_loadu_ps(xs[r].scale.data() + c * 16);
    }
    // Software prefetch of the same chunk two groups of rows ahead (a 64-byte line holds two chunks of
    // codes): the hardware prefetchers ramp up on each of the many short streams of a call, and in a
    // decode step, where every matrix streams from memory once, this was 7-10% of the products' time.
    if ((c & 1) == 0)
      for (int i = 8; i < 12; ++i) _mm_prefetch(reinterpret_cast<const char*>(codes + i * row_bytes + c * 32), _MM_HINT_T0);
    for (int i = 0; i < 4; ++i) {
      __m512i w = load_codes(codes + i * row_bytes + c * 32);
      if constexpr (Bits == 5) {
        uint64_t bits;
        std::memcpy(&bits, high + i * (chunks * 8) + c * 8, 8);
        w = _mm512_or_si512(w, _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), sixteen));
      }
      const __m512 scales = load_scales(d + i * chunks * 2 + c * 2);
      for (int r = 0; r < M; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(zero, w, xq[r]);
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scales, xscale[r]), acc[i][r]);
      }
    }
  }
  const int64_t groups = chunks * 2;
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (groups - g)) - 1);
    __m512 sums[M];
    for (int r = 0; r < M; ++r) sums[r] = _mm512_maskz_loadu_ps(mask, xs[r].sum.data() + g);
    for (int i = 0; i < 4; ++i) {
      const __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m + i * groups + g));
      for (int r = 0; r < M; ++r) acc[i][r] = _mm512_fmadd_ps(mins, sums[r], acc[i][r]);
    }
  }
  for (int r = 0; r < M; ++r) {
    alignas(16) float total[4];
    _mm_store_ps(total, reduce4(acc[0][r], acc[1][r], acc[2][r], acc[3][r]));
    for (int i = 0; i < 4; ++i) out[i][r] = total[i];
  }
}
#endif

#ifdef TOKENLOOM_GQ_AVX512
// 8-bit codes x float activations. Float lane e of a 16-code quarter holds vector position 16q + e, of
// group (e / 4) % 2, so one blended pair of scales serves every quarter of a chunk.
template <int M>
void dot_rows_float(const uint8_t* codes, const c10::Half* d, const c10::Half* m, const FloatRow* xs, int64_t chunks,
                    float* out) {
  __m512 acc[M][2];
  for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512 scales = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(static_cast<float>(d[c * 2])),
                                               _mm512_set1_ps(static_cast<float>(d[c * 2 + 1])));
    _mm_prefetch(reinterpret_cast<const char*>(codes + 4 * chunks * kChunk + c * kChunk), _MM_HINT_T0);
    __m512 w[4];
    for (int q = 0; q < 4; ++q)
      w[q] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c * kChunk + 16 * q))));
    for (int r = 0; r < M; ++r) {
      const float* x = xs[r].x.data() + c * kChunk;
      __m512 t0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(x));
      __m512 t1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(x + 16));
      t0 = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(x + 32), t0);
      t1 = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(x + 48), t1);
      acc[r][c & 1] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), scales, acc[r][c & 1]);
    }
  }
  for (int r = 0; r < M; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + min_term(m, xs[r].sum.data(), chunks * 2);
}
#endif

void dot_rows_float_any(const uint8_t* codes, const c10::Half* d, const c10::Half* m, const FloatRow* xs, int rows,
                        int64_t chunks, float* out) {
#ifdef TOKENLOOM_GQ_AVX512
  switch (rows) {
    case 1: return dot_rows_float<1>(codes, d, m, xs, chunks, out);
    case 2: return dot_rows_float<2>(codes, d, m, xs, chunks, out);
    case 3: return dot_rows_float<3>(codes, d, m, xs, chunks, out);
    case 4: return dot_rows_float<4>(codes, d, m, xs, chunks, out);
    case 5: return dot_rows_float<5>(codes, d, m, xs, chunks, out);
    case 6: return dot_rows_float<6>(codes, d, m, xs, chunks, out);
    case 7: return dot_rows_float<7>(codes, d, m, xs, chunks, out);
    case 8: return dot_rows_float<8>(codes, d, m, xs, chunks, out);
    default: break;
  }
#endif
  for (int r = 0; r < rows; ++r) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t b = 0; b < kChunk; ++b)
        total += codes[c * kChunk + b] * static_cast<float>(d[c * 2 + (b / 4) % 2]) * xs[r].x[c * kChunk + b];
    out[r] = total + min_term(m, xs[r].sum.data(), chunks * 2);
  }
}

// Portable path: the same quantized arithmetic, one lane at a time.
// The code of vector position b of chunk c.
inline int code_at(const uint8_t* codes, const uint8_t* high, int bits, int64_t c, int64_t b) {
  if (bits == 8) return codes[c * kChunk + b];
  const uint8_t byte = codes[c * 32 + b % 32];
  int code = b < 32 ? (byte & 0x0F) : (byte >> 4);
  if (high) code |= ((high[c * 8 + b / 8] >> (b % 8)) & 1) << 4;
  return code;
}

void dot_rows_scalar(const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d, const c10::Half* m,
                     const QuantizedRow* xs, int rows, int64_t chunks, float* out) {
  for (int r = 0; r < rows; ++r) {
    const QuantizedRow& x = xs[r];
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      for (int lane = 0; lane < 16; ++lane) {
        int32_t dot = 0;
        for (int j = 0; j < 4; ++j) {
          const int64_t b = 4 * lane + j;
          dot += code_at(codes, high, bits, c, b) * x.q[c * kChunk + b];
        }
        total += static_cast<float>(dot) * static_cast<float>(d[c * 2 + lane % 2]) * x.scale[c * 16 + lane];
      }
    }
    out[r] = total + min_term(m, x.sum.data(), chunks * 2);
  }
}

void dot_rows_any(const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d, const c10::Half* m,
                  const QuantizedRow* xs, int rows, int64_t chunks, float* out) {
#ifdef TOKENLOOM_GQ_AVX512
#define TOKENLOOM_GQ_CASE(R)                                                         \
  case R:                                                                            \
    return high ? dot_rows<R, 5>(codes, high, d, m, xs, chunks, out)                 \
                : dot_rows<R, 4>(codes, high, d, m, xs, chunks, out);
  switch (rows) {
    TOKENLOOM_GQ_CASE(1)
    TOKENLOOM_GQ_CASE(2)
    TOKENLOOM_GQ_CASE(3)
    TOKENLOOM_GQ_CASE(4)
    TOKENLOOM_GQ_CASE(5)
    TOKENLOOM_GQ_CASE(6)
    TOKENLOOM_GQ_CASE(7)
    TOKENLOOM_GQ_CASE(8)
    default: break;
  }
#undef TOKENLOOM_GQ_CASE
#endif
  dot_rows_scalar(codes, high, bits, d, m, xs, rows, chunks, out);
}

template <typename T, typename O>
void gq_linear_kernel(const T* x, const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d,
                      const c10::Half* m, const float* bias, O* out, int64_t rows, int64_t n, int64_t k) {
  const int64_t chunks = k / kChunk;
  const int64_t row_bytes = bits == 8 ? k : k / 2;
  std::vector<QuantizedRow> xs(bits == 8 ? 0 : rows);
  std::vector<FloatRow> fs(bits == 8 ? rows : 0);
  for (int64_t m = 0; m < rows; ++m) {
    if (bits == 8)
      float_row(x + m * k, k, fs[m]);
    else
      quantize_row(x + m * k, k, xs[m]);
  }
  // Enough outputs per task that the threads' fork/join is small against the bytes each one reads.
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float result[kMaxRows];
    int64_t j = begin;
#ifdef TOKENLOOM_GQ_AVX512
    if (bits != 8 && rows <= 2) {
      float four[4][kMaxRows];
      for (; j + 4 <= end; j += 4) {
        const uint8_t* hj = high ? high + j * (k / 8) : nullptr;
        if (rows == 1)
          high ? dot_rows4<1, 5>(codes + j * row_bytes, row_bytes, hj, d + j * chunks * 2, m + j * chunks * 2,
                                 xs.data(), chunks, four)
               : dot_rows4<1, 4>(codes + j * row_bytes, row_bytes, hj, d + j * chunks * 2, m + j * chunks * 2,
                                 xs.data(), chunks, four);
        else
          high ? dot_rows4<2, 5>(codes + j * row_bytes, row_bytes, hj, d + j * chunks * 2, m + j * chunks * 2,
                                 xs.data(), chunks, four)
               : dot_rows4<2, 4>(codes + j * row_bytes, row_bytes, hj, d + j * chunks * 2, m + j * chunks * 2,
                                 xs.data(), chunks, four);
        for (int i = 0; i < 4; ++i) {
          const float b = bias ? bias[j + i] : 0.f;
          for (int64_t r = 0; r < rows; ++r) out[r * n + j + i] = static_cast<O>(four[i][r] + b);
        }
      }
    }
#endif
    for (; j < end; ++j) {
      if (bits == 8)
        dot_rows_float_any(codes + j * row_bytes, d + j * chunks * 2, m + j * chunks * 2, fs.data(),
                           static_cast<int>(rows), chunks, result);
      else
        dot_rows_any(codes + j * row_bytes, high ? high + j * (k / 8) : nullptr, bits, d + j * chunks * 2,
                     m + j * chunks * 2, xs.data(), static_cast<int>(rows), chunks, result);
      const float b = bias ? bias[j] : 0.f;
      for (int64_t m = 0; m < rows; ++m) out[m * n + j] = static_cast<O>(result[m] + b);
    }
  });
}

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

#ifdef TOKENLOOM_GQ_AVX512
// fit_group on two vectors of 16: the same candidates and arithmetic per weight; the sums are taken in a
// tree, so a near-tie between two candidates can go the other way (the fit's error is the same to float
// rounding). With rows widened one at a time, a 262k x 640 bf16 LM head packs at 4 bits in 0.33 s (was 1.23 s).
void fit_group_avx512(const float* w, float levels, uint8_t* codes, float& d_out, float& m_out) {
  const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
  const float low = _mm512_reduce_min_ps(_mm512_min_ps(w0, w1));
  const float high = _mm512_reduce_max_ps(_mm512_max_ps(w0, w1));
  const float span = high - low;
  const float sw = _mm512_reduce_add_ps(_mm512_add_ps(w0, w1));
  const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(levels);
  auto codes_of = [&](__m512 x, __m512 lo, __m512 inv) {
    const __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(x, lo), inv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_min_ps(top, _mm512_max_ps(zero, c));
  };
  float best_err = INFINITY, best_d = 0.f, best_m = low;
  for (const auto& clip : kClips) {
    const float lo = low + clip[0] * span, hi = high - clip[1] * span;
    const __m512 vlo = _mm512_set1_ps(lo), inv = _mm512_set1_ps(hi > lo ? levels / (hi - lo) : 0.f);
    const __m512 c0 = codes_of(w0, vlo, inv), c1 = codes_of(w1, vlo, inv);
    const float sc = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
    const float scc = _mm512_reduce_add_ps(_mm512_fmadd_ps(c0, c0, _mm512_mul_ps(c1, c1)));
    const float scw = _mm512_reduce_add_ps(_mm512_fmadd_ps(c0, w0, _mm512_mul_ps(c1, w1)));
    const float det = 32.f * scc - sc * sc;
    const float d = round_half(det > 0.f ? (32.f * scw - sc * sw) / det : 0.f);
    const float m = round_half((sw - d * sc) / 32.f);
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    const __m512 e0 = _mm512_sub_ps(_mm512_fmadd_ps(c0, vd, vm), w0), e1 = _mm512_sub_ps(_mm512_fmadd_ps(c1, vd, vm), w1);
    const float err = _mm512_reduce_add_ps(_mm512_fmadd_ps(e0, e0, _mm512_mul_ps(e1, e1)));
    if (err < best_err) {
      best_err = err;
      best_d = d;
      best_m = m;
    }
  }
  // Codes against the scale and minimum actually stored.
  const __m512 vm = _mm512_set1_ps(best_m), inv = _mm512_set1_ps(best_d > 0.f ? 1.f / best_d : 0.f);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(codes_of(w0, vm, inv))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16),
                   _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(codes_of(w1, vm, inv))));
  d_out = best_d;
  m_out = best_m;
}
#endif

}  // namespace

bool gq_linear_native() {
#ifdef TOKENLOOM_GQ_AVX512
  return true;
#else
  return false;
#endif
}

namespace {

// Checks a packed weight against K and returns its width in bits (4, 5 or 8).
int check_packed(const char* op, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                 const at::Tensor& high, int64_t k) {
  TORCH_CHECK(codes.device().is_cpu() && d.device().is_cpu() && m.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(k % kChunk == 0, op, ": K must be a multiple of 64, got ", k);
  const int64_t n = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && (codes.size(1) == k / 2 || codes.size(1) == k),
              op, ": codes must be uint8 [N, K / 2] (4 or 5 bits) or [N, K] (8 bits)");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 3 && d.size(0) == n && d.size(1) == k / kChunk &&
                  d.size(2) == 2,
              op, ": d must be float16 [N, K / 64, 2]");
  TORCH_CHECK(m.scalar_type() == at::kHalf && m.dim() == 2 && m.size(0) == n && m.size(1) == k / 32,
              op, ": m must be float16 [N, K / 32]");
  const bool eight = codes.size(1) == k;
  if (high.defined()) {
    TORCH_CHECK(!eight, op, ": 8-bit codes take no high bits");
    TORCH_CHECK(high.scalar_type() == at::kByte && high.dim() == 2 && high.size(0) == n && high.size(1) == k / 8,
                op, ": high must be uint8 [N, K / 8]");
  }
  return eight ? 8 : high.defined() ? 5 : 4;
}

at::Tensor optional_contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Weights of one row in natural input order: out[i] = code(i) * d(group) + m(group).
template <typename T>
void dequant_row(const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d, const c10::Half* m,
                 int64_t chunks, T* out) {
#if defined(TOKENLOOM_GQ_AVX512) && defined(__AVX512VBMI__)
  // Vector position of each natural input (the inverse of chunk_input), for a byte permute.
  alignas(64) static const uint8_t kInverse[kChunk] = {
      0,  1,  2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 32, 33, 34, 35, 40, 41,
      42, 43, 48, 49, 50, 51, 56, 57, 58, 59, 4,  5,  6,  7,  12, 13, 14, 15, 20, 21, 22, 23,
      28, 29, 30, 31, 36, 37, 38, 39, 44, 45, 46, 47, 52, 53, 54, 55, 60, 61, 62, 63};
  const __m512i inverse = _mm512_load_si512(kInverse);
  const __m512i sixteen = _mm512_set1_epi8(16);
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i w;
    if (bits == 8) {
      w = _mm512_loadu_si512(codes + c * kChunk);
    } else {
      w = load_codes(codes + c * 32);
      if (bits == 5) {
        uint64_t hb;
        std::memcpy(&hb, high + c * 8, 8);
        w = _mm512_or_si512(w, _mm512_maskz_mov_epi8(_cvtu64_mask64(hb), sixteen));
      }
    }
    const __m512i natural = _mm512_permutexvar_epi8(inverse, w);
    for (int q = 0; q < 4; ++q) {  // 16 inputs at a time; the first two quarters are group 0
      const int g = q / 2;
      __m128i part;
      switch (q) {
        case 0: part = _mm512_extracti32x4_epi32(natural, 0); break;
        case 1: part = _mm512_extracti32x4_epi32(natural, 1); break;
        case 2: part = _mm512_extracti32x4_epi32(natural, 2); break;
        default: part = _mm512_extracti32x4_epi32(natural, 3); break;
      }
      const __m512 values = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part)),
                                            _mm512_set1_ps(static_cast<float>(d[c * 2 + g])),
                                            _mm512_set1_ps(static_cast<float>(m[c * 2 + g])));
      T* dst = out + c * kChunk + 16 * q;
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(dst, values);
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(values));
      } else {
        for (int i = 0; i < 16; ++i) dst[i] = static_cast<T>(values[i]);
      }
    }
  }
#else
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t b = 0; b < kChunk; ++b) {
      const int64_t i = chunk_input(b);
      out[c * kChunk + i] = static_cast<T>(code_at(codes, high, bits, c, b) * static_cast<float>(d[c * 2 + i / 32]) +
                                           static_cast<float>(m[c * 2 + i / 32]));
    }
#endif
}

}  // namespace

// x [M, K] float32/bfloat16/float16 with M <= 8 and K % 64 == 0; codes uint8 [N, K / 2] (or [N, K] for 8
// bits); d float16 [N, K / 64, 2]; m float16 [N, K / 32]; high uint8 [N, K / 8] (5 bits) or None; bias [N]
// or None. Returns [M, N] in x's dtype, or in float32 with float_out (logits: no rounding, no conversion).
at::Tensor gq_linear(at::Tensor x, at::Tensor codes, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high,
                     c10::optional<at::Tensor> bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu(), "gq_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "gq_linear: x must be [rows <= 8, K]");
  const int64_t k = x.size(1), n = codes.size(0);
  at::Tensor h = optional_contiguous(high);
  const int bits = check_packed("gq_linear", codes, d, m, h, k);
  codes = codes.contiguous();
  d = d.contiguous();
  m = m.contiguous();
  x = x.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n, "gq_linear: bias must have N elements");
  }
  auto out = at::empty({x.size(0), n}, float_out ? x.options().dtype(at::kFloat) : x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gq_linear", [&] {
    const uint8_t* hp = h.defined() ? h.data_ptr<uint8_t>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    if (float_out)
      gq_linear_kernel<scalar_t, float>(x.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), hp, bits,
                                        d.data_ptr<c10::Half>(), m.data_ptr<c10::Half>(), bp, out.data_ptr<float>(),
                                        x.size(0), n, k);
    else
      gq_linear_kernel<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), hp, bits,
                                           d.data_ptr<c10::Half>(), m.data_ptr<c10::Half>(), bp,
                                           out.data_ptr<scalar_t>(), x.size(0), n, k);
  });
  return out;
}

// The [N, K] matrix a packed weight stands for, in `dtype` (float32, bfloat16 or float16): what steps too
// large for gq_linear multiply with a dense GEMM.
at::Tensor gq_dequant(at::Tensor codes, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high,
                      at::ScalarType dtype) {
  const int64_t n = codes.size(0), k = d.size(1) * kChunk;
  at::Tensor h = optional_contiguous(high);
  const int bits = check_packed("gq_dequant", codes, d, m, h, k);
  codes = codes.contiguous();
  d = d.contiguous();
  m = m.contiguous();
  const int64_t row_bytes = bits == 8 ? k : k / 2;
  auto out = at::empty({n, k}, codes.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gq_dequant", [&] {
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const uint8_t* hp = h.defined() ? h.data_ptr<uint8_t>() : nullptr;
    const c10::Half* dp = d.data_ptr<c10::Half>();
    const c10::Half* mp = m.data_ptr<c10::Half>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / k), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        dequant_row<scalar_t>(cp + j * row_bytes, hp ? hp + j * (k / 8) : nullptr, bits, dp + j * (k / 32),
                              mp + j * (k / 32), k / kChunk, op + j * k);
    });
  });
  return out;
}

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
#ifdef TOKENLOOM_GQ_AVX512
          fit_group_avx512(wc + 32 * g, levels, natural + 32 * g, scale[g], low[g]);
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
