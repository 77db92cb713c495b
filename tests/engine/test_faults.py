"""Faults inside the engine reach only the requests they hit (tokenloom.faults): a forward pass that fails for
one request's batch fails that request alone, after the engine retries the batch request by request; a
transient failure (one step) loses nothing; a KV allocation that fails ends its request with an error; the
others' outputs equal a run without faults, and every KV block comes back."""

from __future__ import annotations

import pytest

from tokenloom import LLM, SamplingParams, faults

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
MARK = 77  # a token id only the faulted prompt holds
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.05)


@pytest.fixture(autouse=True)
def _disarmed():
    faults.disarm()
    yield
    faults.disarm()


def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], str | None]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("site", ["forward", "kv_allocate"])
def test_a_fault_fails_only_the_request_it_hits(llm, site):
    clean = _run(llm, PROMPTS)
    faults.arm(faults.Fault(site, token=MARK))
    hit = [*PROMPTS[:2], [*PROMPTS[2], MARK], PROMPTS[3]]
    outs = llm.generate([{"prompt_token_ids": p} for p in hit], GREEDY, use_tqdm=False)
    got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    assert got[2][1] == "error" and "injected fault" in str(outs[2].outputs[0].stop_reason)
    assert [got[i] for i in (0, 1, 3)] == [clean[i] for i in (0, 1, 3)]
    assert llm.engine.kv.pool.num_free == llm.engine.kv.num_blocks


def test_a_transient_forward_fault_loses_nothing(llm):
    clean = _run(llm, PROMPTS)
    faults.arm(faults.Fault("forward", step=3))
    assert _run(llm, PROMPTS) == clean
    assert llm.engine.kv.pool.num_free == llm.engine.kv.num_blocks


def test_faults_are_armed_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENLOOM_FAULTS", '[{"site": "tokenize", "text": "BOOM"}]')
    faults.arm_from_env()
    faults.hit("tokenize", text="fine")
    with pytest.raises(faults.InjectedFault, match="BOOM"):
        faults.hit("tokenize", text="a BOOM b")
    with pytest.raises(ValueError, match="site"):
        faults.Fault("nowhere")
