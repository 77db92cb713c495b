"""Int8/int4 quantization: layer accuracy, batch invariance, and whole tiny models against their float selves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenloom import SamplingParams
from tokenloom.config import ConfigError
from tokenloom.llm import LLM
from tokenloom.models.layers.linear import MergedLinear
from tokenloom.models.layers.quantized import Int4Linear, Int8Linear, QuantizedLMHead, quantize_int4, quantize_model


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_the_float_layer(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(256, 96, bias=True).to(dtype)
    x = torch.randn(7, 256, dtype=dtype)
    got = Int8Linear(dense.weight, dense.bias)(x)
    assert got.dtype == dtype and got.shape == (7, 96)
    assert _relative_error(got, dense(x)) < 0.02


def test_int8_linear_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    layer = Int8Linear(torch.randn(64, 128), None)
    x = torch.randn(33, 128)
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(33)])
    assert torch.equal(together, alone)


def test_merged_linear_keeps_its_shards_when_quantized():
    merged = MergedLinear(32, {"q_proj": 16, "k_proj": 8, "v_proj": 8})
    nn.init.normal_(merged.weight)
    quantized = quantize_model(_Wrapper(merged), "int8").proj
    assert isinstance(quantized, Int8Linear)
    q, k, v = quantized.split(quantized(torch.randn(3, 32)))
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (16, 8, 8)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_lm_head_is_quantized_for_few_rows_and_dense_for_many(bits, tol):
    torch.manual_seed(2)
    dense = nn.Linear(64, 512, bias=False)
    head = QuantizedLMHead(dense, bits)
    few, many = torch.randn(2, 64), torch.randn(40, 64)
    assert _relative_error(head(few), dense(few)) < tol
    assert torch.equal(head(many), dense(many))


def test_int4_weights_dequantize_to_within_half_a_step():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    packed, scales_zeros = quantize_int4(w)
    eye = torch.eye(64)  # x = I reads the dequantized weight back out of the kernel
    deq = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, scales_zeros.float()).t()
    step = scales_zeros[..., 0].float().t().repeat_interleave(32, dim=1)  # [16, 64] scale of each weight
    assert ((deq - w).abs() <= step / 2 + 1e-2).all()


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int4_linear_is_close_to_the_float_layer(rows):
    torch.manual_seed(4)
    dense = nn.Linear(128, 48, bias=True)
    x = torch.randn(rows, 128)
    assert _relative_error(Int4Linear(dense.weight, dense.bias)(x), dense(x)) < 0.15


class _Wrapper(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.lm_head = nn.Linear(32, 10, bias=False)


@pytest.mark.parametrize("method,tol", [("int8", 0.03), ("int4", 0.3)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])  # untied; tied; Gemma norms; Conv1D
def test_quantized_model_logits_stay_close_to_float(arch, method, tol, tiny_models):
    prompts = [[5, 17, 42, 99, 7, 3, 250], [11, 12, 13]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    dense = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01)
    quant = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, quantization=method)
    assert quant.engine.loaded.weight_bytes < dense.engine.loaded.weight_bytes * 1.5
    layers = [m for m in quant.engine.loaded.model.modules() if isinstance(m, Int8Linear)]
    assert layers and isinstance(quant.engine.loaded.model.lm_head, QuantizedLMHead)
    assert all(isinstance(m, Int4Linear) == (method == "int4") for m in layers)
    for d, q in zip(dense.generate(prompts, params, use_tqdm=False), quant.generate(prompts, params, use_tqdm=False)):
        want = torch.tensor([lp[t].logprob for lp, t in zip(d.prompt_logprobs[1:], d.prompt_token_ids[1:])])
        got = torch.tensor([lp[t].logprob for lp, t in zip(q.prompt_logprobs[1:], q.prompt_token_ids[1:])])
        assert (got - want).abs().max() < tol, f"{arch}: prompt logprobs moved by {(got - want).abs().max()}"


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="quantization must be one of"):
        LLM("gemma-3-270m", quantization="int3")
