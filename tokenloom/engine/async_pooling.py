"""Async front of the pooling engine: one background thread batches encoder inputs from many callers.

Callers tokenize on their own thread (`PoolingEngine.tokenize` is safe from any thread, and that is
where validation errors belong), then `await encode(...)` or block on `submit(...).result()`. The
thread drains new submissions between steps, so inputs of concurrent callers share batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from dataclasses import dataclass, field

from tokenloom.engine.pooling_engine import EncoderInput, PoolingEngine, PoolingResult
from tokenloom.models.pooling import PoolingConfig

logger = logging.getLogger(__name__)


class PoolingEngineStoppedError(RuntimeError):
    """The pooling engine thread has stopped; no input can be served."""


@dataclass(slots=True)
class _Submission:
    future: concurrent.futures.Future[list[PoolingResult]]
    ids: list[str]
    results: dict[str, PoolingResult] = field(default_factory=dict)


class AsyncPoolingEngine:
    """Runs `PoolingEngine.step` in a background thread for callers on any thread or event loop."""

    def __init__(self, engine: PoolingEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._incoming: list[tuple[_Submission, list[EncoderInput], str, PoolingConfig | None]] = []
        self._pending: dict[str, _Submission] = {}  # engine thread only: request id → its submission
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tokenloom-pooling", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """True while the batching thread runs."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, inputs: list[EncoderInput], task: str,
               pooling: PoolingConfig | None = None) -> concurrent.futures.Future[list[PoolingResult]]:
        """Queue tokenized inputs; the future gives their results in input order (each may carry an
        error). Cancelling the future drops the inputs that have not run yet."""
        self.engine.require(task)
        future: concurrent.futures.Future[list[PoolingResult]] = concurrent.futures.Future()
        base = f"a{next(self._ids)}-"
        submission = _Submission(future, [f"{base}{i}" for i in range(len(inputs))])
        with self._cond:
            if self._stopping:
                raise PoolingEngineStoppedError("the pooling engine has shut down")
            self._incoming.append((submission, inputs, task, pooling))
            self._cond.notify()
        return future

    async def encode(self, inputs: list[EncoderInput], task: str,
                     pooling: PoolingConfig | None = None) -> list[PoolingResult]:
        """`submit` for asyncio callers."""
        future = self.submit(inputs, task, pooling)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail whatever is queued and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._stopping or self.engine.has_unfinished_requests()):
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                stopping = self._stopping
            if stopping:
                self._fail_all([s for s, *_ in incoming], PoolingEngineStoppedError("the pooling engine shut down"))
                return
            for submission, inputs, task, pooling in incoming:
                self._admit(submission, inputs, task, pooling)
            self._drop_cancelled()
            try:
                results = self.engine.step()
            except Exception as exc:  # step isolates model failures; anything else fails what is in flight
                logger.exception("pooling step failed")
                self._fail_all([], exc)
                continue
            self._deliver(results)

    def _admit(self, submission: _Submission, inputs: list[EncoderInput], task: str,
               pooling: PoolingConfig | None) -> None:
        if submission.future.cancelled():  # the future stays pending until its result, so callers can cancel
            return
        if not inputs:
            _resolve(submission.future, [])
            return
        for rid, inp in zip(submission.ids, inputs):
            self.engine.add_request(rid, inp, task, pooling)
            self._pending[rid] = submission

    def _drop_cancelled(self) -> None:
        cancelled = [rid for rid, s in self._pending.items() if s.future.cancelled()]
        if cancelled:
            self.engine.abort_request(cancelled)
            for rid in cancelled:
                del self._pending[rid]

    def _deliver(self, results: list[PoolingResult]) -> None:
        for result in results:
            submission = self._pending.pop(result.request_id, None)
            if submission is None:
                continue
            submission.results[result.request_id] = result
            if len(submission.results) == len(submission.ids):
                _resolve(submission.future, [submission.results[rid] for rid in submission.ids])

    def _fail_all(self, extra: list[_Submission], error: Exception) -> None:
        """Fail `extra` and every submission in flight."""
        in_flight = list({id(s): s for s in self._pending.values()}.values())
        self.engine.abort_request(list(self._pending))
        self._pending.clear()
        for s in extra + in_flight:
            _resolve(s.future, error)


def _resolve(future: concurrent.futures.Future[list[PoolingResult]], value: list[PoolingResult] | Exception) -> None:
    """Set a result or error, unless the caller cancelled meanwhile."""
    try:
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass
