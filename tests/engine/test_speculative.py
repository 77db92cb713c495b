"""Speculative decoding: exact greedy outputs, the target's sampling distribution, every block back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ARCHITECTURES
from tests.engine.test_engine import mixed_prompts, token_ids
from tokenloom import SamplingParams
from tokenloom.config import ConfigError, EngineConfig
from tokenloom.engine.speculative import accepted_prefix, ngram_proposal
from tokenloom.llm import LLM


def repetitive_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts made of a few repeated phrases, so that prompt lookup finds matches (and misses)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        phrases = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(3)]
        order = torch.randint(0, 3, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        prompts.append([t for i in order for t in phrases[i]])
    return prompts


def test_ngram_proposal_takes_the_longest_most_recent_match():
    t = np.array([5, 6, 7, 8, 1, 6, 7, 9, 5, 6, 7])
    assert ngram_proposal(t, 2, 4, 3) == [8, 1, 6]  # 5 6 7 matched (3 tokens) beats the later 6 7
    assert ngram_proposal(t, 4, 4, 3) == []  # no 4-token match
    assert ngram_proposal(np.array([1, 2, 1, 2, 1, 2]), 2, 3, 2) == [1, 2]  # the most recent match
    assert ngram_proposal(np.array([1, 2, 3]), 1, 3, 4) == []
    assert ngram_proposal(np.array([4, 4]), 1, 2, 5) == [4]  # the continuation may run into the suffix


def test_accepted_prefix_stops_at_the_first_miss():
    assert accepted_prefix([7], []) == [7]
    assert accepted_prefix([1, 2, 3], [1, 2]) == [1, 2, 3]  # all accepted, plus the model's next
    assert accepted_prefix([1, 5, 3], [1, 2]) == [1, 5]  # second guess wrong: the model's token replaces it
    assert accepted_prefix([4, 2, 3], [1, 2]) == [4]


def test_config_checks_and_vllm_shape():
    config = EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                          "prompt_lookup_max": 5})
    sp = config.speculative_config
    assert (sp.speculative_method, sp.num_speculative_tokens, sp.prompt_lookup_max) == ("ngram", 3, 5)
    with pytest.raises(ConfigError, match="speculative_method"):
        EngineConfig.from_kwargs(speculative_method="eagle")
    with pytest.raises(ConfigError, match="unknown key.*'draft_tensor_parallel_size'"):
        EngineConfig.from_kwargs(speculative_config={"method": "ngram", "draft_tensor_parallel_size": 1})
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        EngineConfig.from_kwargs(speculative_method="ngram", prompt_lookup_min=4, prompt_lookup_max=2)


@pytest.fixture(scope="module")
def gemma_path(tiny_models):
    return str(tiny_models["gemma3"])


def _spec(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", speculative_method="ngram", speculative_max_batch=0, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_outputs_equal_decoding_without_speculation(tiny_models, arch):
    path = str(tiny_models[arch])
    prompts = repetitive_prompts(6, 300, seed=1) + mixed_prompts(2, 300, seed=2)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    reference = token_ids(LLM(path, dtype="float32").generate(prompts, params, use_tqdm=False))
    spec = _spec(path)
    assert token_ids(spec.generate(prompts, params, use_tqdm=False)) == reference
    stats = spec.engine.stats().speculative
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0  # it did speculate, and some guesses held
    assert spec.engine.kv.usage == 0.0


def test_greedy_equal_with_penalties_logprobs_stops_and_preemption(gemma_path):
    prompts = repetitive_prompts(10, 300, seed=3)
    plain = LLM(gemma_path, dtype="float32")
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.4, presence_penalty=0.2, logit_bias={7: 3.0}),
              SamplingParams(temperature=0, max_tokens=40, logprobs=2, min_tokens=12),
              SamplingParams(temperature=0, max_tokens=40, stop=["e"], ignore_eos=True)] * 3
    params = params[:len(prompts)]
    reference = plain.generate(prompts, params, use_tqdm=False)
    block_bytes = 3 * 2 * 2 * 16 * 16 * 4  # layers × (k, v) × kv heads × head dim × block × fp32
    small = _spec(gemma_path, kv_cache_gib=12 * block_bytes / 2**30)
    got = small.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(reference)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in reference]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in reference]
    for a, b in zip(got, reference):
        if b.outputs[0].logprobs is not None:
            assert len(a.outputs[0].logprobs) == len(b.outputs[0].logprobs)
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.keys() == y.keys()
                assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.stats().speculative.num_accepted_tokens > 0
    assert small.engine.kv.usage == 0.0


def test_every_block_is_free_after_many_rejections(gemma_path):
    spec = _spec(gemma_path, num_speculative_tokens=8, prompt_lookup_min=1, prompt_lookup_max=1)
    prompts = mixed_prompts(16, 300, seed=4)
    spec.generate(prompts, SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, seed=0),
                  use_tqdm=False)
    stats = spec.engine.stats().speculative
    assert stats.num_draft_tokens - stats.num_accepted_tokens > 100  # many guesses rejected
    assert spec.engine.kv.usage == 0.0
    assert spec.engine.kv.pool.num_free == spec.engine.kv.num_blocks


def test_n_children_each_speculate_and_match(gemma_path):
    prompt = repetitive_prompts(1, 300, seed=6)[0]
    params = SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True)
    reference = LLM(gemma_path, dtype="float32").generate([prompt], params, use_tqdm=False)[0]
    got = _spec(gemma_path).generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in reference.outputs]


def _top_k_distribution(output, k: int) -> dict[int, float]:
    """The top-k sampling distribution (temperature 1) at a position, from its raw top-k logprobs."""
    entries = sorted(output.items(), key=lambda kv: -kv[1].logprob)[:k]
    weights = torch.tensor([lp.logprob for _, lp in entries]).softmax(0)
    return {t: float(w) for (t, _), w in zip(entries, weights)}


def test_sampled_tokens_follow_the_target_distribution(gemma_path, monkeypatch):
    """Guesses that are often wrong (a fixed, plausible token) must leave the joint distribution of the first
    two generated tokens exactly the target's: a chi-square test over the top-4 × top-4 cells."""
    k, samples = 4, 2000
    prompt = mixed_prompts(1, 300, seed=11)[0]
    plain = LLM(gemma_path, dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=1, logprobs=k)
    first = _top_k_distribution(plain.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].logprobs[0], k)
    second = {t: _top_k_distribution(plain.generate([prompt + [t]], greedy, use_tqdm=False)[0]
                                     .outputs[0].logprobs[0], k) for t in first}
    likely = max(first, key=first.get)
    guess = sorted(second[likely], key=second[likely].get)[-2]  # the runner-up after the likeliest first token
    monkeypatch.setattr("tokenloom.engine.speculative.ngram_proposal", lambda tokens, lo, hi, n: [guess] * n)
    spec = _spec(gemma_path, num_speculative_tokens=2)
    params = [SamplingParams(temperature=1.0, top_k=k, max_tokens=3, ignore_eos=True, seed=s)
              for s in range(samples)]
    outs = spec.generate([prompt] * samples, params, use_tqdm=False)
    stats = spec.engine.stats().speculative
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # guesses both accepted and rejected
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        pair = tuple(o.outputs[0].token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
    expected = {(a, b): samples * pa * pb for a, pa in first.items() for b, pb in second[a].items()}
    assert set(counts) <= set(expected)  # nothing outside the top-k support
    chi2 = sum((counts.get(cell, 0) - e) ** 2 / e for cell, e in expected.items())
    df = len(expected) - 1
    p_value = 1 - float(torch.special.gammainc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, (chi2, df, counts, expected)


def test_constrained_requests_speculate_and_match(tiny_models):
    """A grammar's masks at each guess come from the matcher advanced over the guesses and rolled back: greedy
    outputs equal decoding without speculation, and the outputs still validate."""
    from tokenloom.sampling_params import StructuredOutputsParams

    path = str(tiny_models["llama"])
    schema = {"type": "array", "minItems": 3, "maxItems": 6,
              "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                         "size": {"type": "integer"}},
                        "required": ["name", "size"], "additionalProperties": False}}
    params = [SamplingParams(temperature=0, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0, max_tokens=40,
                             structured_outputs=StructuredOutputsParams(regex=r"(ab|cd){3,12}e"))]
    prompts = ["[", "x"]
    reference = LLM(path, dtype="float32").generate(prompts, params, use_tqdm=False)
    spec = _spec(path)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(reference)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in reference]
    stats = spec.engine.stats().speculative
    assert stats.num_accepted_tokens > 0
    assert spec.engine.kv.usage == 0.0


@pytest.fixture(scope="module")
def gemma() -> LLM:
    """gemma-3-270m, dense float32 (answers that do not move with the CPU's kernels)."""
    return LLM("gemma-3-270m", dtype="float32", quantization="none", kv_cache_gib=0.25)


def _speculating(llm: LLM, drafter=None, **options) -> LLM:
    """The same engine with speculation switched on (the target's weights loaded once)."""
    from tokenloom.config import SpeculativeConfig
    from tokenloom.engine.speculative import Speculator

    engine = llm.engine
    method = "ngram" if drafter is None else "self"
    engine.speculator = engine.scheduler.speculator = Speculator(
        SpeculativeConfig(**{"speculative_method": method, "speculative_max_batch": 0, **options}),
        engine.max_model_len, drafter)
    return llm


def _no_speculation(llm: LLM) -> LLM:
    llm.engine.speculator = llm.engine.scheduler.speculator = None
    return llm


def test_gemma_greedy_with_prompt_lookup_equals_without(gemma):
    source = Path(__file__).read_text()[:900]
    prompts = [f"Here is a Python file:\n{source}\nThe same file, copied exactly:\n",
               "The quick brown fox jumps over the lazy dog. The quick brown fox",
               "List the days of the week: Monday, Tuesday,"]
    params = SamplingParams(temperature=0, max_tokens=96, stop=["\n\n\n"])
    reference = _no_speculation(gemma).generate(prompts, params, use_tqdm=False)
    try:
        got = _speculating(gemma).generate(prompts, params, use_tqdm=False)
        stats = gemma.engine.stats().speculative
    finally:
        _no_speculation(gemma)
    assert token_ids(got) == token_ids(reference)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in reference]
    assert stats.mean_accepted_length > 1.5  # copying a given text: most guesses hold


@pytest.mark.parametrize("draft_arch", ["llama", "gemma3"])
def test_a_draft_model_guesses_and_outputs_stay_exact(tiny_models, draft_arch):
    """The target drafting for itself accepts (nearly) every guess, which only a draft cache kept in step with the
    request's tokens achieves; an unrelated draft (another tiny architecture with the same tokenizer) is mostly
    wrong, and the outputs equal decoding without speculation either way."""
    target = str(tiny_models["llama"])
    prompts = repetitive_prompts(4, 300, seed=12) + mixed_prompts(4, 300, seed=13)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = token_ids(LLM(target, dtype="float32").generate(prompts, params, use_tqdm=False))
    spec = LLM(target, dtype="float32", speculative_method="draft", speculative_model=str(tiny_models[draft_arch]),
               num_speculative_tokens=4, speculative_max_batch=0)
    assert token_ids(spec.generate(prompts, params, use_tqdm=False)) == reference
    stats = spec.engine.stats().speculative
    assert stats.num_drafts > 0
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    assert rate > 0.95 if draft_arch == "llama" else rate < 0.5, rate
    assert spec.engine.kv.pool.num_free == spec.engine.kv.num_blocks


def test_self_speculation_drafts_with_4_bit_weights(tiny_models):
    target = str(tiny_models["qwen3"])
    prompts = mixed_prompts(6, 300, seed=14)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    reference = token_ids(LLM(target, dtype="float32").generate(prompts, params, use_tqdm=False))
    spec = LLM(target, dtype="float32", quantization="none", speculative_method="self", speculative_max_batch=0)
    assert spec.engine.speculator.drafter.loaded.quantization == "int4"
    assert token_ids(spec.generate(prompts, params, use_tqdm=False)) == reference
    stats = spec.engine.stats().speculative
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.5  # a 4-bit copy mostly agrees


def test_a_draft_model_across_preemption_and_sampling(tiny_models):
    target = str(tiny_models["llama"])
    prompts = mixed_prompts(10, 300, seed=15)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = token_ids(LLM(target, dtype="float32").generate(prompts, params, use_tqdm=False))
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4 * 2  # (target + draft) × layers × (k, v) × kv heads × head dim × block
    spec = LLM(target, dtype="float32", speculative_method="draft", speculative_model=target,
               speculative_max_batch=0, kv_cache_gib=16 * block_bytes / 2**30)
    assert spec.engine.kv.num_blocks == 16
    assert token_ids(spec.generate(prompts, params, use_tqdm=False)) == reference
    assert spec.engine.stats().num_preemptions > 0
    stats = spec.engine.stats().speculative
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.95  # the draft restarts cleanly after each
    sampled = spec.generate(prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=3), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in sampled)
    assert spec.engine.kv.pool.num_free == spec.engine.kv.num_blocks


def test_draft_options_are_checked(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="speculative_model"):
        EngineConfig.from_kwargs(speculative_method="draft")
    with pytest.raises(ConfigError, match="speculative_model"):
        EngineConfig.from_kwargs(speculative_method="ngram", speculative_model="x")
    assert EngineConfig.from_kwargs(speculative_config={"model": "x"}).speculative_config.speculative_method == \
        "draft"
    with pytest.raises(ConfigError, match="cannot load draft model"):
        LLM(str(tiny_models["llama"]), speculative_method="draft", speculative_model=str(tmp_path / "missing"))


def test_gemma_greedy_with_self_speculation_equals_without(gemma):
    """gemma-3-270m's own weights at 4 bits (the GGUF's blocks repacked) draft for its float32 self."""
    import dataclasses

    from tokenloom.engine.draft_model import DraftModelProposer
    from tokenloom.loader import load_model

    engine = gemma.engine
    draft = load_model(dataclasses.replace(engine.config.model_config, quantization="int4"), engine.device)
    drafter = DraftModelProposer(draft, engine.kv.num_blocks, engine.kv.block_size, torch.float32, engine.device,
                                 engine.vocab_size)
    prompts = ["The capital of France is", "Once upon a time, there was a little fox who",
               "def fibonacci(n):\n    "]
    params = SamplingParams(temperature=0, max_tokens=48)
    reference = _no_speculation(gemma).generate(prompts, params, use_tqdm=False)
    try:
        got = _speculating(gemma, drafter).generate(prompts, params, use_tqdm=False)
        stats = gemma.engine.stats().speculative
    finally:
        _no_speculation(gemma)
    assert token_ids(got) == token_ids(reference)
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.6, stats  # a 4-bit copy mostly agrees


def test_speculation_pauses_above_its_batch_limit(tiny_models):
    from tokenloom.config import SpeculativeConfig
    from tokenloom.engine.speculative import NGRAM_MAX_BATCH_TILED, Speculator
    from tokenloom.models import ops

    # The limit follows the target's layout: a row-tiled target (quantized, avx2) pauses ngram early, a dense one
    # (bound by reading its weights) keeps the per-method default.
    assert Speculator(SpeculativeConfig("ngram"), 512, tiled_target=True).max_batch == NGRAM_MAX_BATCH_TILED
    assert Speculator(SpeculativeConfig("ngram"), 512).max_batch == 64
    for quantization, tiled in (("none", False), ("int4", ops.tiled_layers())):
        engine = LLM(str(tiny_models["llama"]), dtype="float32", quantization=quantization, kv_cache_gib=0.01,
                     speculative_method="ngram").engine
        assert engine.speculator.tiled_target == tiled
        assert engine.speculator.max_batch == (NGRAM_MAX_BATCH_TILED if tiled else 64)
    assert Speculator(SpeculativeConfig("self"), 512).max_batch == 2
    assert Speculator(SpeculativeConfig("ngram", speculative_max_batch=5), 512).max_batch == 5
    never = Speculator(SpeculativeConfig("ngram", speculative_max_batch=0), 512)
    assert never.active(1000)
    spec = LLM(str(tiny_models["llama"]), dtype="float32", speculative_method="ngram", speculative_max_batch=2)
    seen = []
    propose = spec.engine.speculator.propose
    spec.engine.speculator.propose = lambda request, budget: seen.append(len(spec.engine.scheduler.running)) or \
        propose(request, budget)
    params = [SamplingParams(temperature=0, max_tokens=8 * (i + 1), ignore_eos=True) for i in range(6)]
    spec.generate(repetitive_prompts(6, 300, seed=16), params, use_tqdm=False)
    assert seen and max(seen) <= 2  # guesses only in steps with at most two requests running
