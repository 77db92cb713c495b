"""POST /v1/chat/completions: messages through the model's chat template; n, logprobs, streaming; tools (calls
parsed out of the reply, streamed as tool_calls deltas; required / named choices enforced by a grammar)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenloom.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenloom.server.errors import APIError
from tokenloom.server.openapi import event_stream
from tokenloom.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    TokenLogprob,
    ToolCallItem,
    TopLogprob,
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
from tokenloom.structured.tool_parsers import ToolCallParser, ToolCallStreamer
from tokenloom.structured.tools import ToolPlan, plan_tools, template_messages

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": event_stream(ChatCompletionChunk)}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    """Reply to a conversation."""
    state = state_of(request)
    n = body.n or 1
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
    async with state.use_model(body) as lease:
        served = lease.model
        served.generator()
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked, max_tokens = max_tokens_of(state, served, body, param)
        params = sampling_params(body, served, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                 body.prompt_logprobs)
        template = served.tokenizer.tokenizer.chat_template
        plan = _tool_plan(body, template, state.config.tool_call_parser)
        if plan is not None and plan.constraint is not None:
            if params.structured_outputs is not None:
                raise APIError(400, "tool_choice required or a named function constrains the reply itself; it "
                                    "cannot be combined with response_format or structured_outputs",
                               param="tool_choice", code="invalid_value")
            params = dataclasses.replace(params, structured_outputs=plan.constraint)
        messages = template_messages([m.as_template_input() for m in body.messages], template, plan)
        prompt = await served.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt,
                                                    tools=plan.template_tools() if plan is not None else None)
        served.check_prompt(prompt, asked, param, prompt_param="messages")
        request_id = random_id("chatcmpl")
        field = "tool_choice" if plan is not None and plan.constraint is not None else constraint_field(body)
        streams = await submit(served, request_id, [prompt], params, lease.adapter, field)
        outputs = merged(streams)
        top = body.top_logprobs or 0
        parser = plan.parser if plan is not None else None
        if body.stream:
            return SSEResponse(_stream(outputs, request_id, lease.name, n, len(prompt), top, body.include_usage,
                                       parser, field), on_close=lease.hand_over())
        return await unless_disconnected(request, _collect(outputs, request_id, lease.name, n, len(prompt), top,
                                                           parser, field))


def _tool_plan(body: ChatCompletionRequest, template: str | None, parser_name: str | None) -> ToolPlan | None:
    """How the request's tools are offered and its reply read (400 for a bad tool_choice)."""
    if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    tools = [t.function.model_dump(exclude={"strict"}) for t in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    try:
        return plan_tools(tools, choice, body.parallel_tool_calls is not False, template, parser_name)
    except ValueError as exc:
        raise APIError(400, str(exc), param="tool_choice" if "tool_choice" in str(exc) else "tools",
                       code="invalid_value") from exc


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
                   num_prompt_tokens: int, top: int, parser: ToolCallParser | None = None,
                   constraint: str | None = None) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[ChatLogprobs | None] = [None] * n
    reasons: list[str | None] = [None] * n
    stop_reasons: list[int | str | None] = [None] * n
    num_tokens = 0
    prompt_logprobs = None
    async with aclosing(outputs):
        async for _, out in outputs:
            check_failure(out, constraint)
            prompt_logprobs = out.prompt_logprobs
            for c in out.outputs:
                texts[c.index].append(c.text)
                num_tokens += len(c.token_ids)
                reasons[c.index] = c.finish_reason or reasons[c.index]
                if c.finish_reason is not None:
                    stop_reasons[c.index] = c.stop_reason
                lp = chat_logprobs(c, top)
                if lp is not None:
                    logprobs[c.index] = logprobs[c.index] or ChatLogprobs(content=[])
                    logprobs[c.index].content.extend(lp.content or [])
    choices = [_choice(i, "".join(texts[i]), logprobs[i], reasons[i], stop_reasons[i], parser) for i in range(n)]
    return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=Usage.of(num_prompt_tokens, num_tokens),
                                  prompt_logprobs=plain_prompt_logprobs(prompt_logprobs))


def _choice(index: int, text: str, logprobs: ChatLogprobs | None, reason: str | None,
            stop_reason: int | str | None, parser: ToolCallParser | None) -> ChatChoice:
    """A finished choice; with tools, its calls parsed out of the text (finish_reason tool_calls)."""
    content, calls = parser.parse(text) if parser is not None else (text, [])
    items = [ToolCallItem(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return ChatChoice(index=index, message=AssistantMessage(content=content, tool_calls=items or None),
                      logprobs=logprobs, finish_reason="tool_calls" if items and reason == "stop" else reason,
                      stop_reason=stop_reason)


async def _stream(outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str, n: int,
                  num_prompt_tokens: int, top: int, include_usage: bool, parser: ToolCallParser | None = None,
                  constraint: str | None = None) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    for i in range(n):  # the role comes first, as OpenAI sends it
        yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    num_tokens = 0
    streamers = [ToolCallStreamer(parser) if parser is not None else None for _ in range(n)]
    async with aclosing(outputs):
        async for _, out in outputs:
            check_failure(out, constraint)
            for c in out.outputs:
                num_tokens += len(c.token_ids)
                streamer, reason = streamers[c.index], c.finish_reason
                if streamer is None:
                    delta = Delta(content=c.text) if c.text or c.token_ids else None
                else:
                    delta = _tool_delta(streamer, c.text, reason is not None)
                    if streamer.num_calls and reason == "stop":
                        reason = "tool_calls"
                lp = chat_logprobs(c, top)
                if delta is not None or lp is not None:
                    yield chunk([ChatChunkChoice(index=c.index, delta=delta or Delta(), logprobs=lp)])
                if reason is not None:
                    yield chunk([ChatChunkChoice(index=c.index, delta=Delta(), finish_reason=reason,
                                                 stop_reason=c.stop_reason)])
    if include_usage:
        yield chunk([], Usage.of(num_prompt_tokens, num_tokens))


def _tool_delta(streamer: ToolCallStreamer, text: str, final: bool) -> Delta | None:
    """The next delta of a reply that may hold tool calls: new content (whitespace between calls dropped) and
    new call pieces; None when there is nothing new to send."""
    content, pieces = streamer.feed(text, final)
    if streamer.num_calls and not content.strip():
        content = ""
    calls = [DeltaToolCall(index=p.index, id=p.id, type="function" if p.id else None,
                           function=DeltaFunction(name=p.name, arguments=p.arguments if p.id is None else ""))
             for p in pieces]
    if not content and not calls:
        return None
    return Delta(content=content or None, tool_calls=calls or None)
