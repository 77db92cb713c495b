"""ModelManager: the one owner of loaded models — load on demand, a memory budget with LRU eviction,
keep-alive (idle unload), and loads that happen once however many callers ask at the same time.

A model is known by name (an alias, or the name its reference resolves to) and is in one state:
available (known, not in memory), loading, loaded, or failed (its error kept for `list()`). Callers
use a model inside `with manager.use(name) as engine:` (or `acquire` / `release`, for uses that outlive
one block, such as a streamed HTTP response); a model in use is never unloaded. What the manager holds
per model is whatever its factory builds: an `LLMEngine` by default, the server's `ServedModel` (an
async engine with its tokenizer) in `tokenloom serve`; a `close` hook runs when one is unloaded. Memory is
weights plus KV cache, measured after load; before a first load it is estimated from the tensor
headers (parameters x bytes of the dtype it will run in) plus the KV cache budget, and the budget is
enforced again once the real size is known.
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tokenloom import faults
from tokenloom.config import EngineConfig
from tokenloom.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes


class ModelState(str, enum.Enum):
    """Where a model is in its life."""

    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class UnknownModelError(KeyError):
    """A name that is neither registered nor resolvable; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class ModelLoadError(RuntimeError):
    """A model's load failed (the model is marked failed; others are untouched)."""


class MemoryBudgetError(ModelLoadError):
    """A model does not fit the memory budget even with every idle model unloaded."""


@dataclass(slots=True)
class ModelSpec:
    """What to load under a name: the model reference and its engine options (dtype, kv_cache_gib, ...),
    how long it stays loaded when idle (seconds; 0: unload after the last request; -1: forever; None:
    the manager's default), default sampling parameters for its requests and a chat template override."""

    name: str
    source: str
    engine_options: dict[str, Any] = field(default_factory=dict)
    keep_alive_s: float | None = None
    default_sampling: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None


@dataclass(slots=True)
class ModelInfo:
    """One model as `list()` reports it."""

    name: str
    source: str
    state: ModelState
    bytes_used: int
    last_used: float | None
    in_flight: int
    error: str | None = None
    num_loads: int = 0
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S


@dataclass(slots=True)
class _Entry:
    spec: ModelSpec
    state: ModelState = ModelState.AVAILABLE
    engine: Any = None  # what the factory built; None unless loaded
    bytes_used: int = 0
    measured_bytes: int | None = None  # from an earlier load: the best estimate for the next one
    last_used: float | None = None
    in_flight: int = 0
    keep_alive_s: float | None = None  # set per request; overrides the spec until changed again
    error: str | None = None
    num_loads: int = 0  # loads started, failed ones included
    loaded: threading.Event = field(default_factory=threading.Event)


def engine_bytes(engine: LLMEngine) -> int:
    """Bytes a running engine holds, as it reports them (weights and KV cache)."""
    return engine.memory_bytes()


def estimate_bytes(spec: ModelSpec) -> int:
    """Before a first load: parameters from the tensor headers times the bytes of the dtype the model
    will run in, plus the KV cache budget for generative models (quantized formats come out smaller: an
    upper bound)."""
    import torch

    from tokenloom.loader import count_parameters
    from tokenloom.loader.hf import checkpoint_dtype, read_hf_config
    from tokenloom.loader.sources import resolve_model

    source = resolve_model(spec.source)
    config = EngineConfig.from_kwargs(model=spec.source, **spec.engine_options)
    hf_config = read_hf_config(source.path) if source.kind == "hf" else None
    saved = checkpoint_dtype(hf_config) if hf_config is not None else None
    from tokenloom.models import ops

    bf16_fast = ops.bf16_is_fast(config.device_config.torch_device())
    element = torch.tensor([], dtype=config.model_config.torch_dtype(saved, bf16_fast)).element_size()
    kv = 0 if hf_config is not None and _is_encoder_only(hf_config) else int(config.cache_config.kv_cache_gib * 2**30)
    return count_parameters(source) * element + kv


def _is_encoder_only(hf_config: Any) -> bool:
    """Whether the checkpoint's architecture is encoder-only (no KV cache)."""
    from tokenloom.loader import resolve_model_class
    from tokenloom.models.registry import UnsupportedModelError, model_kind

    try:
        return model_kind(resolve_model_class(hf_config)) == "encoder"
    except UnsupportedModelError:
        return False


class ModelManager:
    """Loads, caches and unloads models by name within a memory budget (None: no limit) and a count
    limit; thread-safe. `engine_factory` builds what is held for a spec (an LLMEngine unless replaced),
    `measure` gives its bytes (weights plus KV cache) and `close` releases it when it is unloaded."""

    def __init__(self, specs: list[ModelSpec] | None = None, memory_budget_bytes: int | None = None,
                 max_loaded_models: int | None = None, default_keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
                 engine_factory: Callable[[ModelSpec], Any] | None = None,
                 measure: Callable[[Any], int] | None = None, close: Callable[[Any], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory_budget_bytes = memory_budget_bytes
        self.max_loaded_models = max_loaded_models
        self.default_keep_alive_s = default_keep_alive_s
        self._factory = engine_factory or _build_engine
        self._measure = measure or engine_bytes
        self._close = close
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: ModelSpec) -> None:
        """Make a model available under `spec.name` (not loaded yet)."""
        with self._lock:
            if spec.name in self._entries:
                raise ValueError(f"model name {spec.name!r} is already registered")
            self._entries[spec.name] = _Entry(spec)

    def names(self) -> list[str]:
        """Every known model name, sorted."""
        with self._lock:
            return sorted(self._entries)

    def load(self, ref: str, alias: str | None = None, **engine_options: Any) -> Any:
        """Register `ref` under `alias` (or its own reference) if new, and load it."""
        name = alias or ref
        with self._lock:
            known = name in self._entries
        if not known:
            self.register(ModelSpec(name, ref, dict(engine_options)))
        return self.get(name)

    def get(self, name: str) -> Any:
        """The named model's engine, loading it first if needed (one load, however many callers)."""
        entry = self._entry(name)
        while True:
            with self._lock:
                if entry.state is ModelState.LOADED:
                    entry.last_used = self._clock()
                    return entry.engine
                if entry.state is not ModelState.LOADING:  # available or failed: this caller loads it
                    entry.state, entry.error = ModelState.LOADING, None
                    entry.loaded.clear()
                    break
                waiter = entry.loaded
            waiter.wait()
            with self._lock:
                if entry.state is ModelState.FAILED:
                    raise ModelLoadError(f"model {name!r} failed to load: {entry.error}")
        return self._load(entry)

    def acquire(self, name: str, keep_alive_s: float | None = None) -> Any:
        """The named model's engine, loaded if needed and held loaded until `release(name)`;
        `keep_alive_s` sets how long it stays once idle, as Ollama's per-request keep_alive."""
        entry = self._entry(name)
        while True:
            engine = self.get(name)
            with self._lock:
                if entry.engine is engine:  # not unloaded between get() and here
                    entry.in_flight += 1
                    if keep_alive_s is not None:
                        entry.keep_alive_s = keep_alive_s
                    return engine

    def release(self, name: str) -> None:
        """End one `acquire` of the named model; with a keep-alive of 0 an idle model unloads now."""
        entry = self._entry(name)
        with self._lock:
            if entry.in_flight <= 0:
                raise RuntimeError(f"model {name!r} released more often than acquired")
            entry.in_flight -= 1
            entry.last_used = self._clock()
        self._remeasure(entry)
        if self._keep_alive(entry) == 0:
            self.sweep()

    def _remeasure(self, entry: _Entry) -> None:
        """A loaded model's bytes again (an engine grows as it loads adapters, on first use or through the
        admin routes); when it grew, idle models are unloaded, least recently used first, until the budget
        holds (what cannot be unloaded now stays counted: the next load makes room for it)."""
        with self._lock:
            engine = entry.engine if entry.state is ModelState.LOADED else None
        if engine is None:
            return
        used = self._measure(engine)
        with self._lock:
            grown, entry.bytes_used, entry.measured_bytes = used > entry.bytes_used, used, used
        if grown:
            try:
                self._make_room(entry, 0)
            except MemoryBudgetError as exc:  # the others are busy: not this caller's error
                logger.warning("%s", exc)

    @contextmanager
    def use(self, name: str, keep_alive_s: float | None = None) -> Iterator[Any]:
        """Hold the named model loaded while the block runs (requests in flight are never unloaded)."""
        engine = self.acquire(name, keep_alive_s)
        try:
            yield engine
        finally:
            self.release(name)

    def unload(self, name: str) -> bool:
        """Unload the named model if it is loaded and idle; True if it was unloaded."""
        entry = self._entry(name)
        with self._lock:
            engine = self._detach_locked(entry)
        self._dispose([engine])
        return engine is not None

    def sweep(self) -> list[str]:
        """Unload every idle model whose keep-alive has run out; returns their names."""
        now = self._clock()
        done, engines = [], []
        with self._lock:
            for name, entry in self._entries.items():
                keep = self._keep_alive(entry)
                if entry.state is ModelState.LOADED and entry.in_flight == 0 and keep >= 0 and \
                        now - (entry.last_used or now) >= keep:
                    engines.append(self._detach_locked(entry))
                    done.append(name)
        self._dispose(engines)
        return done

    def close_all(self) -> None:
        """Unload every model, busy or not (at shutdown, once the requests have been drained or aborted)."""
        with self._lock:
            for entry in self._entries.values():
                entry.in_flight = 0
            engines = [self._detach_locked(entry) for entry in self._entries.values()]
        self._dispose(engines)

    def loaded(self) -> dict[str, Any]:
        """The engine of every loaded model by name (their last use is not touched)."""
        with self._lock:
            return {name: e.engine for name, e in sorted(self._entries.items()) if e.state is ModelState.LOADED}

    def spec(self, name: str) -> ModelSpec:
        """The spec a name was registered with."""
        return self._entry(name).spec

    def list(self) -> list[ModelInfo]:
        """Every known model with its state, bytes in use, last use, load count and keep-alive."""
        with self._lock:
            return [ModelInfo(name, e.spec.source, e.state, e.bytes_used, e.last_used, e.in_flight, e.error,
                              e.num_loads, self._keep_alive(e)) for name, e in sorted(self._entries.items())]

    def bytes_in_use(self) -> int:
        """Weights plus KV caches of every loaded model."""
        with self._lock:
            return sum(e.bytes_used for e in self._entries.values() if e.state is ModelState.LOADED)

    # ---------------------------------------------------------------- internals

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                known = ", ".join(sorted(self._entries)) or "none"
                raise UnknownModelError(f"model {name!r} is not available; available models: {known}")
            return entry

    def _keep_alive(self, entry: _Entry) -> float:
        for value in (entry.keep_alive_s, entry.spec.keep_alive_s):
            if value is not None:
                return value
        return self.default_keep_alive_s

    def _load(self, entry: _Entry) -> Any:
        with self._lock:
            entry.num_loads += 1
        try:
            # One load at a time: two loads that each fit the budget alone may not fit together, they
            # compete for the same disk and memory bandwidth, and transformers' lazy imports (tokenizers,
            # configs) are not thread-safe.
            with self._load_lock:
                needed = entry.measured_bytes or estimate_bytes(entry.spec)
                self._make_room(entry, needed)
                faults.hit("load", model=entry.spec.name)
                engine = self._factory(entry.spec)
                used = self._measure(engine)
                with self._lock:
                    entry.engine, entry.bytes_used, entry.measured_bytes = engine, used, used
                    entry.state, entry.last_used = ModelState.LOADED, self._clock()
                self._make_room(entry, 0)  # the estimate may have been low: enforce with the real size
            return engine
        except Exception as exc:
            with self._lock:
                built, entry.engine, entry.bytes_used = entry.engine, None, 0
                entry.state, entry.error = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            self._dispose([built])  # built, then found too big for the budget
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"model {entry.spec.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
        finally:
            entry.loaded.set()

    def _make_room(self, entry: _Entry, needed: int) -> None:
        """Unload idle models, least recently used first, until `needed` more bytes (and one more model,
        when `entry` is not loaded yet) fit; raise MemoryBudgetError when even that is not enough."""
        evicted: list[Any] = []
        try:
            with self._lock:
                self._evict_locked(entry, needed, evicted)
        finally:
            self._dispose(evicted)

    def _evict_locked(self, entry: _Entry, needed: int, evicted: list[Any]) -> None:
        while True:
            others = [e for e in self._entries.values() if e is not entry and e.state is ModelState.LOADED]
            used = sum(e.bytes_used for e in others) + (entry.bytes_used if entry.engine else 0)
            count = len(others) + 1
            over_budget = self.memory_budget_bytes is not None and used + needed > self.memory_budget_bytes
            over_count = self.max_loaded_models is not None and count > self.max_loaded_models
            if not over_budget and not over_count:
                return
            idle = sorted((e for e in others if e.in_flight == 0), key=lambda e: e.last_used or 0.0)
            if not idle:
                raise MemoryBudgetError(
                    f"model {entry.spec.name!r} needs {needed + entry.bytes_used} bytes; "
                    f"{used - entry.bytes_used} are held by models with requests in flight and the budget "
                    f"is {self.memory_budget_bytes} bytes" if over_budget else
                    f"max_loaded_models={self.max_loaded_models} are loaded and busy")
            evicted.append(self._detach_locked(idle[0]))

    def _detach_locked(self, entry: _Entry) -> Any:
        """Mark a loaded, idle model available and return its engine for `_dispose` (None if not detached)."""
        if entry.state is not ModelState.LOADED or entry.in_flight:
            return None
        engine = entry.engine
        entry.engine, entry.bytes_used, entry.state = None, 0, ModelState.AVAILABLE
        return engine

    def _dispose(self, engines: list[Any]) -> None:
        """Close unloaded engines outside the lock (closing may wait for a thread) and free their memory now."""
        engines = [e for e in engines if e is not None]
        if not engines:
            return
        for engine in engines:
            if self._close is not None:
                self._close(engine)
        del engines
        gc.collect()  # hand the weights and cache back now, not at some later collection


def _build_engine(spec: ModelSpec) -> LLMEngine:
    """The model's engine (generation, or an encoder-only model's pooling)."""
    return LLMEngine(EngineConfig.from_kwargs(model=spec.source, **spec.engine_options))
