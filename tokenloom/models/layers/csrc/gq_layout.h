// The packed layout of the group-quantized weights, shared by the products (gq_linear.cpp: gq_linear,
// gq_dequant) and the fit that builds it (gq_pack.cpp: gq_pack); gq_chunk.h loads and stores its chunks.
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
#pragma once

#include <cstdint>

namespace tokenloom::gq {
// Internal linkage: every level's kernels are built from the same sources with other flags.
namespace {

constexpr int64_t kChunk = 64;  // inputs per chunk: two groups of 32

// Input index (within its chunk) of vector position b.
inline int64_t chunk_input(int64_t b) { return 32 * ((b / 4) % 2) + 4 * (b / 8) + b % 4; }

}  // namespace
}  // namespace tokenloom::gq
