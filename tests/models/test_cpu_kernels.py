"""Native CPU kernels against their torch-ops paths: paged decode attention (scattered block tables), RMSNorm,
the fused residual/norm and q/k/v kernels, and whole models with the kernels off."""

from __future__ import annotations

import pytest
import torch

from tokenloom.models import ops
from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("heads,kv_heads,window,dim", [(4, 1, None, 32), (4, 2, 24, 32), (6, 6, None, 32),
                                                       (8, 2, 5, 32), (4, 1, None, 256), (16, 2, None, 64),
                                                       (6, 2, None, 48)])
def test_kernel_matches_the_torch_path(kernels, dtype, tol, heads, kv_heads, window, dim):
    """dim 32/64/256 with groups of 1, 2, 4, 8 take the vectorised paths; 48 and a group of 3 the scalar one."""
    torch.manual_seed(heads * 10 + kv_heads)
    block_size, rows = 16, 7
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


def test_kernel_rejects_mismatched_inputs(kernels):
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
def test_rms_norm_kernel_matches_the_torch_path(kernels, dtype, tol, offset, shape):
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("normed_update", [False, True])
def test_add_rms_norm_kernel_matches_the_torch_path(kernels, dtype, tol, offset, normed_update):
    from tokenloom.models.layers.norm import RMSNorm

    torch.manual_seed(11)
    norms = [RMSNorm(64, 1e-6, offset=offset) for _ in range(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.add_(torch.randn(64) * 0.3)
    update_norm, norm = (n.to(dtype) for n in norms)
    residual, update = (torch.randn(5, 64) * 3).to(dtype), torch.randn(5, 64).to(dtype)
    got_residual, got_normed = kernels.add_rms_norm(residual, update, update_norm.weight if normed_update else None,
                                                    norm.weight, 1e-6, offset)
    want_residual = residual + (update_norm.reference(update) if normed_update else update)
    torch.testing.assert_close(got_residual.float(), want_residual.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_normed.float(), norm.reference(want_residual).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,qk_norm,offset", [(4, 1, True, 1.0), (4, 2, False, 0.0), (2, 2, True, 0.0)])
def test_qkv_rope_cache_kernel_matches_the_torch_path(kernels, dtype, tol, heads, kv_heads, qk_norm, offset):
    from tokenloom.models.layers.norm import RMSNorm
    from tokenloom.models.layers.rotary import RotaryEmbedding

    torch.manual_seed(heads + kv_heads)
    dim, tokens, block_size = 32, 6, 4
    rotary = RotaryEmbedding(dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    norms = [RMSNorm(dim, 1e-6, offset=offset) for _ in range(2)] if qk_norm else [None, None]
    for n in norms:
        if n is not None:
            with torch.no_grad():
                n.weight.add_(torch.randn(dim) * 0.3)
    q_norm, k_norm = (n.to(dtype) if n is not None else None for n in norms)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    positions = torch.tensor([0, 1, 2, 7, 30, 63])
    slots = torch.tensor([3, 0, 9, 14, 1, 5])
    caches = [torch.zeros(4, block_size, kv_heads, dim, dtype=dtype) for _ in range(2)]
    attn = PagedAttention(heads, kv_heads, dim, dim ** -0.5)
    attn.kv_cache = tuple(caches)
    meta = AttentionMetadata(slots, [], 0)
    q, k, v, cached = attn.project(qkv, positions, meta, rotary, q_norm, k_norm)
    assert cached
    with torch.no_grad():
        wq, wk, wv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        wq, wk = wq.reshape(tokens, heads, dim), wk.reshape(tokens, kv_heads, dim)
        if qk_norm:
            wq, wk = q_norm.reference(wq), k_norm.reference(wk)
        wq, wk = rotary(positions, wq, wk)
    for got, want in ((q, wq), (k, wk), (v, wv.reshape(tokens, kv_heads, dim))):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(caches[0].view(-1, kv_heads, dim)[slots], k, atol=0, rtol=0)
    torch.testing.assert_close(caches[1].view(-1, kv_heads, dim)[slots], v, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="slot 16 out of range"):
        attn.project(qkv, positions, AttentionMetadata(torch.tensor([0, 1, 2, 3, 4, 16]), [], 0), rotary,
                     q_norm, k_norm)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "mistral"])
def test_models_give_the_same_output_without_the_kernels(kernels, arch, tiny_models):
    """The torch-ops paths (other devices, no compiler) against the kernels of each level, through the
    whole engine."""
    from tokenloom import SamplingParams
    from tokenloom.llm import LLM

    prompts = [[5, 17, 42, 99, 7, 3, 25], [11, 12, 13], list(range(3, 40))]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, prompt_logprobs=0)

    def run() -> list:
        llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=16)
        return llm.generate(prompts, params, use_tqdm=False)

    fused = run()
    with ops.use_level("torch"):
        plain = run()
    for a, b in zip(fused, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = [lp[t].logprob for lp, t in zip(a.prompt_logprobs[1:], a.prompt_token_ids[1:])]
        want = [lp[t].logprob for lp, t in zip(b.prompt_logprobs[1:], b.prompt_token_ids[1:])]
        assert got == pytest.approx(want, abs=1e-4)



@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,window,dim", [(4, 1, None, 256), (8, 2, 5, 32), (6, 2, None, 48)])
def test_decode_kernel_reads_a_narrower_cache(kernels, cache_dtype, heads, kv_heads, window, dim):
    """float32 queries over a float16 / bfloat16 cache (kv_cache_dtype): the same answer as the torch path,
    which widens the gathered keys and values."""
    torch.manual_seed(dim)
    block_size, lens = 16, torch.tensor([1, 17, 40])
    table = torch.randperm(12)[:9].view(3, 3).contiguous()
    k_cache, v_cache = (torch.randn(12, block_size, kv_heads, dim).to(cache_dtype) for _ in range(2))
    q = torch.randn(3, heads, dim)
    attn = PagedAttention(heads, kv_heads, dim, dim ** -0.5, window)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [], 0, decode_block_table=table, decode_lens=lens,
                             block_size=block_size)
    want = attn._decode(q, meta, k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim))
    got = kernels.paged_decode_attention(q, k_cache, v_cache, table, lens, dim ** -0.5, window or 0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_qkv_kernel_writes_a_float16_cache_and_returns_what_it_holds(kernels):
    from tokenloom.models.layers.rotary import RotaryEmbedding

    torch.manual_seed(3)
    heads, kv_heads, dim = 4, 2, 32
    rotary = RotaryEmbedding(dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    qkv, positions, slots = torch.randn(5, (heads + 2 * kv_heads) * dim), torch.arange(5), torch.tensor([7, 0, 3, 9, 1])
    caches = [torch.zeros(4, 4, kv_heads, dim, dtype=torch.float16) for _ in range(2)]
    attn = PagedAttention(heads, kv_heads, dim, dim ** -0.5)
    attn.kv_cache = tuple(caches)
    q, k, v, cached = attn.project(qkv, positions, AttentionMetadata(slots, [], 0), rotary)
    assert cached and k.dtype == torch.float32
    assert torch.equal(caches[0].view(-1, kv_heads, dim)[slots].float(), k)  # the returned keys are the cached ones
    assert torch.equal(caches[1].view(-1, kv_heads, dim)[slots].float(), v)
    wq, wk, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    wq, wk = rotary(positions, wq.reshape(5, heads, dim), wk.reshape(5, kv_heads, dim))
    torch.testing.assert_close(q, wq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, wk, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_float16_cache_under_float32_activations(kernels, arch, tiny_models):
    """kv_cache_dtype=float16 halves the cache's bytes (twice the blocks in the same budget); outputs stay
    within float16 rounding of the float32 cache, and the kernels agree with the torch path."""
    from tokenloom import SamplingParams
    from tokenloom.llm import LLM

    prompts = [[5, 17, 42, 99, 7, 3, 25], [11, 12, 13], list(range(3, 40))]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, prompt_logprobs=0)

    def run(kv: str) -> tuple[list, int]:
        llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=16,
                  kv_cache_dtype=kv)
        return llm.generate(prompts, params, use_tqdm=False), llm.engine.kv.num_blocks

    wide, wide_blocks = run("auto")
    narrow, narrow_blocks = run("float16")
    assert narrow_blocks in (2 * wide_blocks, 2 * wide_blocks + 1)  # the same bytes, half a block each
    for a, b in zip(narrow, wide):
        got = [p[t].logprob for p, t in zip(a.prompt_logprobs[1:], a.prompt_token_ids[1:])]
        want = [p[t].logprob for p, t in zip(b.prompt_logprobs[1:], b.prompt_token_ids[1:])]
        assert max(abs(x - y) for x, y in zip(got, want)) < 2e-2
    with ops.use_level("torch"):
        plain, _ = run("float16")
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in narrow]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (37, 19), (640, 1536)])
def test_lora_kernel_adds_each_tokens_own_adapter(kernels, dtype, tol, in_features, out_features):
    """Slots of ranks 4, 0 (empty), 8 and 2, their columns writing all or part of the outputs (a fused
    layer's shards); tokens of every slot and of none (-1); widths off the vector size."""
    torch.manual_seed(in_features)
    ranks = [4, 0, 8, 2]
    k = sum(ranks)
    a = torch.randn(k, in_features).to(dtype)
    spans = [(0, out_features), (out_features // 3, out_features // 2), (1, out_features - 1)]
    cols, parts, start = [], [], 0
    for c in range(k):
        offset, width = spans[c % 3]
        cols.append((start, offset, width))
        parts.append(torch.randn(width).to(dtype))
        start += width
    b_flat, cols = torch.cat(parts), torch.tensor(cols)
    ranges = torch.tensor([[sum(ranks[:i]), sum(ranks[:i + 1])] for i in range(len(ranks))])
    slots = torch.tensor([0, -1, 2, 3, 1, 2, 0, -1, 3])
    x = torch.randn(len(slots), in_features).to(dtype)
    base = torch.randn(len(slots), out_features).to(dtype)
    want = base.float().clone()
    for t, s in enumerate(slots.tolist()):
        for c in range(*ranges[s].tolist()) if s >= 0 else ():
            st, offset, width = cols[c].tolist()
            want[t, offset:offset + width] += (x[t].float() @ a[c].float()) * b_flat[st:st + width].float()
    out = base.clone()
    kernels.lora_add(out, x, a, b_flat, cols, slots, ranges)
    assert torch.allclose(out.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    assert torch.equal(out[slots < 0], base[slots < 0]) and torch.equal(out[slots == 1], base[slots == 1])
    with pytest.raises(RuntimeError, match="reaches outside"):
        kernels.lora_add(out, x, a, b_flat[:-1], cols, slots, ranges)


@pytest.mark.parametrize("vocab", [262144, 1000, 77])
def test_token_bitmask_kernel_equals_unpacking_the_bits(kernels, vocab):
    """Whole-allowed, whole-forbidden and mixed words, a vocabulary that is not a multiple of 32 (the last
    word's spare bits), rows left alone, and a bitmask narrower than the logits (the rest forbidden)."""
    from tokenloom.structured.manager import apply_bitmask

    torch.manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, words), dtype=torch.int32)
    bitmask[0, ::3] = -1
    bitmask[0, 1::3] = 0
    bitmask[2] = -1
    logits = torch.randn(4, vocab)
    rows = [0, 2, 3]
    want = logits.clone()
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(4, -1)[:, :vocab].bool()
    want[rows] = want[rows].masked_fill(~bits[rows], float("-inf"))
    got = logits.clone()
    kernels.apply_token_bitmask(got, bitmask, torch.tensor(rows))
    assert torch.equal(got, want)
    with ops.use_level("torch"):
        fallback = logits.clone()
        apply_bitmask(fallback, bitmask, rows)
    assert torch.equal(fallback, want)
    narrow = logits.clone()
    kernels.apply_token_bitmask(narrow, bitmask[:, :words // 2].contiguous(), torch.tensor([1]))
    assert torch.isinf(narrow[1, 32 * (words // 2):]).all() and torch.equal(narrow[0], logits[0])


@pytest.mark.parametrize("vocab", [262144, 1000, 77])
def test_masked_argmax_equals_argmax_of_the_masked_logits(kernels, vocab):
    """Each row's argmax under its bitmask equals torch.argmax of the logits with the forbidden ones at -inf:
    runs of allowed words, forbidden and mixed words, ties (the first wins), a NaN (allowed: the first one;
    forbidden: ignored), a row whose allowed logits are all -inf or that allows nothing (0, as torch says),
    the last word's spare bits, a narrow bitmask, and unmasked rows in the same call."""
    torch.manual_seed(vocab)
    words = (vocab + 31) // 32
    rows = 9
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32)
    bitmask[0, ::3], bitmask[0, 1::3] = -1, 0
    bitmask[1] = -1
    bitmask[2] = 0
    bitmask[2, words // 2] = 0b1010  # two tokens
    bitmask[3] = 0  # nothing allowed
    bitmask[4, : words // 2] = -1
    logits = torch.randn(rows, vocab)
    logits[1, vocab // 3] = logits[1, vocab // 2] = 100.0  # a tie: the first
    logits[4, 5] = float("nan")  # allowed NaN
    logits[5, :] = float("-inf")  # allowed ones all -inf
    logits[6, 33] = 1e6  # a maximum that its mask may forbid
    logits[7, vocab - 1] = 1e6  # in the last word's spare bits when vocab % 32
    masked = [0, 1, 2, 3, 4, 5, 6, 7]
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(rows, -1)[:, :vocab].bool()
    want = logits.clone()
    want[masked] = want[masked].masked_fill(~bits[masked], float("-inf"))
    got = kernels.argmax_rows(logits, bitmask, torch.tensor(masked))
    assert got.tolist() == want.argmax(dim=-1).tolist()
    narrow = bitmask[:, : words // 2].contiguous()  # tokens past it are forbidden
    want_narrow = logits.clone()
    cut = torch.zeros_like(bits)
    cut[:, : 32 * (words // 2)] = bits[:, : 32 * (words // 2)]
    want_narrow[masked] = want_narrow[masked].masked_fill(~cut[masked], float("-inf"))
    assert kernels.argmax_rows(logits, narrow, torch.tensor(masked)).tolist() == want_narrow.argmax(dim=-1).tolist()
    from tokenloom.engine.sampler import greedy_argmax

    with ops.use_level("torch"):  # no kernel: the sampler masks, then takes the plain argmax
        assert greedy_argmax(logits.clone(), bitmask, masked).tolist() == want.argmax(dim=-1).tolist()
