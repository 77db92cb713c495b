"""One request as the async front sees it: an asyncio stream of its outputs, and its timings for metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenloom.outputs import RequestOutput


class RequestStream:
    """Async iterator over one request's outputs (deltas); it ends after the output marked finished.

    The engine thread feeds it through `loop.call_soon_threadsafe`; an exception put in its place ends
    the stream by being raised to the reader.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, on_abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._on_abort = on_abort
        self._queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()

    def put(self, item: RequestOutput | Exception) -> None:
        """Hand the reader an output or an error (call on the stream's event loop)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Exception):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request unless it has finished (its KV blocks are freed at the next step boundary)."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)


@dataclass(slots=True)
class RequestTimings:
    """What one request took, for metrics (monotonic seconds)."""

    arrival: float
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    inter_token_latencies: list[float] = field(default_factory=list)

    def record(self, out: RequestOutput, now: float) -> None:
        """Account for one (delta) output delivered at `now`."""
        self.num_prompt_tokens = len(out.prompt_token_ids)
        new = sum(len(c.token_ids) for c in out.outputs)
        if not new:
            return
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None and now > self.last_token:  # n > 1: siblings of one step count once
            self.inter_token_latencies.append(now - self.last_token)
        self.last_token = now
        self.num_output_tokens += new

    def end(self, out: RequestOutput | None, now: float) -> None:
        """Mark the request ended by its final output, or aborted when there is none."""
        self.finished = now
        reasons = [c.finish_reason for c in out.outputs if c.finish_reason] if out else []
        self.finish_reason = reasons[-1] if reasons else "abort"
