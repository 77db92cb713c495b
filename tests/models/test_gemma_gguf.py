"""The real embedded default model (Gemma 3 270M, GGUF Q4_K_M) against transformers reading the same file."""

from __future__ import annotations

import math

import pytest
import torch

from tests.models.conftest import LEVELS
from tokenloom import SamplingParams
from tokenloom.llm import LLM
from tokenloom.loader.sources import resolve_model
from tokenloom.models import ops

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def ours() -> LLM:
    return LLM("gemma-3-270m", dtype="float32", quantization="none", kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def reference():
    """transformers dequantizes the GGUF to fp32 (about 45 s): loaded once for this module."""
    from transformers import AutoModelForCausalLM

    path = resolve_model("gemma-3-270m").path
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_continuations_match_transformers(ours, reference):
    outs = ours.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([out.prompt_token_ids])
        ref = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt
        assert out.outputs[0].text == ours.get_tokenizer().decode(ref)


def test_logits_match_transformers(ours, reference):
    prompt = ours.get_tokenizer().encode(PROMPTS[2])
    out = ours.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                        use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), -1)
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(),
                                                                             abs=1e-3)


def test_batch_invariance_on_the_real_model(ours):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in ours.generate(PROMPTS * 4, params, use_tqdm=False)]
    alone = [ours.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone * 4


PERPLEXITY_TEXT = (
    "The printing press, developed by Johannes Gutenberg around 1440, changed how knowledge spread across Europe. "
    "Before it, books were copied by hand, which made them rare and expensive. Movable metal type let printers "
    "produce hundreds of identical pages a day, and within fifty years millions of books were in circulation. "
    "Literacy rose, scientific results could be checked by readers in distant cities, and the religious and "
    "political debates of the following century were fought with pamphlets as much as with sermons. Historians "
    "still argue about how much of the scientific revolution depended on cheap, accurate copies of texts.")


def test_perplexity_matches_transformers(ours, reference):
    from tokenloom.evaluation import perplexity, sliding_windows

    ids = ours.get_tokenizer().encode(PERPLEXITY_TEXT)
    got = perplexity(ours, PERPLEXITY_TEXT, window=64, stride=40)
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in sliding_windows(len(ids), 64, 40):
            logp = torch.log_softmax(reference(torch.tensor([ids[begin:end]])).logits[0].float(), -1)
            nll -= sum(logp[pos - begin - 1, ids[pos]].item() for pos in range(first, end))
            count += end - first
    assert got.num_tokens == count == len(ids) - 1 and got.num_windows > 2
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=0.005)


# Scored at whole-prompt steps (the dense GEMM over dequantized weights) and at 4-token steps (the decode kernels).
STEP_TOKENS = [None, 4]
GUARD_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed "
              "a system of movable metal type in Mainz. His press made books cheaper to produce, and within a few "
              "decades printing shops had opened in most major European cities. " + PERPLEXITY_TEXT)
GREEDY_PROMPTS = PROMPTS + ["The main causes of the First World War were", "To make a cup of tea, first",
                            "import numpy as np\n", "Q: What is 12 times 7?\nA:"]


def _variant(variant: str, step_tokens: int | None) -> LLM:
    kwargs = {"dtype": variant, "quantization": "none"} if variant in ("bfloat16", "float32") else {
        "dtype": "float32", "quantization": variant}
    if step_tokens:
        kwargs["max_num_batched_tokens"] = step_tokens
    return LLM("gemma-3-270m", kv_cache_gib=0.25, **kwargs)


# The best instruction-set level at both step sizes; the lower ones (an AVX-512 machine also runs AVX2 and
# portable) at 4-token steps, where their kernels run (whole-prompt steps are torch's GEMM at every level),
# for the quantized formats (their kernels differ most between levels; CI's time is bounded).
BEST = LEVELS[-1] if LEVELS else "torch"
GUARDS = [("bfloat16", 0.01), ("int8", 0.01), ("int4", 0.05)]
# The portable level has no vectorised group-quantized kernel: every step multiplies the dequantized matrices,
# so its steps are 32 tokens (chunked prefill over cached context, its norm and RoPE kernels; 8x fewer
# dequantizations of the whole model than 4-token steps, ~30 s less of CI a case).
GUARD_CASES = ([(v, b, BEST, step) for v, b in GUARDS for step in STEP_TOKENS]
               + [(v, b, lvl, 32 if lvl == "portable" else 4) for v, b in GUARDS[1:] for lvl in LEVELS[:-1]])


@pytest.mark.parametrize("variant,bound,level,step_tokens", GUARD_CASES)
def test_perplexity_stays_within_the_bounds_of_fp32(ours, variant, bound, level, step_tokens):
    """Issue 4's accuracy guards on a fixed text (165 tokens). Measured 2026-11-25 against fp32 (16.99), at
    whole-prompt / 4-token steps: bf16 -0.16% / +0.50% (the latter through the VDPBF16PS decode kernel);
    int8 +0.24% (the file's blocks repacked exactly at 8 bits, activations unrounded; only the Q6_K
    half of ffn_down is re-fitted); int4 -0.6% / -0.9% (Q4_K and Q5_0 blocks kept exactly at 4 and 5 bits;
    the Q8_0/Q6_K tensors, LM head included, fitted at 4 bits; int8 activations in the decode kernel).
    Re-fitting the Q5_0 layers at 4 bits, as before, cost +24% on this text's first sentence."""
    from tokenloom.evaluation import perplexity

    want = perplexity(ours, GUARD_TEXT).perplexity
    with ops.use_level(level):
        llm = _variant(variant, step_tokens)
        got = perplexity(llm, GUARD_TEXT).perplexity
    assert abs(got / want - 1) <= bound, (variant, want, got)
    if variant != "bfloat16":
        assert llm.engine.loaded.weight_bytes < ours.engine.loaded.weight_bytes


GREEDY_CASES = [(BEST, step) for step in STEP_TOKENS] + ([("avx2", 4)] if "avx2" in LEVELS[:-1] else [])


@pytest.mark.parametrize("level,step_tokens", GREEDY_CASES)
def test_int8_greedy_outputs_agree_with_fp32(ours, level, step_tokens):
    if level == "torch":  # TOKENLOOM_KERNELS=0: measured 2026-12-02, "import numpy as np" flips at token 10
        pytest.skip("greedy equality is a property of the kernels' int8 arithmetic; the torch path meets a near-tie")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in ours.generate(GREEDY_PROMPTS, params, use_tqdm=False)]
    with ops.use_level(level):
        got = [o.outputs[0].token_ids for o in _variant("int8", step_tokens).generate(GREEDY_PROMPTS, params,
                                                                                       use_tqdm=False)]
    assert got == want
