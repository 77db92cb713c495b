"""The engine on CUDA with the same code as on CPU (skipped without a GPU; scripts/gpu_check.sh runs it on a
lent one): every tiny architecture in float32 and bfloat16 against transformers on the same GPU, and the
continuous batch against requests run alone."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import ARCHITECTURES
from tokenloom import SamplingParams
from tokenloom.llm import LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 17, 42, 99, 7, 3, 25], [11, 12, 13], list(range(3, 60)), [200]]
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}  # max |logprob difference| of the prompt tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_logprobs_match_transformers_on_cuda(arch, dtype, tiny_models, hf_reference):
    llm = LLM(str(tiny_models[arch]), dtype=str(dtype).removeprefix("torch."), device="cuda", kv_cache_gib=0.05)
    assert next(llm.engine.loaded.model.parameters()).device.type == "cuda"
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    hf = copy.deepcopy(hf_reference(tiny_models[arch])).to("cuda", dtype)  # the cached CPU oracle stays as it is
    for prompt, out in zip(PROMPTS, outs):
        if len(prompt) < 2:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0].float(), -1)
        got = [out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0]
        want = [ref[i - 1, t].item() for i, t in enumerate(prompt) if i > 0]
        assert got == pytest.approx(want, abs=TOLERANCE[dtype]), arch


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_batch_equals_requests_alone_on_cuda(arch, tiny_models):
    llm = LLM(str(tiny_models[arch]), dtype="float32", device="cuda", kv_cache_gib=0.05, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone
    cpu = LLM(str(tiny_models[arch]), dtype="float32", device="cpu", kv_cache_gib=0.05)
    assert together == [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params, use_tqdm=False)]
