"""POST /v1/completions: text or token-id prompts (one or a list), n, echo, logprobs, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenloom.outputs import PositionLogprobs, RequestOutput
from tokenloom.server.errors import APIError
from tokenloom.server.model_leases import ServedModel
from tokenloom.server.openapi import event_stream
from tokenloom.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    random_id,
)
from tokenloom.server.request_handling import (
    SSEResponse,
    check_failure,
    constraint_field,
    max_tokens_of,
    merged,
    plain_prompt_logprobs,
    sampling_params,
    sse,
    state_of,
    submit,
    token_text,
    unless_disconnected,
)

router = APIRouter()


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int]
    text: str | None  # for echo
    first_token_text: str = ""  # the first prompt token has no logprob entry to read its text from


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False
    offset: int = 0  # text_offset of the next token
    prompt_logprobs: list | None = None


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse, "content": event_stream(CompletionResponse)}})
async def create_completion(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    """Complete one or more prompts."""
    state = state_of(request)
    n = body.n or 1
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, f"best_of must equal n ({n}); other values are not supported", param="best_of",
                       code="unsupported_parameter")
    async with state.use_model(body) as lease:
        served = lease.model
        served.generator()
        echo_logprobs = bool(body.echo) and body.logprobs is not None
        asked, max_tokens = max_tokens_of(state, served, body)
        params = sampling_params(body, served, max_tokens, body.logprobs,
                                 body.logprobs if echo_logprobs else body.prompt_logprobs)
        prompts = await _prepare(served, body, echo_logprobs, state.config.max_prompts_per_request)
        for p in prompts:
            served.check_prompt(p.token_ids, asked, "max_tokens")
        request_id = random_id("cmpl")
        streams = await submit(served, request_id, [p.token_ids for p in prompts], params, lease.adapter,
                               constraint_field(body))
        chunks = _chunks(body, prompts, merged(streams), n)
        if body.stream:
            return SSEResponse(_stream(chunks, request_id, lease.name, body, prompts), on_close=lease.hand_over())
        return await unless_disconnected(request, _collect(chunks, request_id, lease.name, prompts, n))


async def _prepare(served: ServedModel, body: CompletionRequest, echo_logprobs: bool, max_prompts: int
                   ) -> list[_Prompt]:
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(raw) > max_prompts:
        raise APIError(400, f"prompt lists at most {max_prompts} prompts on this server; got {len(raw)}",
                       param="prompt", code="invalid_value")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt must not be an empty string", param="prompt", code="invalid_value")
            prompt = _Prompt(await served.tokenizer.encode(item), item)
        else:
            if not item:
                raise APIError(400, "prompt token id lists must not be empty", param="prompt", code="invalid_value")
            served.check_prompt(list(item), None, "max_tokens")  # ids out of the vocabulary: before any decode
            text = await served.tokenizer.decode(item, skip_special_tokens=False) if body.echo else None
            prompt = _Prompt(list(item), text)
        if echo_logprobs:
            prompt.first_token_text = await served.tokenizer.decode(prompt.token_ids[:1], skip_special_tokens=False)
        prompts.append(prompt)
    return prompts


async def _chunks(body: CompletionRequest, prompts: list[_Prompt], outputs: AsyncIterator[tuple[int, RequestOutput]],
                  n: int) -> AsyncIterator[tuple[CompletionChoice, int]]:
    """One choice increment per engine output (and its token count); echo puts the prompt before the first."""
    choices: dict[int, _Choice] = {}
    async with aclosing(outputs):
        async for pi, out in outputs:
            check_failure(out, constraint_field(body))
            for c in out.outputs:
                index = pi * n + c.index
                choice = choices.setdefault(index, _Choice())
                echo_now = bool(body.echo) and not choice.started
                choice.started = True
                logprobs = None
                if body.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    if echo_now:
                        choice.offset = _add_logprobs(logprobs, prompts[pi].token_ids, out.prompt_logprobs or [],
                                                      choice.offset, prompts[pi].first_token_text)
                    choice.offset = _add_logprobs(logprobs, c.token_ids, c.logprobs or [], choice.offset)
                text = (prompts[pi].text or "") + c.text if echo_now else c.text
                plp = None
                if c.finish_reason and body.prompt_logprobs is not None:
                    plp = plain_prompt_logprobs(out.prompt_logprobs)
                yield CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                       stop_reason=c.stop_reason if c.finish_reason else None,
                                       prompt_logprobs=plp), len(c.token_ids)


def _add_logprobs(into: CompletionLogprobs, token_ids: list[int], positions: list[PositionLogprobs | None],
                  offset: int, first_text: str = "") -> int:
    for token_id, lp in zip(token_ids, positions):
        if lp is None:
            into.tokens.append(first_text)
            into.token_logprobs.append(None)
            into.top_logprobs.append(None)
        else:
            into.tokens.append(token_text(lp, token_id))
            into.token_logprobs.append(lp[token_id].logprob)
            top: dict[str, float] = {}
            for e in sorted(lp.values(), key=lambda e: e.rank):
                top.setdefault(e.decoded_token or "", e.logprob)  # tokens that decode alike keep the likeliest
            into.top_logprobs.append(top)
        into.text_offset.append(offset)
        offset += len(into.tokens[-1])
    return offset


async def _collect(chunks: AsyncIterator[tuple[CompletionChoice, int]], request_id: str, model: str,
                   prompts: list[_Prompt], n: int) -> CompletionResponse:
    acc: dict[int, _Choice] = {i: _Choice() for i in range(len(prompts) * n)}
    async for choice, num_tokens in chunks:
        a = acc[choice.index]
        a.text.append(choice.text)
        a.num_tokens += num_tokens
        a.finish_reason = choice.finish_reason or a.finish_reason
        a.stop_reason = choice.stop_reason if choice.finish_reason else a.stop_reason
        a.prompt_logprobs = choice.prompt_logprobs or a.prompt_logprobs
        if choice.logprobs is not None:
            if a.logprobs is None:
                a.logprobs = CompletionLogprobs()
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(a.logprobs, name).extend(getattr(choice.logprobs, name))
    choices = [CompletionChoice(index=i, text="".join(a.text), logprobs=a.logprobs, finish_reason=a.finish_reason,
                                stop_reason=a.stop_reason, prompt_logprobs=a.prompt_logprobs)
               for i, a in sorted(acc.items())]
    usage = Usage.of(sum(len(p.token_ids) for p in prompts), sum(a.num_tokens for a in acc.values()))
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)


async def _stream(chunks: AsyncIterator[tuple[CompletionChoice, int]], request_id: str, model: str,
                  body: CompletionRequest, prompts: list[_Prompt]) -> AsyncIterator[str]:
    completion_tokens = 0
    async with aclosing(chunks):
        async for choice, num_tokens in chunks:
            completion_tokens += num_tokens
            yield sse(CompletionResponse(id=request_id, model=model, choices=[choice]))
    if body.include_usage:
        usage = Usage.of(sum(len(p.token_ids) for p in prompts), completion_tokens)
        yield sse(CompletionResponse(id=request_id, model=model, choices=[], usage=usage))
