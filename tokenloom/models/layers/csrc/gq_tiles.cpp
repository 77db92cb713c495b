// A 4-bit group-quantized matrix in row tiles, for the vocabulary projection of decode steps.
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

namespace {

using namespace tokenloom::gq;

constexpr int64_t kTile = 16;

struct NaturalRow {
  std::vector<int8_t> q;     // [K], natural order
  std::vector<float> scale;  // [K / 32]
  std::vector<float> sum;    // [K / 32]: scale * sum(q)
};

template <typename T>
void quantize_natural(const T* x, int64_t k, NaturalRow& out) {
  out.q.resize(k);
  out.scale.resize(k / 32);
  out.sum.resize(k / 32);
  for (int64_t g = 0; g < k / 32; ++g) out.scale[g] = quantize32(x + 32 * g, out.q.data() + 32 * g, out.sum[g]);
}

#ifdef TOKENLOOM_GQ_VECTOR
// M activation rows x one tile into out[r * n + first_row ...], kLanes rows of the tile at a time.
template <int M>
void tile_rows(const uint8_t* tile, const c10::Half* d, const c10::Half* m, const NaturalRow* xs, int64_t groups,
               float* out, int64_t n, int64_t first_row) {
  for (int part = 0; part < kTile / kLanes; ++part) {
    vf acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vzero();
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* x[M];
      for (int r = 0; r < M; ++r) x[r] = xs[r].q.data() + 32 * g;
      vf dots[M];
      group_dots<M>(tile + 4 * g * kTileBlock, part, x, dots);
      const vf dv = vload(d + kTile * g + kLanes * part), mv = vload(m + kTile * g + kLanes * part);
      for (int r = 0; r < M; ++r) {
        acc[r] = vfma(dots[r], vmul(dv, vset1(xs[r].scale[g])), acc[r]);
        acc[r] = vfma(mv, vset1(xs[r].sum[g]), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) vstore(out + r * n + first_row + kLanes * part, acc[r]);
  }
}
#endif

void tile_rows_scalar(const uint8_t* tile, const c10::Half* d, const c10::Half* m, const NaturalRow* xs, int rows,
                      int64_t groups, float* out, int64_t n, int64_t first_row) {
  for (int r = 0; r < rows; ++r)
    for (int64_t lane = 0; lane < kTile; ++lane) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int b = 0; b < 4; ++b)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = tile[(4 * g + b) * kTileBlock + 4 * lane + j];
            dot += (byte & 0x0F) * xs[r].q[32 * g + 8 * b + j] + (byte >> 4) * xs[r].q[32 * g + 8 * b + 4 + j];
          }
        total += static_cast<float>(dot) * (static_cast<float>(d[16 * g + lane]) * xs[r].scale[g]);
        total += static_cast<float>(m[16 * g + lane]) * xs[r].sum[g];
      }
      out[r * n + first_row + lane] = total;
    }
}

// All rows x one tile: passes of at most kTileRows rows (a row's arithmetic is the same in any pass).
void tile_all_rows(const uint8_t* tile, const c10::Half* d, const c10::Half* m, const NaturalRow* xs, int rows,
                   int64_t groups, float* out, int64_t n, int64_t first_row) {
#ifdef TOKENLOOM_GQ_VECTOR
  for (int r0 = 0; r0 < rows; r0 += kTileRows)
    with_rows<kTileRows>(std::min(kTileRows, rows - r0), [&](auto r) {
      tile_rows<decltype(r)::value>(tile, d, m, xs + r0, groups, out + r0 * n, n, first_row);
    });
#else
  tile_rows_scalar(tile, d, m, xs, rows, groups, out, n, first_row);
#endif
}

}  // namespace

// x [M, K] (any M, in passes of kTileRows; float32/bfloat16/float16, K % 32 == 0) → float32 [M, N] with N = 16 * tiles.
at::Tensor gq_tiles_linear(at::Tensor x, at::Tensor tiles, at::Tensor d, at::Tensor m) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "gq_tiles_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "gq_tiles_linear: x must be [rows, K]");
  const int64_t k = x.size(1), count = tiles.size(0), groups = k / 32;
  TORCH_CHECK(k % 32 == 0, "gq_tiles_linear: K must be a multiple of 32, got ", k);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 3 && tiles.size(1) == k / 8 && tiles.size(2) == 64,
              "gq_tiles_linear: tiles must be uint8 [N / 16, K / 8, 64]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.dim() == 3 && m.dim() == 3 &&
                  d.size(0) == count && d.size(1) == groups && d.size(2) == kTile && m.sizes() == d.sizes(),
              "gq_tiles_linear: d and m must be float16 [N / 16, K / 32, 16]");
  x = x.contiguous();
  tiles = tiles.contiguous();
  d = d.contiguous();
  m = m.contiguous();
  const int64_t rows = x.size(0), n = count * kTile;
  std::vector<NaturalRow> xs(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gq_tiles_linear", [&] {
    for (int64_t r = 0; r < rows; ++r) quantize_natural(x.data_ptr<scalar_t>() + r * k, k, xs[r]);
  });
  auto out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const c10::Half* mp = m.data_ptr<c10::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      tile_all_rows(tp + t * (k / 8) * kTileBlock, dp + t * groups * kTile, mp + t * groups * kTile, xs.data(),
                    static_cast<int>(rows), groups, op, n, t * kTile);
  });
  return out;
}
