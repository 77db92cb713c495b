"""Async front of the engine: one background thread steps `LLMEngine`; each generation request gets an
asyncio stream, each batch of pooling inputs (an encoder-only model's) a future.

Only the engine thread touches the `LLMEngine`. Callers talk to it through a command queue (add, pool,
abort) that the thread drains between steps, so concurrent callers' requests share batches; generation
outputs travel back to each request's `RequestStream` (engine/request_stream.py) through
`loop.call_soon_threadsafe`, one wake-up per event loop per step; pooling results resolve their caller's
future once every input of the call has one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenloom import faults
from tokenloom.adapters import AdapterRequest
from tokenloom.engine.llm_engine import EngineStats, LLMEngine
from tokenloom.engine.pooling import EncoderInput, PoolingParams, PoolingResult
from tokenloom.engine.request_stream import RequestStream, RequestTimings
from tokenloom.models.pooling import PoolingConfig
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
__all__ = ["AsyncEngine", "EngineDeadError", "RequestAbortedError", "RequestStream", "RequestTimings",
           "ServerBusyError"]


class ServerBusyError(RuntimeError):
    """The engine takes no more requests now: its waiting queue is full or it is shutting down."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class RequestAbortedError(RuntimeError):
    """The engine dropped the request before it finished (shutdown or an engine failure)."""


@dataclass(slots=True)
class _Tracked:
    stream: RequestStream
    timings: RequestTimings


@dataclass(slots=True)
class _Pooled:
    """One `submit` call: its future and its inputs' request ids, in input order."""

    future: concurrent.futures.Future[list[PoolingResult]]
    ids: list[str]
    results: dict[str, PoolingResult] = field(default_factory=dict)


class AsyncEngine:
    """Runs the engine loop in a background thread and serves requests to asyncio callers."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.listeners: list[Callable[[RequestTimings], None]] = []
        self._cond = threading.Condition()
        self._commands: list[tuple[Any, ...]] = []
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._pooled: dict[str, _Pooled] = {}  # engine thread only: pooling request id → its call
        self._pool_ids = itertools.count()
        self._stats = engine.stats()
        self._draining = False
        self._drain_deadline: float | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)
        self._thread.start()
        if engine.structured is not None:  # served: the first constrained request must not wait for this
            engine.structured.warm_up()

    # ---- caller side (any thread, usually the event loop) ----

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._dead is None and self._thread.is_alive()

    @property
    def is_draining(self) -> bool:
        """True once a drain started: new requests are refused."""
        return self._draining

    def stats(self) -> EngineStats:
        """The engine's counters as of the last step."""
        return self._stats

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          arrival: float | None = None, adapter: AdapterRequest | None = None) -> RequestStream:
        """Queue a request and return its stream; validation errors are raised here, before any output."""
        return (await self.add_requests([(request_id, prompt)], params, arrival, adapter))[0]

    async def add_requests(self, requests: list[tuple[str, str | list[int]]], params: SamplingParams,
                           arrival: float | None = None, adapter: AdapterRequest | None = None) -> list[RequestStream]:
        """Queue several requests (id, prompt) with the same parameters as one unit, such as a completion's
        list of prompts: admitted together between two steps, or refused together (a full queue, or the
        first invalid one's error, the others then dropped). Their streams, in order."""
        if self._draining:
            raise ServerBusyError("the server is shutting down and takes no new requests")
        if not self.is_alive:
            raise EngineDeadError("the engine has stopped")
        if params.structured_outputs is not None and self.engine.structured is not None:
            # compiled here, on a worker thread, so the engine's loop only meets a cache hit
            await asyncio.to_thread(self.engine.structured.compile, params.structured_outputs)
        loop = asyncio.get_running_loop()
        start = arrival if arrival is not None else time.monotonic()
        entries = [(rid, prompt, _Tracked(RequestStream(rid, loop, self.abort), RequestTimings(start)))
                   for rid, prompt in requests]
        admitted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(("add", entries, dataclasses.replace(params, output_kind="delta"), adapter, admitted))
        try:
            await asyncio.wrap_future(admitted)
        except asyncio.CancelledError:
            for rid, _ in requests:  # they may have been admitted just before the caller went away
                self.abort(rid)
            raise
        return [tracked.stream for _, _, tracked in entries]

    def submit(self, inputs: list[EncoderInput], task: str, pooling: PoolingConfig | None = None,
               adapter: AdapterRequest | None = None) -> concurrent.futures.Future[list[PoolingResult]]:
        """Queue an encoder-only model's tokenized inputs for `task` (with `adapter`'s LoRA and head); the
        future gives their results in input order (each may carry an error). Cancelling it drops the inputs
        that have not run yet. Any thread."""
        if adapter is None:  # an adapter's head is checked on the engine thread, which loads it
            self.engine.require(task)
        if not self.is_alive:
            raise EngineDeadError("the engine has stopped")
        if self._draining:
            raise ServerBusyError("the server is shutting down and takes no new requests")
        future: concurrent.futures.Future[list[PoolingResult]] = concurrent.futures.Future()
        base = f"pool{next(self._pool_ids)}-"
        self._submit(("pool", _Pooled(future, [f"{base}{i}" for i in range(len(inputs))]), inputs,
                      PoolingParams(task, pooling), adapter))
        return future

    async def encode(self, inputs: list[EncoderInput], task: str, pooling: PoolingConfig | None = None,
                     adapter: AdapterRequest | None = None) -> list[PoolingResult]:
        """`submit` for asyncio callers."""
        future = self.submit(inputs, task, pooling, adapter)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn(engine)` on the engine thread between steps (what changes the model, such as loading an
        adapter, must not run while a step does); the future gives its result or its error."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._submit(("call", fn, future))
        return future

    def abort(self, request_id: str) -> None:
        """Abort a request by id (a no-op for unknown or finished ones)."""
        with contextlib.suppress(EngineDeadError):  # a stopped engine has nothing left to abort
            self._submit(("abort", request_id))

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests; requests in flight get `timeout` seconds to finish, then are aborted."""
        with self._cond:
            self._draining = True
            self._drain_deadline = time.monotonic() + max(timeout, 0.0)
            self._cond.notify()

    def num_in_flight(self) -> int:
        """Generation requests admitted and not yet finished (approximate outside the engine thread)."""
        return len(self._tracked)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the engine thread."""
        with self._cond:
            self._draining = self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _submit(self, command: tuple[Any, ...]) -> None:
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError("the engine has stopped")
            self._commands.append(command)
            self._cond.notify()

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or self._drain_due()
                               or self.engine.has_unfinished_requests()):
                        self._cond.wait(self._idle_timeout())
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                for command in commands:
                    self._apply(command)
                self._drop_cancelled()
                if stopping or self._drain_due():
                    self._abort_all(RequestAbortedError("the server shut down before the request finished"))
                if stopping:
                    self._close(EngineDeadError("the engine has shut down"))
                    return
                if self.engine.has_unfinished_requests():
                    faults.hit("engine_loop")
                    self._step()
                self._stats = self.engine.stats()
        except BaseException as exc:  # a bug in the loop itself: fail every request rather than hang them
            logger.exception("engine loop died")
            self._close(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))

    def _drain_due(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline and self._in_flight()

    def _in_flight(self) -> bool:
        return bool(self._tracked or self._pooled)

    def _idle_timeout(self) -> float | None:
        if self._drain_deadline is None or not self._in_flight():
            return None
        return max(self._drain_deadline - time.monotonic(), 0.0)

    def _apply(self, command: tuple[Any, ...]) -> None:
        if command[0] == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # the caller's error, not the loop's
                    future.set_exception(exc)
            return
        if command[0] == "pool":
            self._apply_pool(*command[1:])
            return
        if command[0] == "abort":
            tracked = self._tracked.get(command[1])
            if tracked is not None:
                self._drop(command[1], RequestAbortedError("request aborted"))
            return
        _, entries, params, adapter, admitted = command
        if not admitted.set_running_or_notify_cancel():
            return
        if self._num_queued() >= self.max_waiting:
            admitted.set_exception(ServerBusyError(
                f"the waiting queue is full ({self.max_waiting} requests); retry later"))
            return
        added: list[str] = []
        for request_id, prompt, tracked in entries:
            try:
                if request_id in self._tracked:
                    raise ValueError(f"request id {request_id!r} is already in use")
                self.engine.add_request(request_id, prompt, params, adapter=adapter)
            except Exception as exc:  # validation errors belong to the caller, not to the loop
                self.engine.abort_request(added)
                for rid in added:
                    del self._tracked[rid]
                admitted.set_exception(exc)
                return
            tracked.timings.num_prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
            self._tracked[request_id] = tracked
            added.append(request_id)
        admitted.set_result(None)

    def _num_queued(self) -> int:
        """Waiting requests that cannot start at the next step: those past the free sequence slots (a burst
        into an idle engine is not a queue)."""
        stats = self.engine.stats()
        free = max(self.engine.config.scheduler_config.max_num_seqs - stats.num_running, 0)
        return max(stats.num_waiting - free, 0)

    def _apply_pool(self, pooled: _Pooled, inputs: list[EncoderInput], params: PoolingParams,
                    adapter: AdapterRequest | None) -> None:
        if pooled.future.cancelled():  # the future stays pending until its result, so callers can cancel
            return
        try:
            for rid, inp in zip(pooled.ids, inputs):
                self.engine.add_request(rid, inp, params, adapter=adapter)
                self._pooled[rid] = pooled
        except Exception as exc:  # validation errors belong to the caller, not to the loop
            self._fail_pooled(pooled, exc)
            return
        if not inputs:
            _resolve(pooled.future, [])

    def _drop_cancelled(self) -> None:
        """Abort the inputs of pooling calls whose caller cancelled."""
        for pooled in {id(p): p for p in self._pooled.values() if p.future.cancelled()}.values():
            self._fail_pooled(pooled, None)

    def _fail_pooled(self, pooled: _Pooled, error: Exception | None) -> None:
        """Drop a pooling call's inputs from the engine and fail its future (unless cancelled: error None)."""
        self.engine.abort_request([rid for rid in pooled.ids if self._pooled.pop(rid, None) is not None])
        if error is not None:
            _resolve(pooled.future, error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # LLMEngine isolates failures of model execution; anything else leaves state we cannot trust.
            logger.exception("engine step failed; aborting the requests in flight")
            self._abort_all(RequestAbortedError(f"engine error: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        deliveries: list[tuple[RequestStream, RequestOutput | Exception]] = []
        for out in outputs:
            if isinstance(out, PoolingResult):
                self._deliver_pooled(out)
                continue
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            tracked.timings.record(out, now)
            deliveries.append((tracked.stream, out))
            if out.finished:
                del self._tracked[out.request_id]
                self._finish(tracked.timings, out, now)
        self._stats = self.engine.stats()  # before the outputs: a reader must never see stats older than them
        self._deliver(deliveries)

    def _deliver_pooled(self, result: PoolingResult) -> None:
        pooled = self._pooled.pop(result.request_id, None)
        if pooled is None:
            return
        pooled.results[result.request_id] = result
        if len(pooled.results) == len(pooled.ids):
            _resolve(pooled.future, [pooled.results[rid] for rid in pooled.ids])

    def _finish(self, t: RequestTimings, out: RequestOutput | None, now: float) -> None:
        t.end(out, now)
        for listener in self.listeners:
            try:
                listener(t)
            except Exception:
                logger.exception("request listener failed")

    def _drop(self, request_id: str, error: Exception) -> None:
        """Abort one tracked request in the engine and end its stream with `error`."""
        tracked = self._tracked.pop(request_id)
        try:
            self.engine.abort_request(request_id)
        finally:
            self._finish(tracked.timings, None, time.monotonic())
            self._deliver([(tracked.stream, error)])

    def _abort_all(self, error: Exception) -> None:
        for request_id in list(self._tracked):
            self._drop(request_id, error)
        for pooled in {id(p): p for p in self._pooled.values()}.values():
            self._fail_pooled(pooled, error)

    def _close(self, error: Exception) -> None:
        """Refuse further commands and fail every request still known."""
        with self._cond:
            self._dead = error
        tracked, self._tracked = list(self._tracked.values()), {}
        self._deliver([(t.stream, error) for t in tracked])
        pooled, self._pooled = {id(p): p for p in self._pooled.values()}, {}
        for p in pooled.values():
            _resolve(p.future, error)
        with self._cond:
            for command in self._commands:
                if command[0] == "add" and command[-1].set_running_or_notify_cancel():
                    command[-1].set_exception(error)
                elif command[0] == "pool":
                    _resolve(command[1].future, error)
                elif command[0] == "call" and command[2].set_running_or_notify_cancel():
                    command[2].set_exception(error)
            self._commands = []

    @staticmethod
    def _deliver(deliveries: list[tuple[RequestStream, RequestOutput | Exception]]) -> None:
        """Hand outputs to their event loops: one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | Exception]]] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestStream, RequestOutput | Exception]]) -> None:
    for stream, item in items:
        stream.put(item)


def _resolve(future: concurrent.futures.Future[list[PoolingResult]], value: list[PoolingResult] | Exception) -> None:
    """Set a result or error, unless the caller cancelled meanwhile."""
    try:
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass
