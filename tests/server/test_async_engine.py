"""AsyncEngine in-process: validation before streaming, n > 1 deltas, abort, a failing step, limits, drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.server.conftest import offline
from tokenloom import SamplingParams
from tokenloom.config import EngineConfig
from tokenloom.engine.async_engine import AsyncEngine, RequestAbortedError, ServerBusyError
from tokenloom.engine.llm_engine import InvalidRequestError, LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_path):
    async_engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(
        model=tiny_path, dtype="float32", kv_cache_gib=0.05, num_threads=1)), max_waiting=64)
    yield async_engine
    async_engine.shutdown()
    assert not async_engine.is_alive


async def collect(engine: AsyncEngine, rid: str, prompt, params: SamplingParams) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    async for out in await engine.add_request(rid, prompt, params):
        for c in out.outputs:
            tokens.setdefault(c.index, []).extend(c.token_ids)
    return tokens


def wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0:
            return
        time.sleep(0.01)
    pytest.fail(f"engine not idle: {engine.stats()}")


def test_outputs_equal_offline_including_n_greater_than_one(engine, tiny_llm):
    ids = tiny_llm.get_tokenizer().encode("Hello world")
    ref = offline(tiny_llm, "generate", [ids], GREEDY)[0].outputs[0].token_ids
    got = asyncio.run(collect(engine, "a", ids, SamplingParams(temperature=0, max_tokens=12, n=3)))
    assert got == {0: ref, 1: ref, 2: ref}  # siblings finishing in the same step each keep their last token


def test_validation_errors_are_raised_before_any_output(engine):
    async def run() -> None:
        with pytest.raises(InvalidRequestError, match="token ids"):
            await engine.add_request("bad", [10**6], GREEDY)
        with pytest.raises(InvalidRequestError, match="empty"):
            await engine.add_request("bad", [], GREEDY)
    asyncio.run(run())
    assert asyncio.run(collect(engine, "ok", [5, 6, 7], GREEDY))[0]


def test_abort_frees_blocks_at_once(engine):
    ended = []
    engine.listeners.append(ended.append)

    async def run() -> None:
        stream = await engine.add_request("long", [5, 6, 7], SamplingParams(max_tokens=480, ignore_eos=True))
        await stream.__anext__()
        stream.abort()
    try:
        asyncio.run(run())
        wait_idle(engine)
    finally:
        engine.listeners.remove(ended.append)
    assert len(ended) == 1, ended
    assert ended[0].finish_reason == "abort" and 0 < ended[0].num_output_tokens < 480, ended
    assert ended[0].first_token is not None and ended[0].num_prompt_tokens == 3


def test_loop_survives_a_failing_step(engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", flaky_step)
    with pytest.raises(RequestAbortedError, match="injected failure"):
        asyncio.run(collect(engine, "victim", [5, 6, 7], GREEDY))
    wait_idle(engine)
    monkeypatch.undo()
    assert engine.is_alive and len(asyncio.run(collect(engine, "after", [5, 6, 7], GREEDY))[0]) == 12


def test_full_waiting_queue_refuses(engine):
    engine.max_waiting = 0
    try:
        with pytest.raises(ServerBusyError, match="waiting queue is full"):
            asyncio.run(collect(engine, "busy", [5, 6], GREEDY))
    finally:
        engine.max_waiting = 64


def test_drain_lets_short_requests_finish_and_aborts_the_rest(tiny_path):
    drained = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(
        model=tiny_path, dtype="float32", kv_cache_gib=0.05, num_threads=1, max_num_seqs=1)))

    async def run() -> tuple[list, BaseException | None]:
        short = asyncio.create_task(collect(drained, "short", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True)))
        long = [asyncio.create_task(collect(drained, f"long{i}", [5, 6], SamplingParams(max_tokens=480,
                                                                                          ignore_eos=True)))
                for i in range(8)]
        await asyncio.sleep(0.05)
        drained.begin_drain(0.3)
        with pytest.raises(ServerBusyError, match="shutting down"):
            await drained.add_request("late", [5], GREEDY)
        results = await asyncio.gather(short, *long, return_exceptions=True)
        return results
    try:
        started = time.monotonic()
        results = asyncio.run(run())
        assert time.monotonic() - started < 5
        assert results[0] == {0: results[0][0]} and len(results[0][0]) == 8
        assert any(isinstance(r, RequestAbortedError) for r in results[1:])
        wait_idle(drained)
    finally:
        drained.shutdown()
