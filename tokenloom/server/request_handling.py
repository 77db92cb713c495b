"""What the completion and chat endpoints share: the server state, request checks, sampling parameters,
submission to the engine, SSE framing and disconnect handling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenloom.adapters import AdapterRequest
from tokenloom.catalog import parse_keep_alive
from tokenloom.engine.async_engine import RequestStream
from tokenloom.manager import ModelManager
from tokenloom.outputs import PositionLogprobs, RequestOutput
from tokenloom.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from tokenloom.server.config import ServerConfig
from tokenloom.server.errors import APIError, error_body, to_api_error
from tokenloom.server.metrics import ServerMetrics
from tokenloom.server.model_leases import ModelLease, ModelLeases, ServedModel
from tokenloom.server.protocol import MAX_SEED, SamplingRequest
from tokenloom.structured import StructuredOutputError

T = TypeVar("T")


@dataclass(slots=True)
class ServerState:
    """What every route needs: the model leases (over the model manager), the options and the metrics."""

    models: ModelLeases
    config: ServerConfig
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    exit_code: int = 0  # 1 once an engine loop died: the process exits so that a supervisor restarts it
    request_exit: Callable[[], None] | None = None  # how to stop serving (set by run_server)

    @property
    def manager(self) -> ModelManager:
        """The model manager behind the leases."""
        return self.models.manager

    def use_model(self, body: SamplingRequest | Any) -> AbstractAsyncContextManager[ModelLease]:
        """A lease on the model a request names, with the request's keep_alive (400 if malformed)."""
        return self.models.using(getattr(body, "model", None), keep_alive_of(body))


def keep_alive_of(body: Any) -> float | None:
    """The request's keep_alive in seconds (Ollama's forms: seconds, "10m", 0, -1), or None if absent."""
    value = getattr(body, "keep_alive", None)
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise APIError(400, str(exc), param="keep_alive", code="invalid_value") from exc


def state_of(request: Request) -> ServerState:
    """The ServerState of the app serving `request`."""
    return request.app.state.tokenloom


def max_tokens_of(state: ServerState, model: ServedModel, req: SamplingRequest, param: str = "max_tokens"
                  ) -> tuple[int | None, int | None]:
    """The request field `param`'s limit on generated tokens: (what the request asks for, or for max_tokens its
    model's default: the prompt check holds it to that; what the engine gets: that, else the server's
    --max-tokens-default, which the engine shortens to the room the prompt leaves). 400 when it asks for
    more than --max-tokens-limit."""
    value = getattr(req, param)
    asked = model.sampling_default(req, param, value) if param == "max_tokens" else value
    limit = state.config.max_tokens_limit
    if asked is not None and limit and asked > limit:
        raise APIError(400, f"{param} must be at most {limit} on this server; got {asked}", param=param,
                       code="invalid_value")
    return asked, asked if asked is not None else (state.config.max_tokens_default or None)


def sampling_params(req: SamplingRequest, model: ServedModel, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """SamplingParams from a request; fields it leaves out take the model's defaults (a catalog's
    `sampling:`), then the engine's (OpenAI's, where they differ)."""
    given = {name: model.sampling_default(req, name, getattr(req, name)) for name in (
        "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "include_stop_str_in_output",
        "skip_special_tokens", "spaces_between_special_tokens", "logits_processors")}
    kwargs = {k: v for k, v in given.items() if v is not None}
    seed, n = kwargs.get("seed"), kwargs.get("n", 1)
    if seed is not None and seed + n - 1 > MAX_SEED:  # choice i draws from a generator seeded with seed + i
        raise APIError(400, f"seed must be at most {MAX_SEED - n + 1} (2**64 - n) with n = {n}; got {seed}",
                       param="seed", code="invalid_value")
    if req.logit_bias:
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError as exc:
            raise APIError(400, f"logit_bias keys must be token ids; {exc}", param="logit_bias",
                           code="invalid_value") from exc
    return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          output_kind="delta", structured_outputs=constraint_of(req))


def constraint_of(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's constraint: OpenAI's `response_format` or vLLM's `structured_outputs` (not both)."""
    fmt, extra = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type != "text" and extra is not None:
        raise APIError(400, "set response_format or structured_outputs, not both", param="structured_outputs",
                       code="invalid_value")
    try:
        if extra is not None:
            fields = {k: v for k, v in extra.model_dump(by_alias=True).items() if v is not None}
            return StructuredOutputsParams(**fields)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           param="response_format", code="invalid_value")
        return StructuredOutputsParams(json=fmt.json_schema.schema_)
    except SamplingParamsError as exc:
        field = "structured_outputs" if extra is not None else "response_format"
        raise APIError(400, str(exc), param=field, code="invalid_value") from exc


def constraint_field(req: SamplingRequest) -> str:
    """The request field a constraint error names."""
    return "structured_outputs" if req.structured_outputs is not None else "response_format"


async def submit(model: ServedModel, request_id: str, prompts: list[list[int]], params: SamplingParams,
                 adapter: AdapterRequest | None = None, constraint: str = "structured_outputs"
                 ) -> list[RequestStream]:
    """Queue one engine request per prompt (with the request's adapter, if any), all admitted at once; if one
    is refused, none is (a constraint that does not compile: a 400 naming the request field `constraint`
    that carried it)."""
    ids = [(request_id if len(prompts) == 1 else f"{request_id}-{i}", p) for i, p in enumerate(prompts)]
    try:
        return await model.generator().add_requests(ids, params, time.monotonic(), adapter)
    except StructuredOutputError as exc:
        message = str(exc).replace("structured_outputs", constraint, 1)
        raise APIError(400, message, param=constraint, code="invalid_value") from exc


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; aborts the rest on exit."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.abort()


# How the scheduler fails a request whose constraint refused the token its own mask allowed: llguidance gave up on
# the request's grammar mid-way (a regex of a{1000000}: too many lexer states; `root ::= "a" root`: too many parser
# items), so the request is at fault, not the server.
CONSTRAINT_FAILED = "error: the constraint "  # "refused token ..." or "failed: ..." (scheduler.py)


def check_failure(out: RequestOutput, constraint: str | None = None) -> None:
    """Raise when a completion ended in an engine error (the engine isolated it; other requests went on): a 400
    naming the request field `constraint` when its constraint gave up, else a 500."""
    for c in out.outputs:
        if c.finish_reason == "error":
            reason = str(c.stop_reason)
            if constraint is not None and reason.startswith(CONSTRAINT_FAILED):
                first_line = reason.removeprefix("error: ").split("\n", 1)[0]  # not llguidance's state dump
                raise APIError(400, f"{constraint}: the constraint engine gave up on it ({first_line})",
                               param=constraint, code="invalid_value")
            raise APIError(500, f"generation failed: {c.stop_reason}", code="generation_error")


def token_text(lp: PositionLogprobs, token_id: int) -> str:
    """The decoded text of a token in a logprobs entry."""
    entry = lp.get(token_id)
    return (entry.decoded_token or "") if entry is not None else ""


def plain_prompt_logprobs(positions: list[PositionLogprobs | None] | None) -> list[dict[str, Any] | None] | None:
    """Prompt logprobs as JSON-ready dicts, `{token_id: {logprob, rank, decoded_token}}` per position (as vLLM)."""
    if positions is None:
        return None
    return [None if p is None else {str(t): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.decoded_token}
                                    for t, e in p.items()} for p in positions]


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        data = json.dumps(payload, ensure_ascii=False)
    else:
        data = payload
    return f"data: {data}\n\n"


async def sse_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame a stream's events; an error mid-stream becomes an error event; always ends with [DONE]."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as exc:
        error = to_api_error(exc)
        yield sse(error_body(error.status, error.message, error.param, error.code))
    yield sse("[DONE]")


class SSEResponse(StreamingResponse):
    """An event stream whose generator is closed as soon as the response ends, disconnects included,
    so the requests behind it are aborted at once rather than when the generator is garbage-collected."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(sse_events(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    await self.on_close()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        watcher.cancel()
        task.cancel()
