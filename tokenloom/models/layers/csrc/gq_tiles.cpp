// A 4- or 5-bit group-quantized matrix in row tiles: the vocabulary projection of decode steps, and at the
// avx2 level every group-quantized layer (ops.tiled_layers), for steps of any size.
//
// In gq_linear's layout a 32-bit lane holds four codes of one row, so every output row ends in a
// horizontal sum and every chunk pays its own scale arithmetic: about ten instructions per 64 weights,
// which on two cores reads 4-bit weights at ~36 GB/s where 8-bit ones stream at ~44. Here lane r holds
// row r of a tile of 16: one load gives 16 rows x 8 inputs, the activations are broadcast, the integer
// sums of a group of 32 are scaled once for 16 rows, and the result of a tile is one store (about five
// instructions per 64 weights). Same arithmetic as gq_linear: activations quantized to int8 per group of
// 32 (gq::quantize32, the same codes), weight = code * d + m.
//
// Levels (isa.h): the integer sums of a group are each level's own (gq_tile.h: vpdpbusd on avx512,
// vpmaddubsw on avx2, sdot on neon), the float part is written once over gq_simd.h's vectors, kLanes rows
// of a tile at a time; the portable level runs a scalar loop.
//
// Layout (rows padded to a multiple of 16):
//   tiles uint8 [N / 16, K / 8, 64]: for inputs 8b..8b+7 of tile t, byte 4r + j holds the code of row
//         16t + r for input 8b + j in its low nibble and for input 8b + 4 + j in its high nibble.
//   d, m  fp16 [N / 16, K / 32, 16]: scale and minimum of group g of row 16t + r at [t, g, r].
//   high  uint8 [N / 16, K / 8, 16] (5 bits only): for block b of tile t, bit i of the first 8 bytes (a
//         little-endian 64-bit word) is the fifth bit of byte i's low-nibble code, of the next 8 its
//         high-nibble code's.
//
// Many rows at avx2 (tile_many): with lanes along the weight rows, a GEMM of int8 activations against these
// codes needs no horizontal sums, and vpmaddubsw does 32 multiply-adds where an fp32 FMA does 8. Unpacked
// once per group for 64 rows, the codes cost nothing per row: on a Zen 3 core the product runs at about
// twice torch's fp32 GEMM, so prefill and batched decode take it rather than dequantizing the matrix.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gq_simd.h"
#include "gq_tile.h"
#include "kernels.h"

namespace {

using namespace tokenloom::gq;

constexpr int64_t kTile = 16;
constexpr int64_t kRowBlock = 64;  // rows per pass over a task's tiles: their int8 activations stay in L1/L2

// The activations of a call, quantized per group of 32 (the same codes as gq_linear's), one row after another.
struct Activations {
  int64_t k = 0, groups = 0;
  std::vector<int8_t> q;     // [rows, K], natural order
  std::vector<float> scale;  // [rows, K / 32]
  std::vector<float> sum;    // [rows, K / 32]: scale * sum(q)

  const int8_t* codes(int64_t r) const { return q.data() + r * k; }
  const float* scales(int64_t r) const { return scale.data() + r * groups; }
  const float* sums(int64_t r) const { return sum.data() + r * groups; }
};

// Rows in parallel where there are many (a prefill's thousands would otherwise be a serial ~5% of its step).
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, Activations& out) {
  out.k = k;
  out.groups = k / 32;
  out.q.resize(rows * k);
  out.scale.resize(rows * out.groups);
  out.sum.resize(rows * out.groups);
  const int64_t groups = out.groups;
  int8_t* q = out.q.data();
  float* scale = out.scale.data();
  float* sum = out.sum.data();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < groups; ++g)
        scale[r * groups + g] = quantize32(x + r * k + 32 * g, q + r * k + 32 * g, sum[r * groups + g]);
  });
}

// Where one tile starts in each array.
struct TileRef {
  const uint8_t* codes;
  const uint8_t* high;  // nullptr: 4 bits
  const c10::Half* d;
  const c10::Half* m;
};

// Group g's fifth bits (nullptr for 4 bits).
template <int Bits>
inline const uint8_t* high_of_group(const TileRef& t, int64_t g) {
  return Bits == 5 ? t.high + 4 * g * kTileHighBlock : nullptr;
}

#ifdef TOKENLOOM_GQ_VECTOR
// M activation rows (from r0) x one tile into out[r * n + first_row ...], kLanes rows of the tile at a time.
// `next` (or nullptr): the tile the caller takes next, prefetched during the first part, a group's share at a
// time: a few rows read every tile once from memory, and the hardware prefetchers ramp up again on each
// tile's three short streams (codes, scales, minimums).
template <int M, int Bits>
void tile_rows(const TileRef& t, const TileRef* next, const Activations& a, int64_t r0, float* out, int64_t n,
               int64_t first_row) {
  for (int part = 0; part < kTile / kLanes; ++part) {
    vf acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vzero();
    for (int64_t g = 0; g < a.groups; ++g) {
      if (next != nullptr && part == 0) {
        for (int line = 0; line < 4; ++line) prefetch(next->codes + 4 * g * kTileBlock + 64 * line);
        if (g % 2 == 0) {  // a group's scales (or minimums) are 32 bytes
          prefetch(next->d + kTile * g);
          prefetch(next->m + kTile * g);
        }
        if (Bits == 5) prefetch(next->high + 4 * g * kTileHighBlock);
      }
      const int8_t* x[M];
      for (int r = 0; r < M; ++r) x[r] = a.codes(r0 + r) + 32 * g;
      vf dots[M];
      group_dots<M, Bits>(t.codes + 4 * g * kTileBlock, high_of_group<Bits>(t, g), part, x, dots);
      const vf dv = vload(t.d + kTile * g + kLanes * part), mv = vload(t.m + kTile * g + kLanes * part);
      for (int r = 0; r < M; ++r) {
        acc[r] = vfma(dots[r], vmul(dv, vset1(a.scales(r0 + r)[g])), acc[r]);
        acc[r] = vfma(mv, vset1(a.sums(r0 + r)[g]), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) vstore(out + (r0 + r) * n + first_row + kLanes * part, acc[r]);
  }
}
#endif

#if defined(TOKENLOOM_AVX2)
// Many rows (prefill, batched decode): a group's codes are unpacked once for all the rows of the call (in the
// few-rows kernel, once per pass of kTileRows rows), half a group at a time for both halves of the tile: 8
// registers, so each activation broadcast feeds two vpmaddubsw, one per half (loads, not arithmetic, bound this
// loop on Zen 3: a whole group of one half took one broadcast per vpmaddubsw, and ran ~1.25x slower). A row's
// int16 sums of the first half-group wait in `acc` (L1) for the second, beside its float accumulators. The same
// arithmetic in the same order as tile_rows, so a row's outputs do not depend on which kernel ran: one int16 sum
// per 8 products (4 bits; 5-bit halves widened apart), widened and converted once per group, then the two fused
// multiply-adds. `acc` holds kRowBlock rows: two halves of floats, then two of int16 sums.
constexpr int64_t kManyRowsBuffer = kRowBlock * 4 * kLanes;

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One row's products with half a group (blocks 2h, 2h + 1) for both halves of the tile: c[4 * part + 2 * b + hi].
inline void half_group_sums(const __m256i* c, const int8_t* xq, __m256i& part0, __m256i& part1) {
  const __m256i x0 = _mm256_set1_epi32(load4(xq)), x1 = _mm256_set1_epi32(load4(xq + 4));
  const __m256i x2 = _mm256_set1_epi32(load4(xq + 8)), x3 = _mm256_set1_epi32(load4(xq + 12));
  part0 = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c[0], x0), _mm256_maddubs_epi16(c[1], x1)),
                           _mm256_add_epi16(_mm256_maddubs_epi16(c[2], x2), _mm256_maddubs_epi16(c[3], x3)));
  part1 = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c[4], x0), _mm256_maddubs_epi16(c[5], x1)),
                           _mm256_add_epi16(_mm256_maddubs_epi16(c[6], x2), _mm256_maddubs_epi16(c[7], x3)));
}

template <int Bits>
inline void half_group_codes(const TileRef& t, int64_t g, int h, __m256i* c) {
  for (int part = 0; part < 2; ++part)
    for (int b = 0; b < 2; ++b)
      block_codes<Bits>(t.codes + 4 * g * kTileBlock, high_of_group<Bits>(t, g), 2 * h + b, part, c[4 * part + 2 * b],
                        c[4 * part + 2 * b + 1]);
}

template <int Bits>
void tile_many(const TileRef& t, const Activations& a, int64_t r0, int rows, float* acc, float* out, int64_t n,
               int64_t first_row) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i* partial = reinterpret_cast<__m256i*>(acc + kRowBlock * 2 * kLanes);  // [rows, 2 parts]
  for (int r = 0; r < 2 * rows; ++r) _mm256_storeu_ps(acc + r * kLanes, _mm256_setzero_ps());
  // The rows' arrays in locals: the stores below may alias `a` (vector stores may alias anything), which would
  // reload its pointers every row (~15-20% of this loop).
  const int64_t k = a.k, groups = a.groups;
  const int8_t* codes = a.codes(r0);
  const float* scales = a.scales(r0);
  const float* sums = a.sums(r0);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i c[8];
    half_group_codes<Bits>(t, g, 0, c);
    for (int r = 0; r < rows; ++r) {
      __m256i p0, p1;
      half_group_sums(c, codes + r * k + 32 * g, p0, p1);
      if (Bits == 5) {
        p0 = _mm256_madd_epi16(p0, ones);
        p1 = _mm256_madd_epi16(p1, ones);
      }
      _mm256_storeu_si256(partial + 2 * r, p0);
      _mm256_storeu_si256(partial + 2 * r + 1, p1);
    }
    half_group_codes<Bits>(t, g, 1, c);
    const vf d0 = vload(t.d + kTile * g), d1 = vload(t.d + kTile * g + kLanes);
    const vf m0 = vload(t.m + kTile * g), m1 = vload(t.m + kTile * g + kLanes);
    for (int r = 0; r < rows; ++r) {
      __m256i p0, p1;
      half_group_sums(c, codes + r * k + 32 * g + 16, p0, p1);
      const __m256i first0 = _mm256_loadu_si256(partial + 2 * r), first1 = _mm256_loadu_si256(partial + 2 * r + 1);
      const __m256i t0 = Bits == 5 ? _mm256_add_epi32(first0, _mm256_madd_epi16(p0, ones))
                                   : _mm256_madd_epi16(_mm256_add_epi16(first0, p0), ones);
      const __m256i t1 = Bits == 5 ? _mm256_add_epi32(first1, _mm256_madd_epi16(p1, ones))
                                   : _mm256_madd_epi16(_mm256_add_epi16(first1, p1), ones);
      const vf xs = vset1(scales[r * groups + g]), xsum = vset1(sums[r * groups + g]);
      float* a0 = acc + 2 * r * kLanes;
      vstore(a0, vfma(m0, xsum, vfma(_mm256_cvtepi32_ps(t0), vmul(d0, xs), vload(a0))));
      vstore(a0 + kLanes, vfma(m1, xsum, vfma(_mm256_cvtepi32_ps(t1), vmul(d1, xs), vload(a0 + kLanes))));
    }
  }
  for (int r = 0; r < rows; ++r) {
    vstore(out + (r0 + r) * n + first_row, vload(acc + 2 * r * kLanes));
    vstore(out + (r0 + r) * n + first_row + kLanes, vload(acc + 2 * r * kLanes + kLanes));
  }
}
#endif

#if !defined(TOKENLOOM_AVX2)
constexpr int64_t kManyRowsBuffer = 0;  // no many-rows kernel
#endif

void tile_rows_scalar(const TileRef& t, const Activations& a, int64_t r0, int rows, float* out, int64_t n,
                      int64_t first_row) {
  for (int64_t r = r0; r < r0 + rows; ++r)
    for (int64_t lane = 0; lane < kTile; ++lane) {
      float total = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        int32_t dot = 0;
        for (int b = 0; b < 4; ++b)
          for (int j = 0; j < 4; ++j) {
            const int64_t i = (4 * g + b) * kTileBlock + 4 * lane + j;  // byte i of the tile
            int lo = t.codes[i] & 0x0F, hi = t.codes[i] >> 4;
            if (t.high) {
              const uint8_t* bits = t.high + (4 * g + b) * kTileHighBlock;
              const int64_t byte = 4 * lane + j;
              lo |= ((bits[byte / 8] >> (byte % 8)) & 1) << 4;
              hi |= ((bits[8 + byte / 8] >> (byte % 8)) & 1) << 4;
            }
            const int8_t* x = a.codes(r) + 32 * g + 8 * b + j;
            dot += lo * x[0] + hi * x[4];
          }
        total += static_cast<float>(dot) * (static_cast<float>(t.d[16 * g + lane]) * a.scales(r)[g]);
        total += static_cast<float>(t.m[16 * g + lane]) * a.sums(r)[g];
      }
      out[r * n + first_row + lane] = total;
    }
}

// Rows r0 .. r0 + rows - 1 x one tile: the many-rows kernel where the level has one and the call has more rows
// than a pass of the few-rows kernel, else passes of at most kTileRows rows (a row's arithmetic is the same in
// any pass and either kernel).
template <int Bits>
void tile_block(const TileRef& t, const TileRef* next, const Activations& a, int64_t r0, int rows, float* acc,
                float* out, int64_t n, int64_t first_row) {
#if defined(TOKENLOOM_AVX2)
  if (rows > kTileRows) return tile_many<Bits>(t, a, r0, rows, acc, out, n, first_row);
#endif
  static_cast<void>(acc);
#ifdef TOKENLOOM_GQ_VECTOR
  if constexpr (Bits == 4 || kTileHighBits) {
    for (int64_t p = r0; p < r0 + rows; p += kTileRows)
      with_rows<kTileRows>(static_cast<int>(std::min<int64_t>(kTileRows, r0 + rows - p)), [&](auto r) {
        tile_rows<decltype(r)::value, Bits>(t, p == r0 ? next : nullptr, a, p, out, n, first_row);
      });
    return;
  }
#endif
  static_cast<void>(next);
  tile_rows_scalar(t, a, r0, rows, out, n, first_row);
}

}  // namespace

bool gq_tiles_high_supported() {
#ifdef TOKENLOOM_GQ_VECTOR
  return kTileHighBits;
#else
  return true;  // the scalar loop
#endif
}

// x [M, K] (any M; float32/bfloat16/float16, K % 32 == 0) → float32 [M, N] with N = 16 * tiles. high: the fifth
// bits of 5-bit codes, uint8 [N / 16, K / 8, 16], or None for 4 bits.
at::Tensor gq_tiles_linear(at::Tensor x, at::Tensor tiles, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "gq_tiles_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "gq_tiles_linear: x must be [rows, K]");
  const int64_t k = x.size(1), count = tiles.size(0), groups = k / 32;
  TORCH_CHECK(k % 32 == 0, "gq_tiles_linear: K must be a multiple of 32, got ", k);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 3 && tiles.size(1) == k / 8 && tiles.size(2) == 64,
              "gq_tiles_linear: tiles must be uint8 [N / 16, K / 8, 64]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.dim() == 3 && m.dim() == 3 &&
                  d.size(0) == count && d.size(1) == groups && d.size(2) == kTile && m.sizes() == d.sizes(),
              "gq_tiles_linear: d and m must be float16 [N / 16, K / 32, 16]");
  at::Tensor h;
  if (high.has_value() && high->defined()) {
    h = high->contiguous();
    TORCH_CHECK(gq_tiles_high_supported(), "gq_tiles_linear: 5-bit tiles need the avx2 or avx512 level");
    TORCH_CHECK(h.scalar_type() == at::kByte && h.dim() == 3 && h.size(0) == count && h.size(1) == k / 8 &&
                    h.size(2) == kTileHighBlock,
                "gq_tiles_linear: high must be uint8 [N / 16, K / 8, 16]");
  }
  x = x.contiguous();
  tiles = tiles.contiguous();
  d = d.contiguous();
  m = m.contiguous();
  const int64_t rows = x.size(0), n = count * kTile;
  Activations acts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gq_tiles_linear", [&] {
    quantize_rows(x.data_ptr<scalar_t>(), rows, k, acts);
  });
  auto out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const uint8_t* hp = h.defined() ? h.data_ptr<uint8_t>() : nullptr;
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const c10::Half* mp = m.data_ptr<c10::Half>();
  float* op = out.data_ptr<float>();
  // Few rows read every tile once from memory: tiles of a few KB each are plenty per task. Row blocks go
  // outermost, so a task's tiles are read again from cache, not its rows' activations.
  auto tile = [&](int64_t t) {
    return TileRef{tp + t * (k / 8) * kTileBlock, hp ? hp + t * (k / 8) * kTileHighBlock : nullptr,
                   dp + t * groups * kTile, mp + t * groups * kTile};
  };
  at::parallel_for(0, count, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kManyRowsBuffer);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int block = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
      for (int64_t t = begin; t < end; ++t) {
        const TileRef ref = tile(t), following = tile(t + 1);
        const TileRef* next = t + 1 < end ? &following : nullptr;
        if (hp)
          tile_block<5>(ref, next, acts, r0, block, acc.data(), op, n, t * kTile);
        else
          tile_block<4>(ref, next, acts, r0, block, acc.data(), op, n, t * kTile);
      }
    }
  });
  return out;
}
