// Group-quantized weight x activation products for steps of a few rows (decode): 4- and 5-bit codes x
// int8 activations, 8-bit codes x float activations; and the dequantization that larger steps multiply
// with a dense GEMM.
//
// Single-stream decode reads every weight once per token, so it is bound by memory bandwidth: the
// format has to be small (5 bits a weight for int4 here: 4-bit codes, an fp16 scale and minimum per group
// of 32; 6 for int5) and the arithmetic has to keep up with the bytes. Activations are quantized to int8 per
// group of 32 on the fly (as llama.cpp's Q4_1 x Q8_1), so 64 weights cost one `vpdpbusd` on AVX-512 VNNI;
// the group scales are applied in float per lane. torch's `_weight_int4pack_mm_for_cpu` widens every
// weight to float instead.
//
// Levels (isa.h): the kernels are written once over the vectors of gq_simd.h and the chunk operations of
// gq_chunk.h (avx512: vpdpbusd; avx2: vpmaddubsw + vpmaddwd, as llama.cpp's AVX2 Q4_1 x Q8_1; neon: sdot).
// Each level sums in its own order, so results differ between levels in the last bits; within a level, an
// output does not depend on the other rows of the call. The portable level runs scalar loops, and
// gq_linear_native() says false there: the Python side then multiplies the dequantized matrix instead.
//
// Layout, built by gq_pack (weight ~= code * d + m, code in 0..15, 0..31 with 5 bits, 0..255 with 8):
//   codes  uint8 [N, K / 2]: per chunk of 64 inputs (two groups), 32 bytes; byte p holds the code of
//          vector position p in its low nibble and of position p + 32 in its high nibble.
//          8 bits: uint8 [N, K], per chunk 64 bytes, byte p the code of vector position p.
//   d      fp16  [N, K / 64, 2]: per chunk the scales (d0, d1) of its two groups.
//   m      fp16  [N, K / 32]: per group its minimum.
//   high   uint8 [N, K / 8] (5 bits only): per chunk 64 bits, bit b the fifth bit of vector position b.
// "Vector position" b holds input 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4 of the chunk: 32-bit lanes
// alternate between the two groups, so one broadcast pair (d0, d1) scales all lanes of a vector.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "gq_chunk.h"
#include "gq_simd.h"

namespace {

using namespace tokenloom::gq;

constexpr int64_t kChunk = 64;
constexpr int64_t kMaxRows = 8;

// Input index (within its chunk) of vector position b.
inline int64_t chunk_input(int64_t b) { return 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4; }

#ifndef TOKENLOOM_GQ_VECTOR
inline void vector_order(const int8_t* natural, int8_t* out) {
  for (int64_t b = 0; b < kChunk; ++b) out[b] = natural[chunk_input(b)];
}
#endif

// Activations of one row, quantized per group of 32, in vector order.
struct QuantizedRow {
  std::vector<int8_t> q;     // [chunks * 64]
  std::vector<float> scale;  // [chunks * 16]: lane-wise group scale (d0, d1, d0, d1, ...); a level reads kLanes
  std::vector<float> sum;    // [groups]: scale * sum(q) of each group (what a minimum multiplies)
};

template <typename T>
void quantize_row(const T* x, int64_t k, QuantizedRow& out) {
  const int64_t chunks = k / kChunk;
  out.q.resize(chunks * kChunk);
  out.scale.resize(chunks * 16);
  out.sum.resize(chunks * 2);
  for (int64_t c = 0; c < chunks; ++c) {
    int8_t natural[kChunk];
    float d[2];
    for (int g = 0; g < 2; ++g) d[g] = quantize32(x + c * kChunk + 32 * g, natural + 32 * g, out.sum[c * 2 + g]);
    vector_order(natural, out.q.data() + c * kChunk);
    for (int lane = 0; lane < 16; ++lane) out.scale[c * 16 + lane] = d[lane % 2];
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

#ifdef TOKENLOOM_GQ_VECTOR
// W consecutive weight rows (rows row_bytes apart) x M activation rows, into out[i][r]. One accumulator
// per (weight row, activation row), chunks in order, the minimums last, then vsum4: an output gets the
// same arithmetic in the same order whatever W and M are, so it does not depend on how many rows the step
// has nor on which call computed it.
//
// W = 4 serves one or two activation rows (single-stream decode). Per row of weights, W = 1 spends as much
// on its ending (the horizontal sum, the minimums) as on ten chunks of 64; with four rows each activation
// chunk serves four rows, the four rows' sums are reduced together, and four independent accumulators per
// activation row keep the FMA units busy. 4-bit LM head of gemma-3-270m, one row,
// 2 threads, AVX-512: 3.0-3.2 -> 2.85 ms.
template <int W, int M, int Bits>
void dot_rows(const uint8_t* codes, int64_t row_bytes, const uint8_t* high, const c10::Half* d, const c10::Half* m,
              const QuantizedRow* xs, int64_t chunks, float (*out)[kMaxRows]) {
  vf acc[W][M];
  for (int i = 0; i < W; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = vzero();
  // Rows four calls ahead with W = 1, two with W = 4 (a 64-byte line holds two chunks of codes).
  constexpr int kAhead = W == 1 ? 4 : 2 * W;
  for (int64_t c = 0; c < chunks; ++c) {
    // Software prefetch: the hardware prefetchers ramp up on each of the many short streams of a call,
    // and in a decode step, where every matrix streams from memory once, this was 7-10% of the products' time.
    if ((c & 1) == 0)
      for (int i = 0; i < W; ++i) prefetch(codes + (kAhead + i) * row_bytes + c * 32);
    for (int i = 0; i < W; ++i) {
      const Chunk w = load_codes<Bits>(codes + i * row_bytes + c * 32, Bits == 5 ? high + (i * chunks + c) * 8 : nullptr);
      const vf scales = chunk_scales(d + (i * chunks + c) * 2);
      for (int r = 0; r < M; ++r) {
        const vf scale = vmul(scales, vload(xs[r].scale.data() + c * 16));
        acc[i][r] = vfma(dot(w, load_chunk(xs[r].q.data() + c * kChunk)), scale, acc[i][r]);
      }
    }
  }
  // The minimums' part, kLanes groups at a time, folded into the same horizontal sum.
  const int64_t groups = chunks * 2;
  for (int64_t g = 0; g < groups; g += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, groups - g));
    vf sums[M];
    for (int r = 0; r < M; ++r) sums[r] = vload_first(xs[r].sum.data() + g, count);
    for (int i = 0; i < W; ++i) {
      const vf mins = vload_first(m + i * groups + g, count);
      for (int r = 0; r < M; ++r) acc[i][r] = vfma(mins, sums[r], acc[i][r]);
    }
  }
  for (int r = 0; r < M; ++r) {
    float total[4];
    const int last = W - 1;  // W = 1: the one vector four times
    vsum4(acc[0][r], acc[std::min(1, last)][r], acc[std::min(2, last)][r], acc[last][r], total);
    for (int i = 0; i < W; ++i) out[i][r] = total[i];
  }
}

// 8-bit codes x float activations. float_scales gives the lane scales of a chunk's even and odd float
// vectors (on NEON a vector is all one group, elsewhere the groups alternate every 4 lanes).
template <int M>
void dot_rows_float(const uint8_t* codes, const c10::Half* d, const c10::Half* m, const FloatRow* xs, int64_t chunks,
                    float* out) {
  constexpr int n = kChunk / kLanes;
  vf acc[M][2];
  for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t c = 0; c < chunks; ++c) {
    prefetch(codes + 4 * chunks * kChunk + c * kChunk);  // the row four ahead
    vf even, odd, w[n];
    float_scales(d + c * 2, even, odd);
    for (int q = 0; q < kChunk / 16; ++q) vwiden16(codes + c * kChunk + 16 * q, w + q * (16 / kLanes));
    for (int r = 0; r < M; ++r) {
      const float* x = xs[r].x.data() + c * kChunk;
      vf t0 = vmul(w[0], vload(x)), t1 = vmul(w[1], vload(x + kLanes));
      for (int q = 2; q < n; q += 2) {
        t0 = vfma(w[q], vload(x + q * kLanes), t0);
        t1 = vfma(w[q + 1], vload(x + (q + 1) * kLanes), t1);
      }
      acc[r][c & 1] = vfma(t0, even, vfma(t1, odd, acc[r][c & 1]));
    }
  }
  for (int r = 0; r < M; ++r)
    out[r] = vsum(vadd(acc[r][0], acc[r][1])) + min_term(m, xs[r].sum.data(), chunks * 2);
}
#endif

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

void dot_rows_float_scalar(const uint8_t* codes, const c10::Half* d, const c10::Half* m, const FloatRow* xs, int rows,
                           int64_t chunks, float* out) {
  for (int r = 0; r < rows; ++r) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t b = 0; b < kChunk; ++b)
        total += codes[c * kChunk + b] * static_cast<float>(d[c * 2 + (b / 4) % 2]) * xs[r].x[c * kChunk + b];
    out[r] = total + min_term(m, xs[r].sum.data(), chunks * 2);
  }
}

// W weight rows (4 needs a vectorised level) x `rows` activation rows of 4 or 5 bits into out[i][r].
template <int W, int MaxRows>
void dot_rows_any(const uint8_t* codes, int64_t row_bytes, const uint8_t* high, const c10::Half* d,
                  const c10::Half* m, const QuantizedRow* xs, int rows, int64_t chunks, float (*out)[kMaxRows]) {
#ifdef TOKENLOOM_GQ_VECTOR
  with_rows<MaxRows>(rows, [&](auto r) {
    constexpr int R = decltype(r)::value;
    if (high)
      dot_rows<W, R, 5>(codes, row_bytes, high, d, m, xs, chunks, out);
    else
      dot_rows<W, R, 4>(codes, row_bytes, high, d, m, xs, chunks, out);
  });
#else
  static_assert(W == 1, "rows in fours need a vectorised level");
  static_cast<void>(row_bytes);
  dot_rows_scalar(codes, high, high ? 5 : 4, d, m, xs, rows, chunks, out[0]);
#endif
}

void dot_rows_float_any(const uint8_t* codes, const c10::Half* d, const c10::Half* m, const FloatRow* xs, int rows,
                        int64_t chunks, float* out) {
#ifdef TOKENLOOM_GQ_VECTOR
  with_rows<kMaxRows>(rows, [&](auto r) { dot_rows_float<decltype(r)::value>(codes, d, m, xs, chunks, out); });
#else
  dot_rows_float_scalar(codes, d, m, xs, rows, chunks, out);
#endif
}

template <typename T, typename O>
void gq_linear_kernel(const T* x, const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d,
                      const c10::Half* m, const float* bias, O* out, int64_t rows, int64_t n, int64_t k) {
  const int64_t chunks = k / kChunk;
  const int64_t row_bytes = bits == 8 ? k : k / 2;
  std::vector<QuantizedRow> xs(bits == 8 ? 0 : rows);
  std::vector<FloatRow> fs(bits == 8 ? rows : 0);
  for (int64_t r = 0; r < rows; ++r) {
    if (bits == 8)
      float_row(x + r * k, k, fs[r]);
    else
      quantize_row(x + r * k, k, xs[r]);
  }
  // Enough outputs per task that the threads' fork/join is small against the bytes each one reads.
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float result[4][kMaxRows];
    // Weight rows j..j+width-1 x activation rows r0..r0+count-1 from result, plus the bias.
    auto emit = [&](int64_t j, int width, int64_t r0, int count) {
      for (int i = 0; i < width; ++i) {
        const float b = bias ? bias[j + i] : 0.f;
        for (int r = 0; r < count; ++r) out[(r0 + r) * n + j + i] = static_cast<O>(result[i][r] + b);
      }
    };
    auto args = [&](int64_t j) {  // where weight row j starts in each array
      return std::make_tuple(codes + j * row_bytes, high ? high + j * (k / 8) : nullptr, d + j * chunks * 2,
                             m + j * chunks * 2);
    };
    int64_t j = begin;
#ifdef TOKENLOOM_GQ_VECTOR
    if (bits != 8 && rows <= 2)
      for (; j + 4 <= end; j += 4) {
        const auto [cj, hj, dj, mj] = args(j);
        dot_rows_any<4, 2>(cj, row_bytes, hj, dj, mj, xs.data(), static_cast<int>(rows), chunks, result);
        emit(j, 4, 0, static_cast<int>(rows));
      }
#endif
    // One weight row against the activation rows in passes of kMaxRows: the row's codes stay in L1 for
    // every pass, and a row's arithmetic is the same in any pass.
    for (; j < end; ++j) {
      const auto [cj, hj, dj, mj] = args(j);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int count = static_cast<int>(std::min(kMaxRows, rows - r0));
        if (bits == 8)
          dot_rows_float_any(cj, dj, mj, fs.data() + r0, count, chunks, result[0]);
        else
          dot_rows_any<1, kMaxRows>(cj, row_bytes, hj, dj, mj, xs.data() + r0, count, chunks, result);
        emit(j, 1, r0, count);
      }
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
// rounding). With rows widened one at a time, a 262k x 640 bf16 LM head packs at 4 bits in 0.33 s on
// AVX-512 (was 1.23 s).
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

bool gq_linear_native() {
#ifdef TOKENLOOM_GQ_VECTOR
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

// Weights of one row in natural input order: out[i] = code(i) * d(group) + m(group) (exact in float:
// a code has at most 8 bits and d 11, so one rounding, of the sum, whether fused or not).
template <typename T>
void dequant_row(const uint8_t* codes, const uint8_t* high, int bits, const c10::Half* d, const c10::Half* m,
                 int64_t chunks, T* out) {
#ifdef TOKENLOOM_GQ_VECTOR
  for (int64_t c = 0; c < chunks; ++c) {
    const Chunk w = bits == 8   ? load_chunk(codes + c * kChunk)
                    : bits == 5 ? load_codes<5>(codes + c * 32, high + c * 8)
                                : load_codes<4>(codes + c * 32, nullptr);
    alignas(64) uint8_t natural[kChunk];
    natural_order(w, natural);
    for (int g = 0; g < 2; ++g) {
      const vf scale = vset1(static_cast<float>(d[c * 2 + g])), low = vset1(static_cast<float>(m[c * 2 + g]));
      for (int h = 0; h < 2; ++h) {  // 16 inputs at a time
        vf v[16 / kLanes];
        vwiden16(natural + 32 * g + 16 * h, v);
        for (int i = 0; i < 16 / kLanes; ++i)
          vstore(out + c * kChunk + 32 * g + 16 * h + i * kLanes, vfma(v[i], scale, low));
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
// x [M, K] float32/bfloat16/float16 with K % 64 == 0 (any M, in passes of 8 rows); codes uint8 [N, K / 2] (or [N, K] for 8
// bits); d float16 [N, K / 64, 2]; m float16 [N, K / 32]; high uint8 [N, K / 8] (5 bits) or None; bias [N]
// or None. Returns [M, N] in x's dtype, or in float32 with float_out (logits: no rounding, no conversion).
at::Tensor gq_linear(at::Tensor x, at::Tensor codes, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high,
                     c10::optional<at::Tensor> bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu(), "gq_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "gq_linear: x must be [rows, K]");
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
