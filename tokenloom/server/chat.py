"""POST /v1/chat/completions: messages through the model's chat template; n, logprobs, streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenloom.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenloom.server.errors import APIError
from tokenloom.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    random_id,
)
from tokenloom.server.request_handling import (
    SSEResponse,
    check_failure,
    constraint_field,
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


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    """Reply to a conversation."""
    state = state_of(request)
    n = body.n or 1
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
    async with state.use_model(body) as lease:
        served = lease.model
        served.generator()
        max_tokens, param = served.sampling_default(body, "max_tokens", body.max_tokens), "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        params = sampling_params(body, served, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                 body.prompt_logprobs)
        messages = [m.as_template_input() for m in body.messages]
        prompt = await served.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        served.check_prompt(prompt, max_tokens, param, prompt_param="messages")
        request_id = random_id("chatcmpl")
        streams = await submit(served, request_id, [prompt], params, lease.adapter,
                               constraint_field(body))
        outputs = merged(streams)
        top = body.top_logprobs or 0
        if body.stream:
            return SSEResponse(_stream(outputs, request_id, lease.name, n, len(prompt), top, body.include_usage),
                               on_close=lease.hand_over())
        return await unless_disconnected(request, _collect(outputs, request_id, lease.name, n, len(prompt), top))


def chat_logprobs(c: CompletionOutput, top: int) -> ChatLogprobs | None:
    """The logprobs of a completion's tokens in the chat format (the chosen token and the `top` best)."""
    if c.logprobs is None:
        return None
    return ChatLogprobs(content=[_token_logprob(lp, t, top) for t, lp in zip(c.token_ids, c.logprobs)])


def _token_logprob(lp: PositionLogprobs, token_id: int, top: int) -> TokenLogprob:
    text = token_text(lp, token_id)
    best = sorted((e for e in lp.values() if e.rank <= top), key=lambda e: e.rank)
    return TokenLogprob(token=text, logprob=lp[token_id].logprob, bytes=list(text.encode()),
                        top_logprobs=[TopLogprob(token=e.decoded_token or "", logprob=e.logprob,
                                                 bytes=list((e.decoded_token or "").encode())) for e in best])


async def _collect(outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str, n: int,
                   num_prompt_tokens: int, top: int) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[ChatLogprobs | None] = [None] * n
    reasons: list[str | None] = [None] * n
    num_tokens = 0
    prompt_logprobs = None
    async with aclosing(outputs):
        async for _, out in outputs:
            check_failure(out)
            prompt_logprobs = out.prompt_logprobs
            for c in out.outputs:
                texts[c.index].append(c.text)
                num_tokens += len(c.token_ids)
                reasons[c.index] = c.finish_reason or reasons[c.index]
                lp = chat_logprobs(c, top)
                if lp is not None:
                    logprobs[c.index] = logprobs[c.index] or ChatLogprobs(content=[])
                    logprobs[c.index].content.extend(lp.content or [])
    choices = [ChatChoice(index=i, message=AssistantMessage(content="".join(texts[i])), logprobs=logprobs[i],
                          finish_reason=reasons[i]) for i in range(n)]
    return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=Usage.of(num_prompt_tokens, num_tokens),
                                  prompt_logprobs=plain_prompt_logprobs(prompt_logprobs))


async def _stream(outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str, n: int,
                  num_prompt_tokens: int, top: int, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    for i in range(n):  # the role comes first, as OpenAI sends it
        yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    num_tokens = 0
    async with aclosing(outputs):
        async for _, out in outputs:
            check_failure(out)
            for c in out.outputs:
                num_tokens += len(c.token_ids)
                if c.text or c.token_ids:
                    yield chunk([ChatChunkChoice(index=c.index, delta=Delta(content=c.text),
                                                 logprobs=chat_logprobs(c, top))])
                if c.finish_reason is not None:
                    yield chunk([ChatChunkChoice(index=c.index, delta=Delta(), finish_reason=c.finish_reason)])
    if include_usage:
        yield chunk([], Usage.of(num_prompt_tokens, num_tokens))
