"""Tool calling through the official `openai` client against a live server (the tiny model: its template knows
no tools, so they are described in a system message and calls are read in the json format): `required` and a
named function give valid calls (arguments validate against the tool's schema), streamed as id and name first,
then argument fragments, joining to the non-streamed calls; `auto` leaks no call text; a tool result turn is
accepted; bad tool requests are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

# small: the tiny model's context is 512 tokens and its tokenizer spends many on JSON
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                      "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


def _create(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=kwargs.pop("messages", ASK), temperature=0,
                                          max_tokens=kwargs.pop("max_tokens", 60),
                                          tools=kwargs.pop("tools", [WEATHER, TIME]), **kwargs)


def _streamed_calls(chunks) -> tuple[str, list[dict], str | None]:
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                if piece.id is not None:  # the first piece of a call: its id and name
                    assert piece.index not in calls and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def _schema(name: str) -> dict:
    return next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)["function"]["parameters"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "time"}}])
def test_required_and_named_calls_are_valid_streamed_and_not(client, choice):
    # one call (a random model given parallel calls may write calls until max_tokens: see the next test)
    r = _create(client, tool_choice=choice, parallel_tool_calls=False)
    message, reason = r.choices[0].message, r.choices[0].finish_reason
    assert reason == "tool_calls" and message.tool_calls and not message.content
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
    if isinstance(choice, dict):
        assert [c.function.name for c in message.tool_calls] == ["time"]
    content, calls, stream_reason = _streamed_calls(_create(client, tool_choice=choice, stream=True,
                                                            parallel_tool_calls=False))
    assert stream_reason == "tool_calls" and not content.strip()
    assert [(c["name"], c["arguments"]) for c in calls] == \
           [(c.function.name, c.function.arguments) for c in message.tool_calls]


def test_parallel_calls_are_each_valid(client):
    r = _create(client, tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    many = _create(client, tool_choice="required")  # parallel_tool_calls defaults to true
    calls = many.choices[0].message.tool_calls
    assert calls  # the tiny model keeps calling until max_tokens: the complete calls are returned
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))


def test_auto_streams_the_same_reply_and_leaks_no_call_text(client):
    r = _create(client, tool_choice="auto", max_tokens=24)
    message = r.choices[0].message
    content, calls, reason = _streamed_calls(_create(client, tool_choice="auto", max_tokens=24, stream=True))
    assert reason == r.choices[0].finish_reason
    assert (content or None) == (message.content.strip() if message.tool_calls else message.content) or \
        content.strip() == (message.content or "").strip()
    assert [c["name"] for c in calls] == [c.function.name for c in message.tool_calls or []]


def test_a_tool_result_turn(client):
    first = _create(client, tool_choice={"type": "function", "function": {"name": "weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                          "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = _create(client, messages=history, tool_choice="none", max_tokens=8)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content is not None
    plain = _create(client, messages=ASK, tool_choice="none", max_tokens=8)
    # the call and its result were rendered (as text: this template knows no tools)
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 20


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "auto"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(client, kwargs, param):
    tools = kwargs.pop("tools", [WEATHER, TIME])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, tools=tools or openai.NOT_GIVEN,
                                       **kwargs)
    assert info.value.body["param"] == param, info.value.body
    bad_history = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{not json"}}]}]
    with pytest.raises(openai.BadRequestError, match="arguments must be JSON"):
        client.chat.completions.create(model="tiny", messages=bad_history, max_tokens=4)
