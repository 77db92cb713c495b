"""ModelManager: on-demand loads, the memory budget with LRU eviction, keep-alive, one load per model
however many callers, and failures that stay with their own model."""

from __future__ import annotations

import threading
import time

import pytest

from tokenloom import SamplingParams
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.model_runner import kv_bytes_per_block
from tokenloom.manager import (
    MemoryBudgetError,
    ModelLoadError,
    ModelManager,
    ModelSpec,
    ModelState,
    UnknownModelError,
    _build_engine,
    engine_bytes,
)

OPTIONS = {"dtype": "float32", "kv_cache_gib": 0.01}
PROMPTS = [[5, 17, 42, 99, 7], [11, 12, 13], list(range(3, 30))]


def greedy(engine: LLMEngine, prompts: list[list[int]], tag: str) -> list[list[int]]:
    """Greedy continuations of `prompts` on one engine, run to completion."""
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                            output_kind="final"))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"{tag}{i}"] for i in range(len(prompts))]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingFactory:
    """Builds real engines and counts the loads per model."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.loads: dict[str, int] = {}
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec) -> LLMEngine:
        with self._lock:
            self.loads[spec.name] = self.loads.get(spec.name, 0) + 1
        time.sleep(self.delay_s)
        return _build_engine(spec)


@pytest.fixture
def specs(tiny_models):
    return [ModelSpec("llama", str(tiny_models["llama"]), dict(OPTIONS)),
            ModelSpec("gemma", str(tiny_models["gemma3"]), dict(OPTIONS))]


def test_two_models_interleaved_give_the_same_outputs_as_alone(specs):
    manager = ModelManager(specs)
    alone = {s.name: greedy(_build_engine(s), PROMPTS, "solo") for s in specs}
    results: dict[str, list] = {}

    def run(name: str) -> None:
        with manager.use(name) as engine:
            results[name] = greedy(engine, PROMPTS, name)

    threads = [threading.Thread(target=run, args=(s.name,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone and alone["llama"] != alone["gemma"]
    assert {i.name: i.state for i in manager.list()} == {"gemma": ModelState.LOADED, "llama": ModelState.LOADED}


def test_budget_for_one_model_unloads_the_idle_one_first(specs):
    probe = ModelManager(specs[:1])
    one = probe.get("llama")
    llama_bytes = engine_bytes(one)
    # What the manager counts is the weights plus every layer's K and V cache: the pool's blocks at the
    # bytes a block takes across the layers.
    kv = len(one.kv.pool.blocks) * kv_bytes_per_block(one.loaded.model, 16, one.loaded.dtype)
    assert llama_bytes == one.loaded.weight_bytes + kv

    manager = ModelManager(specs, memory_budget_bytes=int(llama_bytes * 1.5))
    with manager.use("llama") as engine:
        assert greedy(engine, PROMPTS[:1], "a")
    with manager.use("gemma") as engine:
        assert greedy(engine, PROMPTS[:1], "b")
    states = {i.name: i for i in manager.list()}
    assert states["llama"].state is ModelState.AVAILABLE and states["gemma"].state is ModelState.LOADED
    assert manager.bytes_in_use() == states["gemma"].bytes_used <= manager.memory_budget_bytes


def test_a_model_in_use_is_never_unloaded(specs):
    manager = ModelManager(specs, max_loaded_models=1)
    with manager.use("llama"):
        assert manager.unload("llama") is False
        with pytest.raises(ModelLoadError, match="max_loaded_models=1"):
            manager.get("gemma")
    assert manager.get("gemma") is not None  # llama is idle now: it makes room
    assert {i.name: i.state for i in manager.list()}["llama"] is ModelState.AVAILABLE


def test_keep_alive_unloads_after_it_and_the_next_request_loads_again(specs):
    clock, factory = Clock(), CountingFactory()
    manager = ModelManager(specs, default_keep_alive_s=60, engine_factory=factory, clock=clock)
    with manager.use("llama", keep_alive_s=10):
        pass
    clock.now += 9
    assert manager.sweep() == []
    clock.now += 2
    assert manager.sweep() == ["llama"]
    assert manager.list()[1].state is ModelState.AVAILABLE
    with manager.use("llama"):
        pass
    assert factory.loads == {"llama": 2}
    with manager.use("gemma", keep_alive_s=0):  # 0: unloaded as soon as its last request ends
        pass
    assert manager.list()[0].state is ModelState.AVAILABLE
    with manager.use("llama", keep_alive_s=-1):  # -1: never by time
        pass
    clock.now += 10**6
    assert manager.sweep() == []


def test_concurrent_first_requests_cause_one_load(specs):
    factory = CountingFactory(delay_s=0.3)
    manager = ModelManager(specs, engine_factory=factory)
    engines = []
    threads = [threading.Thread(target=lambda: engines.append(manager.get("llama"))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert factory.loads == {"llama": 1} and len(engines) == 10 and all(e is engines[0] for e in engines)


def test_unknown_and_broken_models_fail_alone(specs, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    manager = ModelManager([*specs, ModelSpec("broken", str(broken), dict(OPTIONS))])
    with pytest.raises(UnknownModelError, match="available models: broken, gemma, llama"):
        manager.get("nope")
    with manager.use("llama") as engine:
        want = greedy(engine, PROMPTS[:1], "x")
    with pytest.raises(ModelLoadError, match="model 'broken' failed to load: GGUFFormatError"):
        manager.get("broken")
    info = {i.name: i for i in manager.list()}
    assert info["broken"].state is ModelState.FAILED and "GGUF version 0" in info["broken"].error
    with manager.use("llama") as engine:
        assert greedy(engine, PROMPTS[:1], "y") == want


def test_a_model_larger_than_the_budget_fails_with_the_numbers(specs):
    manager = ModelManager(specs, memory_budget_bytes=1000)
    with pytest.raises(MemoryBudgetError, match="budget is 1000 bytes"):
        manager.get("llama")
    assert manager.bytes_in_use() == 0


def test_the_size_estimate_before_a_load_matches_the_measured_size(specs):
    from tokenloom.manager import estimate_bytes

    for spec in specs:
        measured = engine_bytes(_build_engine(spec))
        assert abs(estimate_bytes(spec) - measured) <= 0.02 * measured, spec.name


def test_a_model_that_cannot_fit_is_not_loaded_at_all(specs):
    factory = CountingFactory()
    manager = ModelManager(specs, memory_budget_bytes=1000, engine_factory=factory)
    with pytest.raises(MemoryBudgetError):
        manager.get("gemma")
    assert factory.loads == {}  # refused on the estimate, before any weights were read


class FakeEngine:
    """Stands in for what a server's factory builds: records whether it was closed."""

    def __init__(self, spec: ModelSpec) -> None:
        self.name, self.closed = spec.name, False


def test_acquire_release_and_the_close_hook(specs):
    closed: list[str] = []

    def close(engine: FakeEngine) -> None:
        engine.closed = True
        closed.append(engine.name)

    manager = ModelManager(specs, max_loaded_models=1, engine_factory=FakeEngine, measure=lambda e: 100, close=close)
    llama = manager.acquire("llama", keep_alive_s=30)
    assert isinstance(llama, FakeEngine) and manager.loaded() == {"llama": llama}
    with pytest.raises(ModelLoadError, match="max_loaded_models=1"):  # llama is held: nothing can make room
        manager.get("gemma")
    manager.release("llama")
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        manager.release("llama")
    gemma = manager.get("gemma")  # evicts the idle llama and closes it
    assert closed == ["llama"] and llama.closed and not gemma.closed
    info = {i.name: i for i in manager.list()}
    assert info["llama"].keep_alive_s == 30 and info["llama"].num_loads == 1 and info["gemma"].bytes_used == 100
    manager.acquire("gemma")
    manager.close_all()  # at shutdown even a busy model goes
    assert closed == ["llama", "gemma"] and manager.loaded() == {} and manager.bytes_in_use() == 0


def test_a_load_found_over_budget_after_measuring_is_closed(specs):
    closed: list[str] = []
    manager = ModelManager(specs, memory_budget_bytes=10**9, engine_factory=FakeEngine, measure=lambda e: 10**10,
                           close=lambda e: closed.append(e.name))
    with pytest.raises(MemoryBudgetError):
        manager.get("llama")
    assert closed == ["llama"] and manager.list()[1].state is ModelState.FAILED


def test_an_encoder_models_estimate_has_no_kv_cache():
    from tests.encoder_models import minilm_path
    from tokenloom.manager import estimate_bytes

    spec = ModelSpec("minilm", str(minilm_path()), {"dtype": "float32", "kv_cache_gib": 1.0})
    measured = engine_bytes(ModelManager([spec]).get("minilm"))
    assert abs(estimate_bytes(spec) - measured) <= 0.02 * measured  # no 1 GiB of KV cache counted


def test_a_model_that_grows_with_adapters_is_counted_and_others_make_room(specs):
    """An engine reports more bytes after loading adapters: at the request's release the manager counts
    them and unloads the idle least recently used model the budget no longer holds."""
    sizes = {"llama": 8_000_000, "gemma": 8_000_000}  # loads are admitted by estimate (~11 MB each) first
    closed: list[str] = []
    manager = ModelManager(specs, memory_budget_bytes=20_000_000, engine_factory=FakeEngine,
                           measure=lambda e: sizes[e.name], close=lambda e: closed.append(e.name))
    manager.get("gemma")
    manager.acquire("llama")
    sizes["llama"] = 13_000_000  # adapters loaded while the request ran
    manager.release("llama")
    info = {i.name: i for i in manager.list()}
    assert info["llama"].bytes_used == 13_000_000 and closed == ["gemma"] and set(manager.loaded()) == {"llama"}
