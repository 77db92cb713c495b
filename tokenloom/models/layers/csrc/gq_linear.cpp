// Group-quantized weight x activation products for steps of a few rows (decode): 4- and 5-bit codes x
// int8 activations, 8-bit codes x float activations; and the dequantization that larger steps multiply
// with a dense GEMM. The weights are in the layout of gq_layout.h, built by gq_pack (gq_pack.cpp).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "gq_chunk.h"
#include "gq_layout.h"
#include "gq_simd.h"
#include "kernels.h"

namespace {

using namespace tokenloom::gq;

constexpr int64_t kMaxRows = 8;

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
// activation row keep the FMA units busy.
template <int W, int M, int Bits>
void dot_rows(const uint8_t* codes, int64_t row_bytes, const uint8_t* high, const c10::Half* d, const c10::Half* m,
              const QuantizedRow* xs, int64_t chunks, float (*out)[kMaxRows]) {
  vf acc[W][M];
  for (int i = 0; i < W; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = vzero();
  // Rows four calls ahead with W = 1, two with W = 4 (a 64-byte line holds two chunks of codes).
  constexpr int kAhead = W == 1 ? 4 : 2 * W;
  for (int64_t c = 0; c < chunks; ++c) {
    // Software prefetch: the hardware prefetchers ramp up on each of the many short streams of a call, and
    // a decode step, where every matrix streams from memory once, would pay that ramp-up in every product.
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
