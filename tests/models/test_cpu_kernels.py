"""Native CPU kernels against their torch-ops paths: paged decode attention (scattered block tables), RMSNorm."""

from __future__ import annotations

import pytest
import torch

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.kernels import cpu_kernels

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ compiler: the kernel could not be built")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 1, None), (4, 2, 24), (6, 6, None), (8, 2, 5)])
def test_kernel_matches_the_torch_path(dtype, tol, heads, kv_heads, window):
    torch.manual_seed(heads * 10 + kv_heads)
    dim, block_size, rows = 32, 16, 7
    lens = torch.tensor([1, 2, 15, 16, 17, 40, 95])
    max_blocks = -(-int(lens.max()) // block_size)
    num_blocks = rows * max_blocks + 3
    table = torch.randperm(num_blocks)[:rows * max_blocks].view(rows, max_blocks).contiguous()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    q = torch.randn(rows, heads, dim).to(dtype)
    attn = PagedAttention(heads, kv_heads, dim, dim ** -0.5, window)
    attn.kv_cache = (k_cache, v_cache)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [], 0, decode_block_table=table, decode_lens=lens,
                             block_size=block_size)
    want = attn._decode(q, meta, k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim))
    got = kernels.paged_decode_attention(q, k_cache, v_cache, table, lens, dim ** -0.5, window or 0)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_rejects_mismatched_inputs():
    q = torch.randn(2, 4, 32)
    cache = torch.randn(4, 16, 1, 32)
    table, lens = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        kernels.paged_decode_attention(q.bfloat16(), cache, cache, table, lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="int64 indices"):
        kernels.paged_decode_attention(q, cache, cache, table.int(), lens, 1.0, 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 640), (5, 3, 32), (300, 64)])
def test_rms_norm_kernel_matches_the_torch_path(dtype, tol, offset, shape):
    from tokenloom.models.layers.norm import RMSNorm

    torch.manual_seed(len(shape))
    norm = RMSNorm(shape[-1], 1e-6, offset=offset)
    with torch.no_grad():
        norm.weight.add_(torch.randn(shape[-1]) * 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(*shape) * 4).to(dtype)
    got = kernels.rms_norm(x, norm.weight, norm.eps, norm.offset)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), norm.reference(x).float(), atol=tol, rtol=tol)
    strided = torch.randn(shape[0], 2 * shape[-1]).to(dtype)[:, shape[-1]:]  # a view, as after a split
    torch.testing.assert_close(kernels.rms_norm(strided, norm.weight, norm.eps, norm.offset).float(),
                               norm.reference(strided).float(), atol=tol, rtol=tol)
