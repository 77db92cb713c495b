"""Our native models against transformers on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ARCHITECTURES
from tokenloom import SamplingParams
from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.request import Request
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.llm import LLM

PROMPT_LENGTHS = (5, 40, 17, 1, 64)


def _prompts(n_vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, n_vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def engines(tiny_models):
    """One fp32 LLM per architecture, shared by this module's tests."""
    return {name: LLM(str(path), dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=96)
            for name, path in tiny_models.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers_for_a_packed_batch(arch, engines, tiny_models, hf_reference):
    llm = engines[arch]
    model = llm.engine.loaded.model
    runner = ModelRunner(model, num_blocks=32, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    prompts = _prompts(model.config.vocab_size)
    requests, next_block = [], 0
    for i, p in enumerate(prompts):
        r = Request(str(i), p, SamplingParams())
        blocks = -(-len(p) // 16)
        r.block_ids = list(range(next_block, next_block + blocks))
        next_block += blocks
        requests.append(r)
    batch = runner._prepare(SchedulerOutput(requests, [len(p) for p in prompts]))
    with torch.inference_mode():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, batch.meta))
    hf = hf_reference(tiny_models[arch])
    # The runner packs multi-token prompts first, then single-token ones.
    packed = sorted(prompts, key=lambda p: len(p) == 1)
    offset = 0
    for p in packed:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        diff = (logits[offset:offset + len(p)] - ref).abs().max().item()
        assert diff <= 1e-4, f"{arch}: prompt of {len(p)} tokens differs by {diff}"
        offset += len(p)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_matches_transformers(arch, engines, tiny_models, hf_reference):
    llm = engines[arch]
    prompts = _prompts(llm.engine.vocab_size, seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = hf_reference(tiny_models[arch])
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref, f"{arch}: prompt of {len(p)} tokens"
        assert out.outputs[0].finish_reason == "length"
