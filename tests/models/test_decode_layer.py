"""Decode steps through one native call per decoder layer (models/layers/fused_decode.py) give the module
path's outputs bit for bit, for every decoder architecture that names its parts, each weight format and each
instruction-set level; a layer whose modules are swapped (a LoRA wrapper) goes back to the module path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenloom import LLM, SamplingParams
from tokenloom.models import llama, ops

# Prompts past the sliding window (24) once decoded, of different lengths: per-row positions and windows.
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 31, 8], [11, 12, 13], list(range(40, 70)), [200, 3]]
PARAMS = SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True)


def _generate(path: str, quantization: str) -> tuple[list, LLM]:
    llm = LLM(path, dtype="float32", kv_cache_gib=0.01, quantization=quantization)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs], llm


@pytest.fixture
def layer_calls(monkeypatch) -> list[int]:
    """Counts native layer calls."""
    calls = [0]
    real = ops.decode_layer

    def counted(*args):
        calls[0] += 1
        return real(*args)
    monkeypatch.setattr(ops, "decode_layer", counted)
    return calls


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_fused_decode_equals_the_module_path(kernels, arch, quantization, tiny_models, monkeypatch, layer_calls):
    fused, llm = _generate(str(tiny_models[arch]), quantization)
    layers = llm.engine.loaded.model.config.num_hidden_layers
    # Every level above portable has the few-rows kernels of each format (portable: the module path only).
    if ops.level_in_use() == "portable":
        assert layer_calls[0] == 0
    else:
        assert layer_calls[0] >= layers * (PARAMS.max_tokens - 1)
    monkeypatch.setattr(llama, "run_fused_decode", lambda *args: None)
    plain, _ = _generate(str(tiny_models[arch]), quantization)
    assert fused == plain


class _Wrapper(nn.Module):
    """A stand-in for a LoRA wrapper: the same product through a module the fused path does not know."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_swapped_module_sends_the_step_back_to_the_modules(tiny_models, layer_calls):
    if ops.level_in_use() in ("portable", "torch"):
        pytest.skip("no fused decode at this level")
    want, llm = _generate(str(tiny_models["gemma3"]), "int4")
    assert layer_calls[0] > 0
    mlp = llm.engine.loaded.model.model.layers[1].mlp
    mlp.down_proj = _Wrapper(mlp.down_proj)
    layer_calls[0] = 0
    got = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
           for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert layer_calls[0] == 0 and got == want
    mlp.down_proj = mlp.down_proj.inner  # the original module again: fused once more
    llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    assert layer_calls[0] > 0
