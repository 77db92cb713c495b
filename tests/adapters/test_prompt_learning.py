"""Soft prompts and prefixes (PEFT's prompt tuning, P-tuning and prefix tuning) served as virtual tokens, with
PEFT as the oracle: our greedy tokens are PEFT's argmax at every step and our log-probabilities its own; a
batch mixing them with LoRAs and the base model gives each request its output alone; prefixes are computed
once and shared through the cache, never across adapters; chunked prefill and preemption change nothing."""

from __future__ import annotations

import json

import pytest

from tests.adapters.peft_lora import save_peft_lora
from tests.adapters.peft_prompt import METHODS, peft_logprobs, save_peft_prompt
from tests.adapters.test_lora import ARCHS, PROMPTS
from tokenloom import AdapterRequest, SamplingParams
from tokenloom.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def prompt_adapters(tiny_models, tmp_path_factory):
    """(arch, method) → (folder, PeftModel) of a random adapter saved by PEFT."""
    root = tmp_path_factory.mktemp("prompt")
    return {(arch, m): (root / f"{arch}-{m}", save_peft_prompt(tiny_models[arch], root / f"{arch}-{m}", m, 7))
            for arch in ARCHS for m in METHODS}


def _llm(path, **kw):
    return LLM(str(path), dtype="float32", kv_cache_gib=0.01, enable_adapters=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logprobs_equal_peft(arch, tiny_models, prompt_adapters):
    llm = _llm(tiny_models[arch])
    for method in METHODS:
        path, peft_model = prompt_adapters[(arch, method)]
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=AdapterRequest(method, path))
        for prompt, out in zip(PROMPTS, outs):
            got = out.outputs[0]
            want = peft_logprobs(peft_model, prompt + got.token_ids)[len(prompt) - 1:-1]
            assert got.token_ids == want.argmax(-1).tolist(), f"{arch} {method}"
            ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
            theirs = [want[i, t].item() for i, t in enumerate(got.token_ids)]
            assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4, f"{arch} {method}"
            assert out.prompt_token_ids == prompt  # the virtual tokens stay inside the engine


def test_prompt_logprobs_score_the_real_tokens_after_the_virtual_ones(tiny_models, prompt_adapters):
    llm = _llm(tiny_models["llama"])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for method in ("prompt-tuning", "prefix-tuning"):
        path, peft_model = prompt_adapters[("llama", method)]
        out = llm.generate([PROMPTS[0]], params, use_tqdm=False, adapter=AdapterRequest(method, path))[0]
        assert len(out.prompt_logprobs) == len(PROMPTS[0]) and out.prompt_logprobs[0] is None
        want = peft_logprobs(peft_model, PROMPTS[0])
        for i, (lp, t) in enumerate(zip(out.prompt_logprobs[1:], PROMPTS[0][1:])):
            assert abs(lp[t].logprob - want[i, t].item()) <= 1e-4


def test_a_batch_mixing_soft_prompts_prefixes_loras_and_the_base_equals_each_alone(tiny_models, prompt_adapters,
                                                                                   tmp_path):
    save_peft_lora(tiny_models["llama"], tmp_path / "lora", 3, 4, "llama")
    requests = [AdapterRequest(m, prompt_adapters[("llama", m)][0]) for m in METHODS]
    requests += [AdapterRequest("lora", tmp_path / "lora"), None]
    prompts = [PROMPTS[i % 3] for i in range(len(requests))] * 2
    requests = requests * 2
    llm = _llm(tiny_models["llama"], max_adapters=4)
    together = llm.generate(prompts, GREEDY, use_tqdm=False, adapter=requests)
    alone = [llm.generate([p], GREEDY, use_tqdm=False, adapter=a)[0] for p, a in zip(prompts, requests)]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert len({tuple(o.outputs[0].token_ids) for o in together[:5]}) >= 4  # the adapters do differ


def test_chunked_prefill_and_preemption_change_nothing(tiny_models, prompt_adapters):
    """Virtual tokens split across chunks (a 6-token budget), and requests preempted for want of blocks."""
    reqs = [AdapterRequest(m, prompt_adapters[("llama", m)][0]) for m in METHODS]
    prompts = [list(range(3, 30 + 7 * i)) for i in range(6)]
    adapters = [reqs[i % 3] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in _llm(tiny_models["llama"]).generate(prompts, params, use_tqdm=False,
                                                                               adapter=adapters)]
    small = _llm(tiny_models["llama"], max_num_batched_tokens=6, enable_chunked_prefill=True)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False, adapter=adapters)] == want
    tight = LLM(str(tiny_models["llama"]), dtype="float32", enable_adapters=True, kv_cache_gib=12 * 16 * 512 / 2**30)
    assert tight.engine.kv.num_blocks == 12
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False, adapter=adapters)] == want
    assert tight.engine.scheduler.num_preemptions > 0


def test_a_prefix_is_computed_once_and_shared_never_across_adapters(tiny_models, tmp_path):
    """A 20-token prefix fills a block: the second request with it (another prompt) finds that block cached;
    a soft prompt of the same length, or the base model, never does."""
    pre, soft = tmp_path / "pre", tmp_path / "soft"
    save_peft_prompt(tiny_models["llama"], pre, "prefix-tuning", 1, num_virtual_tokens=20)
    save_peft_prompt(tiny_models["llama"], soft, "prompt-tuning", 1, num_virtual_tokens=20)
    llm = _llm(tiny_models["llama"])
    hits = lambda: llm.engine.stats().prefix_cache_hits  # noqa: E731
    llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False, adapter=AdapterRequest("pre", pre))
    before = hits()
    llm.generate([[50, 51, 52]], GREEDY, use_tqdm=False, adapter=AdapterRequest("soft", soft))
    llm.generate([[50, 51, 52]], GREEDY, use_tqdm=False)
    assert hits() == before
    shared = llm.generate([[50, 51, 52]], GREEDY, use_tqdm=False, adapter=AdapterRequest("pre", pre))[0]
    assert hits() == before + 16 and shared.num_cached_tokens == 0  # the cached block held virtual tokens only
    fresh = _llm(tiny_models["llama"]).generate([[50, 51, 52]], GREEDY, use_tqdm=False,
                                                 adapter=AdapterRequest("pre", pre))[0]
    assert fresh.outputs[0].token_ids == shared.outputs[0].token_ids


def test_bad_prompt_adapters_fail_alone_naming_the_file(tiny_models, prompt_adapters, tmp_path):
    import shutil

    llm = _llm(tiny_models["llama"])
    other = prompt_adapters[("gemma3", "prefix-tuning")][0]  # gemma3's prefix: other layers and heads
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: prompt_embeddings is \(5, 192\); this model "
                                         r"needs \(5, 128\), virtual tokens x \(layers 2 x 2 x kv heads 2"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=AdapterRequest("other", other))
    bad = tmp_path / "bad"
    shutil.copytree(prompt_adapters[("llama", "prompt-tuning")][0], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 0}))
    with pytest.raises(ValueError, match=r"adapter_config.json: num_virtual_tokens must be a positive integer"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=AdapterRequest("bad", bad))
    (bad / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 6}))
    with pytest.raises(ValueError, match=r"prompt_embeddings is \(5, 64\); this model needs \(6, 64\)"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=AdapterRequest("bad2", bad))
    good = AdapterRequest("ok", prompt_adapters[("llama", "prompt-tuning")][0])
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=good)[0].outputs[0].token_ids
    # The virtual tokens count in the context: a prompt that fits alone may not fit behind them.
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"prompt has {limit} tokens"):
        llm.generate([[7] * (limit - 5)], SamplingParams(max_tokens=1), use_tqdm=False, adapter=good)


def test_beam_search_runs_under_an_adapter(tiny_models, prompt_adapters):
    """One beam is greedy decoding: under a prefix or soft prompt it gives the adapter's greedy tokens, and
    wider beams score their hypotheses with the adapter too (not the base model's)."""
    from tokenloom import BeamSearchParams

    llm = _llm(tiny_models["llama"])
    for method in ("prompt-tuning", "prefix-tuning"):
        adapter = AdapterRequest(method, prompt_adapters[("llama", method)][0])
        greedy = llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=adapter)
        beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True), adapter)
        assert [b.sequences[0].token_ids for b in beams] == [g.outputs[0].token_ids for g in greedy]
        wide = llm.beam_search(PROMPTS[:1], BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True), adapter)
        base = llm.beam_search(PROMPTS[:1], BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
        assert [s.cumulative_logprob for s in wide[0].sequences] != [s.cumulative_logprob for s in base[0].sequences]
