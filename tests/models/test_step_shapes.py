"""A server's steps multiply a few dozen GEMM shapes, not one per token count: torch keeps a oneDNN kernel and
its buffers per shape, so unbounded shapes were memory that grew for hours (issue 17, docs/reliability.md)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tokenloom import SamplingParams
from tokenloom.llm import LLM
from tokenloom.models.layers.attention import PagedAttention, chunk_mask
from tokenloom.models.layers.linear import bucketed_linear, shape_bucket


def test_buckets_cover_every_size_with_little_padding_and_few_sizes():
    sizes = {shape_bucket(n) for n in range(1, 4097)}
    for n in range(1, 4097):
        bucket = shape_bucket(n)
        assert bucket >= n
        assert bucket == n if n <= 16 else bucket % 16 == 0
        assert bucket - n < 16 or bucket <= 1.125 * n
    assert len(sizes) == 16 + 7 + 8 * 5  # 1..16, 32..128 by 16, then eight per doubling up to 4096


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bucketed_linear_pads_only_onednn_products_and_returns_the_rows_asked(monkeypatch, dtype):
    seen = []
    linear = F.linear

    def spy(x, weight, bias=None):
        seen.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype)
    for rows in (3, 17, 130, 458):
        x = torch.randn(rows, 64, dtype=dtype)
        out = bucketed_linear(x, weight, bias)
        assert out.shape == (rows, 48)
        torch.testing.assert_close(out.float(), linear(x, weight, bias).float(), atol=2e-2, rtol=1e-2)
    assert seen == ([3, 32, 144, 480] if dtype == torch.bfloat16 else [3, 17, 130, 458])


def test_padded_prefill_attention_equals_the_unpadded_product():
    torch.manual_seed(0)
    attn = PagedAttention(num_heads=4, num_kv_heads=2, head_dim=32, scale=32 ** -0.5)
    for length, context in ((19, 0), (37, 50), (130, 3)):
        keys = length + context
        q = torch.randn(length, 4, 32, dtype=torch.bfloat16)
        k, v = torch.randn(keys, 2, 32, dtype=torch.bfloat16), torch.randn(keys, 2, 32, dtype=torch.bfloat16)
        mask = chunk_mask(length, context, None, q.device)
        got = attn._prefill_matmul(q, k, v, mask)
        scores = torch.einsum("lhd,khd->hlk", q.float(), k.float().repeat_interleave(2, dim=1)) * 32 ** -0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        want = torch.einsum("hlk,khd->lhd", probs, v.float().repeat_interleave(2, dim=1))
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_bf16_engine_creates_onednn_kernels_only_for_bucketed_shapes(tiny_models, capfd):
    """Prompts of every length from 17 to 90 tokens: every oneDNN matmul that a step creates has its rows
    (and an attention product's keys) at a bucket size."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    llm = LLM(str(tiny_models["gemma3"]), dtype="bfloat16", kv_cache_gib=0.05, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, temperature=0)
    created = _created_matmuls(capfd, lambda: [llm.generate([list(range(3, 3 + length))], params, use_tqdm=False)
                                               for length in range(17, 91)])
    if not created:
        pytest.skip("this CPU's bf16 products do not go through oneDNN")
    sizes = {int(n) for shape in created for n in re.findall(r"\d+", shape.split(":")[0])[-2:]}
    assert all(n <= 16 or n == shape_bucket(n) for n in sizes), sorted(sizes)
    assert len(created) < 74, "a kernel per prompt length"


def _created_matmuls(capfd, run) -> list[str]:
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        run()
    return [line.split(",")[-2] for line in capfd.readouterr().out.splitlines()
            if "create:cache_miss" in line and ",matmul," in line]


def test_a_bf16_encoder_pads_its_batches_with_sequences_of_its_own(capfd):
    """all-MiniLM-L6-v2 in bf16: batches of 1..10 sentences run at bucketed token counts (filler sequences
    after the real ones), and each sentence's embedding is the same as alone and close to float32's."""
    from tests.encoder_models import SENTENCES, minilm_path

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    reference = [torch.tensor(e.embedding) for e in LLM(str(minilm_path()), dtype="float32").embed(SENTENCES)]
    llm = LLM(str(minilm_path()), dtype="bfloat16")
    batches = []
    created = _created_matmuls(capfd, lambda: batches.extend(llm.embed(SENTENCES[:k]) for k in range(1, 11)))
    if not created:
        pytest.skip("this CPU's bf16 products do not go through oneDNN")
    rows = {int(shape.split("x")[0]) for shape in created if shape.endswith("x1536") or shape.endswith("x384")}
    assert rows and all(n <= 16 or n == shape_bucket(n) for n in rows), sorted(rows)
    for k, batch in enumerate(batches, start=1):
        for i, out in enumerate(batch):
            got = torch.tensor(out.embedding)
            assert torch.cosine_similarity(got, reference[i], dim=0) > 0.995, (k, i)
            assert torch.cosine_similarity(got, torch.tensor(batches[i][i].embedding), dim=0) > 0.999, (k, i)
