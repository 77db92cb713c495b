"""Dequantize GGML block formats with vectorised torch ops, straight into the dtype the model wants.

Each format does exactly the float32 arithmetic of `gguf.quants` (the reference this project's GGUF
tests and transformers both use), in the same order, so the float32 results are bit-identical; a
half-precision target is then one rounding of those values, as copying them into the parameter was.
The work runs in small chunks of blocks, so the temporaries stay in cache and a 262k-row embedding
never exists as a float32 copy. Formats without a fast path here (Q2_K, Q3_K) go through `gguf.quants`.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
# Output elements per chunk: torch's intra-op grain size, so every op runs on the calling thread. A
# fork/join of the OpenMP pool per op costs far more than it gains on a small machine that runs other
# work too (2 busy cores: the whole default model took 4-18 s in larger chunks, 0.8 s in these).
_CHUNK_ELEMENTS = 1 << 15


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Two bytes per block ([blocks, 2] uint8) read as a float16 scale, widened to float32 [blocks, 1]."""
    return col.contiguous().view(torch.float16).float()


_SHIFTS = {step: torch.arange(0, 8, step, dtype=torch.uint8).view(1, 1, -1, 1) for step in (1, 2, 4)}


def _fields(packed: torch.Tensor, groups: int, width: int, step: int) -> torch.Tensor:
    """Unpack `step`-bit fields, lowest bits first: [blocks, groups * width] -> [blocks, groups, 8 // step, width]."""
    fields = packed.reshape(packed.shape[0], groups, 1, width) >> _SHIFTS[step]
    return fields & ((1 << step) - 1)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(b[:, 2:].view(torch.int8), _f16(b[:, :2]), out=out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _fields(b[:, 2:], 1, 16, 4).reshape(b.shape[0], 32).view(torch.int8) - 8
    torch.mul(_f16(b[:, :2]), q, out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _fields(b[:, 4:], 1, 16, 4).reshape(b.shape[0], 32)
    torch.add(_f16(b[:, :2]) * q, _f16(b[:, 2:4]), out=out)


def _q5(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values 0..31 [blocks, 32]: nibbles from `qs`, bit i of the little-endian uint32 `qh` on top."""
    n = qs.shape[0]
    return _fields(qs, 1, 16, 4).reshape(n, 32) | (_fields(qh, 4, 1, 1).reshape(n, 32) << 4)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_f16(b[:, :2]), _q5(b[:, 6:], b[:, 2:6]).view(torch.int8) - 16, out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.add(_f16(b[:, :2]) * _q5(b[:, 8:], b[:, 4:8]), _f16(b[:, 2:4]), out=out)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the sub-block scales d * sc and offsets dmin * m, float32 [blocks, 8, 1] each.

    Eight 6-bit scales and eight 6-bit mins are packed in the 12 bytes after d and dmin."""
    s = b[:, 4:16]
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return (_f16(b[:, :2]) * sc).unsqueeze(-1), (_f16(b[:, 2:4]) * mn).unsqueeze(-1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d, dm = _k_scales(b)
    q = _fields(b[:, 16:], 4, 32, 4).reshape(b.shape[0], 8, 32)
    torch.sub(d * q, dm, out=out.view(-1, 8, 32))


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d, dm = _k_scales(b)
    q = _fields(b[:, 48:], 4, 32, 4).reshape(n, 8, 32) | (_fields(b[:, 16:48], 1, 32, 1).reshape(n, 8, 32) << 4)
    torch.sub(d * q, dm, out=out.view(-1, 8, 32))


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    q = _fields(b[:, :128], 2, 64, 4).reshape(n, 8, 32) | (_fields(b[:, 128:192], 2, 32, 2).reshape(n, 8, 32) << 4)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)
    torch.mul(d, q.view(torch.int8).reshape(n, 16, 16) - 32, out=out.view(-1, 16, 16))


_BLOCK_DEQUANT: dict[Q, Callable[[torch.Tensor, torch.Tensor], None]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a quantized tensor (`data`: its bytes, uint8 [..., row bytes]) as `dtype` of `shape`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    fn = _BLOCK_DEQUANT.get(qtype)
    if fn is None:
        values = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape)
        return values if dtype == torch.float32 else values.to(dtype)
    blocks = torch.from_numpy(data).reshape(-1, type_size)
    out = torch.empty(blocks.shape[0] * block_size, dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        fn(chunk, out[start * block_size:(start + chunk.shape[0]) * block_size].view(chunk.shape[0], block_size))
    return out.view(shape)


# --- exact repacking --------------------------------------------------------------------------------
# Formats whose values are code * d + m with one (d, m) per 32 weights: the codes, scales and minimums
# such that the float32 value code * d + m equals the format's own dequantization (Q4_K/Q5_K: up to the
# rounding of their 16-bit sub-block products d * sc and dmin * min to float16).

def _neg_multiple(d: torch.Tensor, k: int) -> torch.Tensor:
    return (d.float() * -k).half()


def _codes_q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = b[:, :2].contiguous().view(torch.float16)
    return (b[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8), d, _neg_multiple(d, 128)


def _codes_q4_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = b[:, :2].contiguous().view(torch.float16)
    return _fields(b[:, 2:], 1, 16, 4).reshape(b.shape[0], 32), d, _neg_multiple(d, 8)


def _codes_q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = b[:, :4].contiguous().view(torch.float16)
    return _fields(b[:, 4:], 1, 16, 4).reshape(b.shape[0], 32), dm[:, :1], dm[:, 1:]


def _codes_q5_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = b[:, :2].contiguous().view(torch.float16)
    return _q5(b[:, 6:], b[:, 2:6]), d, _neg_multiple(d, 16)


def _codes_q5_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = b[:, :4].contiguous().view(torch.float16)
    return _q5(b[:, 8:], b[:, 4:8]), dm[:, :1], dm[:, 1:]


def _codes_q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, dm = _k_scales(b)
    return _fields(b[:, 16:], 4, 32, 4).reshape(b.shape[0], 256), d.squeeze(-1).half(), (-dm.squeeze(-1)).half()


def _codes_q5_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dm = _k_scales(b)
    q = _fields(b[:, 48:], 4, 32, 4).reshape(n, 8, 32) | (_fields(b[:, 16:48], 1, 32, 1).reshape(n, 8, 32) << 4)
    return q.reshape(n, 256), d.squeeze(-1).half(), (-dm.squeeze(-1)).half()


_BLOCK_CODES: dict[Q, tuple[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {
    Q.Q4_0: (4, _codes_q4_0), Q.Q4_1: (4, _codes_q4_1), Q.Q4_K: (4, _codes_q4_k),
    Q.Q5_0: (5, _codes_q5_0), Q.Q5_1: (5, _codes_q5_1), Q.Q5_K: (5, _codes_q5_k), Q.Q8_0: (8, _codes_q8_0),
}


def code_bits(qtype: Q) -> int | None:
    """Bits of the codes of a format that `group_codes` reads (4, 5 or 8), else None."""
    entry = _BLOCK_CODES.get(qtype)
    return entry[0] if entry else None


def group_codes(data: np.ndarray, qtype: Q, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block-quantized matrix (`data`: its bytes) as codes uint8 [rows, K] and per-group-of-32 scales
    and minimums float16 [rows, K / 32], with value = code * scale + minimum."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, type_size)
    codes, d, m = _BLOCK_CODES[qtype][1](blocks)
    return codes.reshape(rows, -1), d.reshape(rows, -1), m.reshape(rows, -1)
