"""The group-quantized weight format (4, 5 and 8 bits) and its product with activations.

One format for all widths: groups of 32 weights along the input, each weight `code * d + m` with an fp16
scale d and minimum m per group; codes of 4, 5 or 8 bits (5, 6 or 9 bits a weight with the scales).
`pack_group_quant` fits a float matrix (natively where the kernels are built, else with torch ops: the
same fit); `pack_group_codes` lays out codes that are already known (a GGUF file's blocks, see
`tokenloom.models.quantize`). The format holds every GGUF block type of up to 8 bits with one scale per
32 weights (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, and Q4_K/Q5_K up to the fp16 rounding of their sub-block scales).

`group_quant_matmul` has two regimes. Steps of up to `ops.group_quant_max_rows()` rows (8 at the avx512
level, 64 at avx2 and neon: decode, and many sequences where no fast bf16 GEMM exists) run on a native
kernel (`ops.group_quant_rows`, csrc/gq_linear.cpp: codes x int8 activations per group of 32 with VNNI on
AVX-512, maddubs on AVX2 and sdot on NEON, as llama.cpp's k-quant x Q8 dot products, in passes of 8 rows);
larger steps (prefill) are bound by arithmetic and multiply the dequantized matrix (in the activations'
dtype, built per step, never kept) with the dense GEMM. So a layer holds one copy of its weights, and its
results do not depend on the rest of the batch within either regime. On devices (or ISA levels) without
the vectorised kernels every step multiplies the dequantized matrix (same format, no speed-up).

`tile_group_quant` lays 4-bit codes out in row tiles of 16 for the LM head's decode kernel
(csrc/gq_tiles.cpp).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenloom.models import ops
from tokenloom.models.layers.linear import bucketed_linear

# Input index (within a chunk of 64) held by each vector position of the packed layout: 32-bit lanes
# alternate between the chunk's two groups (see csrc/gq_layout.h).
_GQ_ORDER = torch.tensor([32 * ((b // 4) % 2) + 4 * (b // 8) + b % 4 for b in range(64)])
_GQ_INVERSE = torch.argsort(_GQ_ORDER)
GQ_CHUNK = 64
GQ_BITS = (4, 5, 8)
_GQ_PACK_ROWS = 8192  # rows packed at a time (bounds the temporaries for a 262k-row LM head)
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def _fit_groups(groups: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..levels, fp16-exact scales and minimums for float32 groups [G, 32], weight ~= code * d + m.

    Tries a few clipped ranges per group; for each, the codes fix a least-squares (d, m), and the
    candidate with the smallest squared error wins (as llama.cpp's quantizers refine min/max)."""
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    span = high - low
    best = None
    for clip_low, clip_high in ((0.0, 0.0), (0.0, 0.05), (0.05, 0.0), (0.05, 0.05), (0.1, 0.1)):
        lo, hi = low + clip_low * span, high - clip_high * span
        codes = ((groups - lo) / ((hi - lo) / levels).clamp_min(1e-10)).round_().clamp_(0, levels)
        d, m = _least_squares(codes, groups)
        d, m = d.half().float(), m.half().float()
        err = (codes * d + m - groups).square_().sum(dim=1, keepdim=True)
        if best is None:
            best = [codes, d, m, err]
        else:
            better = err < best[3]
            for i, value in enumerate((codes, d, m, err)):
                best[i] = torch.where(better, value, best[i])
    codes, d, m, _ = best
    # Recompute the codes against the rounded scale and minimum actually stored.
    codes = ((groups - m) / d.clamp_min(1e-10)).round_().clamp_(0, levels)
    return codes.to(torch.uint8), d.squeeze(1).half(), m.squeeze(1).half()


def _least_squares(codes: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (d, m) minimising sum((codes * d + m - w)^2); a constant row keeps d = 0."""
    n = codes.shape[1]
    sc, sw = codes.sum(dim=1, keepdim=True), w.sum(dim=1, keepdim=True)
    scc, scw = (codes * codes).sum(dim=1, keepdim=True), (codes * w).sum(dim=1, keepdim=True)
    det = n * scc - sc * sc
    d = torch.where(det > 0, (n * scw - sc * sw) / det.clamp_min(1e-10), torch.zeros_like(det))
    return d, (sw - d * sc) / n


class GroupQuantWeight(NamedTuple):
    """A [N, K] weight in the native kernel's layout (K % 64 == 0; weight = code * d + m per group of 32):
    codes uint8 [N, K / 2] for 4 and 5 bits (the low 4 bits; per chunk of 64 inputs, 32 bytes of nibbles
    in vector order) or [N, K] for 8 bits (per chunk 64 bytes in vector order), d float16 [N, K / 64, 2]
    (the scales of each chunk's two groups of 32), m float16 [N, K / 32] (the minimums), high uint8
    [N, K / 8] (5 bits: the fifth bit of each code, 64 per chunk) or None."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    high: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """K."""
        return self.d.shape[1] * GQ_CHUNK

    @property
    def bits(self) -> int:
        """4, 5 or 8."""
        if self.codes.shape[1] == self.in_features:
            return 8
        return 4 if self.high is None else 5


def pack_group_codes(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> GroupQuantWeight:
    """Lay out codes uint8 [N, K] (natural input order, each < 2**bits) with their per-group scales and
    minimums (float16 [N, K / 32] each) as the native kernel reads them."""
    n, k = codes.shape
    chunks = k // GQ_CHUNK
    q = codes.view(n, chunks, GQ_CHUNK)[..., _GQ_ORDER.to(codes.device)]
    d = d.reshape(n, chunks, 2).half().contiguous()
    m = m.reshape(n, k // 32).half().contiguous()
    if bits == 8:
        return GroupQuantWeight(q.reshape(n, k).contiguous(), d, m)
    low = q & 0x0F
    packed = (low[..., :32] | (low[..., 32:] << 4)).reshape(n, k // 2)
    high = None
    if bits == 5:
        fifth = (q >> 4).view(n, chunks, 8, 8) * _BIT_WEIGHTS.to(codes.device)
        high = fifth.sum(dim=-1, dtype=torch.uint8).reshape(n, k // 8)
    return GroupQuantWeight(packed, d, m, high)


def concat_group_quant(parts: list[GroupQuantWeight]) -> GroupQuantWeight:
    """Stack packed weights of one width along the output dimension (the shards of a merged layer)."""
    if len({p.bits for p in parts}) != 1:
        raise ValueError(f"cannot stack packed weights of widths {[p.bits for p in parts]}")
    if len(parts) == 1:
        return parts[0]
    fields = [torch.cat(tensors) if tensors[0] is not None else None for tensors in zip(*parts)]
    return GroupQuantWeight(*fields)


def pack_group_quant(weight: torch.Tensor, bits: int = 4) -> GroupQuantWeight:
    """Fit a [N, K] float weight (K % 64 == 0) with `bits` (4, 5 or 8) per weight in groups of 32, in the
    native kernel's layout (natively where the kernels are built, else with torch ops: the same fit)."""
    if bits not in GQ_BITS:
        raise ValueError(f"group quantization takes 4, 5 or 8 bits, not {bits}")
    native = ops.group_quant_pack(weight, bits)
    if native is not None:
        return GroupQuantWeight(*native)
    n, k = weight.shape
    parts = []
    for start in range(0, n, _GQ_PACK_ROWS):
        w = weight[start:start + _GQ_PACK_ROWS].detach().float()
        q, scale, low = _fit_groups(w.reshape(-1, 32), (1 << bits) - 1)
        rows = w.shape[0]
        parts.append(pack_group_codes(q.view(rows, k), scale.view(rows, -1), low.view(rows, -1), bits))
    return concat_group_quant(parts)


def unpack_group_quant(weight: GroupQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] matrix that a `GroupQuantWeight` stands for, in `dtype` (natively where the kernels are
    built: what large steps multiply with)."""
    native = ops.group_quant_dequant(weight.codes, weight.d, weight.m, weight.high, dtype)
    if native is not None:
        return native
    n, k = weight.codes.shape[0], weight.in_features
    groups = _natural_codes(weight).float().view(n, k // 32, 32)
    groups = groups * weight.d.float().view(n, -1, 1) + weight.m.float().view(n, -1, 1)
    return groups.view(n, k).to(dtype)


def _natural_codes(weight: GroupQuantWeight) -> torch.Tensor:
    """The codes of a packed weight, uint8 [N, K] in input order."""
    n, chunks = weight.d.shape[0], weight.d.shape[1]
    if weight.bits == 8:
        q = weight.codes.view(n, chunks, GQ_CHUNK)
    else:
        packed = weight.codes.view(n, chunks, 32)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=2)
        if weight.high is not None:
            shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
            q = q | (((weight.high.view(n, chunks, 8, 1) >> shifts) & 1).view(n, chunks, 64) << 4)
    return q[..., _GQ_INVERSE.to(q.device)].reshape(n, chunks * GQ_CHUNK)


_TILE = 16  # rows per tile (csrc/gq_tiles.cpp)
_BITS_OF_BYTE = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class TiledWeight(NamedTuple):
    """A 4- or 5-bit weight in row tiles of 16 (csrc/gq_tiles.cpp): tiles uint8 [N' / 16, K / 8, 64], d and m
    float16 [N' / 16, K / 32, 16], N' = N rounded up to 16 (padding rows are zeros); high uint8
    [N' / 16, K / 8, 16] (5 bits: the fifth bits, per block 64 for the low nibbles' codes, 64 for the high
    ones') or None."""

    tiles: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    high: torch.Tensor | None = None


def tile_group_quant(weight: GroupQuantWeight) -> TiledWeight:
    """The same 4- or 5-bit codes, scales and minimums laid out in row tiles of 16."""
    if weight.bits not in (4, 5):
        raise ValueError(f"row tiles hold 4- or 5-bit codes, not {weight.bits}")
    codes, n, k = _natural_codes(weight), weight.codes.shape[0], weight.in_features
    d, m = weight.d.reshape(n, k // 32), weight.m
    pad = -n % _TILE
    if pad:
        codes, d, m = (F.pad(t, (0, 0, 0, pad)) for t in (codes, d, m))
    count = (n + pad) // _TILE
    halves = codes.view(count, _TILE, k // 8, 2, 4)  # [tile, row, block of 8 inputs, half, input]
    by_block = halves.permute(0, 2, 3, 1, 4).reshape(count, k // 8, 2, 64)  # [tile, block, half, byte 4r + j]
    tiles = ((by_block[:, :, 0] & 0x0F) | ((by_block[:, :, 1] & 0x0F) << 4)).contiguous()
    high = None
    if weight.bits == 5:
        fifth = (by_block >> 4).view(count, k // 8, 2, 8, 8) * _BITS_OF_BYTE.to(codes.device)
        high = fifth.sum(dim=-1, dtype=torch.uint8).reshape(count, k // 8, 16).contiguous()
    per_group = lambda t: t.view(count, _TILE, k // 32).transpose(1, 2).contiguous()  # noqa: E731
    return TiledWeight(tiles, per_group(d), per_group(m), high)


def untile_group_quant(tiled: TiledWeight, rows: int) -> GroupQuantWeight:
    """The inverse of `tile_group_quant` (the first `rows` rows)."""
    count, blocks, _ = tiled.tiles.shape
    k = blocks * 8
    lo, hi = tiled.tiles & 0x0F, tiled.tiles >> 4  # [tile, block, byte 4r + j]
    if tiled.high is not None:
        shifts = torch.arange(8, dtype=torch.uint8, device=lo.device)
        bits = ((tiled.high.view(count, blocks, 2, 8, 1) >> shifts) & 1).view(count, blocks, 2, 64) << 4
        lo, hi = lo | bits[:, :, 0], hi | bits[:, :, 1]
    by_row = lambda t: t.view(count, blocks, _TILE, 4).permute(0, 2, 1, 3)  # noqa: E731 - [tile, row, block, input]
    codes = torch.stack([by_row(lo), by_row(hi)], dim=3).reshape(count * _TILE, k)[:rows]
    per_row = lambda t: t.transpose(1, 2).reshape(count * _TILE, k // 32)[:rows]  # noqa: E731
    bits = 4 if tiled.high is None else 5
    return pack_group_codes(codes.contiguous(), per_row(tiled.d), per_row(tiled.m), bits)


def group_quant_matmul(x: torch.Tensor, weight: GroupQuantWeight, bias: torch.Tensor | None = None,
                       float_out: bool = False) -> torch.Tensor:
    """x [M, K] @ the quantized weight.T (+ bias) → [M, N] in x's dtype (float32 with `float_out`): the
    native kernel (activations quantized to int8 per group of 32) for steps it takes on CPU (see
    `ops.group_quant_max_rows`), else the dequantized matrix in x's dtype with the dense GEMM."""
    native = ops.group_quant_rows(x, weight.codes, weight.d, weight.m, weight.high, bias, float_out)
    if native is not None:
        return native
    out = bucketed_linear(x, unpack_group_quant(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    return out.float() if float_out else out
