"""Beam search equals transformers' `generate(num_beams=k, do_sample=False)`: the same hypotheses in the same
order with the same scores, across length penalties and stopping rules, with EOS ids the model emits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenloom import BeamSearchParams
from tokenloom.engine.beam_search import beam_search, run_beam_search
from tokenloom.sampling_params import SamplingParamsError

PROMPTS = [[5, 17, 42, 99, 7], [11, 12, 13], list(range(3, 40))]


@pytest.fixture(scope="module")
def eos_model(tiny_models, tmp_path_factory):
    """The tiny Llama with two extra EOS ids among the tokens it likes to emit, so hypotheses do end early."""
    from tokenloom.llm import LLM

    path = tmp_path_factory.mktemp("beam") / "llama"
    shutil.copytree(tiny_models["llama"], path)
    probe = LLM(str(path), dtype="float32", kv_cache_gib=0.02)
    beams = run_beam_search(probe.engine, PROMPTS, BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True))
    counts: dict[int, int] = {}
    for out in beams:
        for seq in out.sequences:
            for t in seq.token_ids[1:]:
                counts[t] = counts.get(t, 0) + 1
    frequent = sorted(counts, key=lambda t: -counts[t])[:2]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, *frequent], "pad_token_id": 0}))
    del probe
    return path


@pytest.fixture(scope="module")
def engines(eos_model):
    from transformers import AutoModelForCausalLM

    from tokenloom.llm import LLM

    ours = LLM(str(eos_model), dtype="float32", kv_cache_gib=0.05)
    ref = AutoModelForCausalLM.from_pretrained(eos_model, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, ref


@pytest.mark.parametrize("width,length_penalty,early_stopping,max_tokens", [
    (2, 1.0, False, 12), (3, 1.0, True, 10), (4, 0.0, "never", 8), (3, 2.0, False, 12), (2, -1.0, "never", 9)])
def test_beam_search_equals_transformers(engines, width, length_penalty, early_stopping, max_tokens):
    ours, ref = engines
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outputs = run_beam_search(ours.engine, PROMPTS, params)
    ended_early = 0
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                               max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                               return_dict_in_generate=True, output_scores=True, pad_token_id=0)
        eos = set(ref.generation_config.eos_token_id)
        want = [_cut_at_eos(row[len(prompt):].tolist(), eos) for row in gen.sequences]
        assert [s.token_ids for s in out.sequences] == want
        assert [s.score for s in out.sequences] == pytest.approx(gen.sequences_scores.tolist(), abs=1e-4)
        ended_early += sum(s.finish_reason == "stop" for s in out.sequences)
        assert all(s.text == ours.get_tokenizer().decode(s.token_ids) for s in out.sequences)
    if length_penalty <= 1.0:  # a strong length reward keeps short (EOS-ended) hypotheses out of the top ones
        assert ended_early  # the EOS paths were exercised


def test_beams_reuse_their_parents_blocks(engines):
    ours, _ = engines
    prompt = [(7 * i) % 300 + 3 for i in range(150)]  # long and new to the cache
    before = ours.engine.stats()
    run_beam_search(ours.engine, [prompt], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    after = ours.engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    # Step 1 computes the prompt; at each later step every beam finds its parent's full blocks in the prefix
    # cache and a copy of its parent's partly filled last block (copy-on-write), so it computes one token.
    steps = [150 + t for t in range(6)]
    assert queries == steps[0] + 3 * sum(steps[1:])
    assert hits == 3 * sum(n - 1 for n in steps[1:])


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """transformers pads shorter hypotheses after their EOS; cut there."""
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens


def test_a_hand_built_case():
    """Two steps over a fixed table of next-token logprobs, worked out by hand."""
    table = {(): {1: -0.1, 2: -0.5, 3: -3.0, 9: -4.0},
             (1,): {9: -0.2, 4: -0.3, 5: -2.0, 6: -3.0}, (2,): {9: -0.05, 7: -1.0, 8: -1.5, 6: -3.0},
             (1, 4): {5: -0.1, 6: -0.2, 7: -0.3, 8: -0.4}, (2, 7): {5: -0.1, 6: -0.2, 7: -0.3, 8: -0.4}}

    def expand(seqs, k):
        return [dict(sorted(table[tuple(s[1:])].items(), key=lambda kv: -kv[1])[:k]) for s in seqs]

    out = beam_search([[0]], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0), frozenset({9}),
                      expand)[0]
    # K = 4. Step 1: beams (1) -0.1 and (2) -0.5 (EOS 9 ranks 4th: not a hypothesis). Step 2's best four:
    # (1,9) -0.3, (1,4) -0.4, (2,9) -0.55, (2,7) -1.5; only (1,9) ends within the first two ranks: finished
    # at -0.3/2; (2,9) ranks 3rd and is dropped; (1,4) and (2,7) run on. Step 3 reaches max_tokens: the
    # first two, (1,4,5) -0.5/3 and (1,4,6) -0.6/3, compete with (1,9) -0.15 for the two slots.
    assert [s.token_ids for s in out.sequences] == [[1, 9], [1, 4, 5]]
    assert [s.score for s in out.sequences] == pytest.approx([-0.15, -0.5 / 3])


def test_the_offline_api_takes_text_prompts(engines):
    ours, _ = engines
    params = BeamSearchParams(beam_width=2, max_tokens=5)
    text = ours.get_tokenizer().decode(PROMPTS[1])
    by_text = ours.beam_search(text, params)[0]
    assert by_text.prompt_token_ids == ours.get_tokenizer().encode(text)
    assert [s.token_ids for s in by_text.sequences] == \
        [s.token_ids for s in ours.beam_search([by_text.prompt_token_ids], params)[0].sequences]


def test_bad_beam_parameters_are_named(engines):
    ours, _ = engines
    with pytest.raises(SamplingParamsError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(SamplingParamsError, match="early_stopping must be true, false or 'never'"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
    with pytest.raises(SamplingParamsError, match="needs the top 24 log-probabilities"):
        run_beam_search(ours.engine, PROMPTS[:1], BeamSearchParams(beam_width=6, max_tokens=4))
    with pytest.raises(ValueError, match="prompt 0: 3 prompt tokens plus max_tokens=600 exceed"):
        run_beam_search(ours.engine, [[11, 12, 13]], BeamSearchParams(beam_width=2, max_tokens=600))
