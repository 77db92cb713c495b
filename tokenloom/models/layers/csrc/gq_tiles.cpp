// A 4-bit group-quantized matrix in row tiles, for the vocabulary projection of decode steps.
//
// In gq_linear's layout a 32-bit lane holds four codes of one row, so every output row ends in a
// horizontal sum and every chunk pays its own scale arithmetic: about ten instructions per 64 weights,
// which on two cores reads 4-bit weights at ~36 GB/s where 8-bit ones stream at ~44. Here lane r holds
// row r of a tile of 16: one load gives 16 rows x 8 inputs, the activations are broadcast, the integer
// sums of a group of 32 are scaled once for 16 rows, and the result of a tile is one store (about five
// instructions per 64 weights). Same arithmetic as gq_linear: activations quantized to int8 per group of
// 32, weight = code * d + m.
//
// Layout (rows padded to a multiple of 16):
//   tiles uint8 [N / 16, K / 8, 64]: for inputs 8b..8b+7 of tile t, byte 4r + j holds the code of row
//         16t + r for input 8b + j in its low nibble and for input 8b + 4 + j in its high nibble.
//   d, m  fp16 [N / 16, K / 32, 16]: scale and minimum of group g of row 16t + r at [t, g, r].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_group.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TOKENLOOM_TILES_AVX512 1
#endif

namespace {

constexpr int64_t kTile = 16;
constexpr int64_t kMaxRows = 8;

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
  for (int64_t g = 0; g < k / 32; ++g)
    out.scale[g] = tokenloom::quantize_group32(x + 32 * g, out.q.data() + 32 * g, out.sum[g]);
}

#ifdef TOKENLOOM_TILES_AVX512
template <int M>
void tile_rows(const uint8_t* tile, const c10::Half* d, const c10::Half* m, const NaturalRow* xs, int64_t groups,
               float* out, int64_t n, int64_t first_row) {
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo_sum[M], hi_sum[M];  // two integer chains per row: half the dependent latency
    for (int r = 0; r < M; ++r) lo_sum[r] = hi_sum[r] = _mm512_setzero_si512();
    for (int b = 0; b < 4; ++b) {
      const __m512i v = _mm512_loadu_si512(tile + (4 * g + b) * 64);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < M; ++r) {
        int32_t x0, x1;
        std::memcpy(&x0, xs[r].q.data() + 32 * g + 8 * b, 4);
        std::memcpy(&x1, xs[r].q.data() + 32 * g + 8 * b + 4, 4);
        lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, _mm512_set1_epi32(x0));
        hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, _mm512_set1_epi32(x1));
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 16 * g)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 16 * g)));
    for (int r = 0; r < M; ++r) {
      const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum[r], hi_sum[r]));
      acc[r] = _mm512_fmadd_ps(dots, _mm512_mul_ps(dv, _mm512_set1_ps(xs[r].scale[g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r].sum[g]), acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) _mm512_storeu_ps(out + r * n + first_row, acc[r]);
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
            const uint8_t byte = tile[(4 * g + b) * 64 + 4 * lane + j];
            dot += (byte & 0x0F) * xs[r].q[32 * g + 8 * b + j] + (byte >> 4) * xs[r].q[32 * g + 8 * b + 4 + j];
          }
        total += static_cast<float>(dot) * (static_cast<float>(d[16 * g + lane]) * xs[r].scale[g]);
        total += static_cast<float>(m[16 * g + lane]) * xs[r].sum[g];
      }
      out[r * n + first_row + lane] = total;
    }
}

}  // namespace

// x [M <= 8, K] (float32/bfloat16/float16, K % 32 == 0) → float32 [M, N] with N = 16 * tiles.
at::Tensor gq_tiles_linear(at::Tensor x, at::Tensor tiles, at::Tensor d, at::Tensor m) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "gq_tiles_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "gq_tiles_linear: x must be [rows <= 8, K]");
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
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = tp + t * (k / 8) * 64;
      const c10::Half* dt = dp + t * groups * kTile;
      const c10::Half* mt = mp + t * groups * kTile;
#ifdef TOKENLOOM_TILES_AVX512
      switch (rows) {
        case 1: tile_rows<1>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 2: tile_rows<2>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 3: tile_rows<3>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 4: tile_rows<4>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 5: tile_rows<5>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 6: tile_rows<6>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 7: tile_rows<7>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        case 8: tile_rows<8>(tile, dt, mt, xs.data(), groups, op, n, t * kTile); continue;
        default: break;
      }
#endif
      tile_rows_scalar(tile, dt, mt, xs.data(), static_cast<int>(rows), groups, op, n, t * kTile);
    }
  });
  return out;
}
