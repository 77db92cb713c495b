"""Engine behaviour end to end on a tiny model: batching, prefix cache, preemption, sampling, errors."""

from __future__ import annotations

import pytest
import torch

from tokenloom import SamplingParams
from tokenloom.engine.llm_engine import InvalidRequestError
from tokenloom.llm import LLM
from tokenloom.sampling_params import SamplingParamsError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def mixed_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 90, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture(scope="module")
def gemma_path(tiny_models):
    return str(tiny_models["gemma3"])


@pytest.fixture(scope="module")
def llm(gemma_path):
    return LLM(gemma_path, dtype="float32", kv_cache_gib=0.02, max_num_batched_tokens=128)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_invariance_of_greedy_outputs(llm):
    prompts = mixed_prompts(16, llm.engine.vocab_size)
    together = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    alone = [token_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert together == alone


def test_prefix_cache_hits_and_output_equals_uncached(llm, gemma_path):
    vocab = llm.engine.vocab_size
    shared = mixed_prompts(1, vocab, seed=3)[0] * 2 + list(range(3, 70))
    first, second = shared + [5, 6, 7], shared + [9, 10]
    llm.generate([first], GREEDY, use_tqdm=False)
    hits_before = llm.engine.stats().prefix_cache_hits
    cached = llm.generate([second], GREEDY, use_tqdm=False)[0]
    assert llm.engine.stats().prefix_cache_hits - hits_before >= (len(shared) // 16) * 16
    assert cached.num_cached_tokens >= (len(shared) // 16) * 16
    uncached_llm = LLM(gemma_path, dtype="float32", kv_cache_gib=0.02, enable_prefix_caching=False)
    uncached = uncached_llm.generate([second], GREEDY, use_tqdm=False)[0]
    assert uncached_llm.engine.stats().prefix_cache_hits == 0
    assert cached.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_a_continuation_copies_the_partial_block_and_equals_uncached(llm, gemma_path):
    prompt = mixed_prompts(1, llm.engine.vocab_size, seed=11)[0][:37]  # 2 full blocks + 5 slots
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    follow = prompt + first.outputs[0].token_ids  # the same sequence, one token longer
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    cached = llm.generate([follow], params, use_tqdm=False)[0]
    assert cached.num_cached_tokens == len(follow) - 1  # 32 from full blocks, 5 copied from the partial one
    uncached = LLM(gemma_path, dtype="float32", kv_cache_gib=0.02, enable_prefix_caching=False)
    want = uncached.generate([follow], params, use_tqdm=False)[0].outputs[0]
    assert cached.outputs[0].token_ids == want.token_ids
    for got, ref in zip(cached.outputs[0].logprobs, want.logprobs):
        assert {t: e.logprob for t, e in got.items()} == pytest.approx({t: e.logprob for t, e in ref.items()},
                                                                       abs=1e-5)


def test_preemption_keeps_greedy_outputs(llm, gemma_path):
    prompts = mixed_prompts(12, llm.engine.vocab_size, seed=5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = token_ids(llm.generate(prompts, params, use_tqdm=False))
    block_bytes = 3 * 2 * 2 * 16 * 16 * 4  # layers × (k, v) × kv heads × head dim × block × fp32
    small = LLM(gemma_path, dtype="float32", kv_cache_gib=24 * block_bytes / 2**30)
    assert small.engine.kv.num_blocks == 24
    assert token_ids(small.generate(prompts, params, use_tqdm=False)) == reference
    assert small.engine.stats().num_preemptions > 0


def test_same_seed_same_text_and_different_seeds_differ(llm):
    prompt = mixed_prompts(1, llm.engine.vocab_size, seed=7)[0]
    params = [SamplingParams(temperature=1.0, max_tokens=16, seed=s, ignore_eos=True) for s in (1, 1, 2)]
    a, b, c = token_ids(llm.generate([prompt] * 3, params, use_tqdm=False))
    assert a == b and a != c
    alone = token_ids(llm.generate([prompt], params[0], use_tqdm=False))[0]
    assert alone == a


def test_top_k_1_equals_greedy(llm):
    prompts = mixed_prompts(3, llm.engine.vocab_size, seed=8)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=16, ignore_eos=True, seed=0)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert token_ids(llm.generate(prompts, top1, use_tqdm=False)) == \
        token_ids(llm.generate(prompts, greedy, use_tqdm=False))


def test_logprobs_equal_log_softmax_of_reference_logits(llm, tiny_models, hf_reference):
    prompt = mixed_prompts(1, llm.engine.vocab_size, seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    seq = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_reference(tiny_models["gemma3"])(torch.tensor([seq])).logits[0].float(), -1)
    for step, (token, lps) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert len(lps) >= 5 and token in lps
        assert abs(lps[token].logprob - row[token].item()) < 1e-4
        top = torch.topk(row, 5).indices.tolist()
        assert set(top) <= set(lps)
        assert lps[top[0]].rank == 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[pos][prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
    expected_cum = sum(lps[t].logprob for t, lps in zip(completion.token_ids, completion.logprobs))
    assert completion.cumulative_logprob == pytest.approx(expected_cum)


def test_logit_bias_forces_a_token_and_penalties_change_output(llm):
    prompt = mixed_prompts(1, llm.engine.vocab_size, seed=10)[0]
    forced = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   logit_bias={42: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [42] * 5
    plain = token_ids(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                   use_tqdm=False))[0]
    penalised = token_ids(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                frequency_penalty=2.0), use_tqdm=False))[0]
    # A strong frequency penalty must reduce repetition relative to plain greedy decoding.
    assert len(set(penalised)) > len(set(plain)) or plain != penalised


def test_n_returns_n_completions(llm):
    prompt = mixed_prompts(1, llm.engine.vocab_size, seed=11)[0]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_strings_and_text_prompts(llm):
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0]
    text = out.outputs[0].text
    assert out.prompt == "Hello world" and text
    stop = text[3:6]
    stopped = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                         stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.text == text[:text.index(stop)] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop


def test_outputs_keep_input_order_and_token_id_prompts(llm):
    prompts = mixed_prompts(5, llm.engine.vocab_size, seed=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts


def test_bad_inputs_give_clear_errors(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="context length"):
        llm.generate([[5] * 600], GREEDY, use_tqdm=False)
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[5, 10**6]], GREEDY, use_tqdm=False)


def test_bad_request_among_good_ones_fails_alone(llm):
    engine = llm.engine
    good = mixed_prompts(3, engine.vocab_size, seed=13)
    expected = token_ids(llm.generate(good, GREEDY, use_tqdm=False))
    engine.add_request("g0", good[0], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [1] * 10_000, GREEDY)
    engine.add_request("g1", good[1], GREEDY)
    engine.add_request("g2", good[2], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[k].outputs[0].token_ids for k in ("g0", "g1", "g2")] == expected


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("x", [5] * 40, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    engine.abort_request("x")
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0


def test_a_request_that_breaks_execution_fails_alone(llm, monkeypatch):
    engine = llm.engine
    good = mixed_prompts(3, engine.vocab_size, seed=14)
    expected = token_ids(llm.generate(good, GREEDY, use_tqdm=False))
    real_sampler = engine.runner.sampler

    def poisoned(logits, requests, *masks):
        if any(r.request_id == "poison" for r in requests):
            raise RuntimeError("kernel blew up")
        return real_sampler(logits, requests, *masks)

    monkeypatch.setattr(engine.runner, "sampler", poisoned)
    for i, p in enumerate(good):
        engine.add_request(f"g{i}", p, GREEDY)
    engine.add_request("poison", good[0], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["poison"].outputs[0].finish_reason == "error"
    assert "kernel blew up" in done["poison"].outputs[0].stop_reason
    assert [done[f"g{i}"].outputs[0].token_ids for i in range(3)] == expected
    assert engine.stats().kv_cache_usage == 0
