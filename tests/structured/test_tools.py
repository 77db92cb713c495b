"""Tool-call formats: parsing whole replies and streamed ones (streamed pieces join to the whole parse, no tag
text in the content), the grammars that force valid calls (llguidance accepts every valid call and refuses an
unknown function or bad arguments), and the plan a request's tools make."""

from __future__ import annotations

import json

import pytest

from tokenloom.structured.tool_parsers import (
    ToolCallParser,
    ToolCallStreamer,
    parser_for_template,
    register_tool_parser,
    tool_parser,
    unregister_tool_parser,
)
from tokenloom.structured.tools import plan_tools, template_messages

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": None, "parameters": {"type": "object", "properties": {}}}

REPLIES = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "name": "x"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "name": "x"}}; '
                   '{"name": "get_time", "parameters": {}}',
    "json": '[{"name": "get_weather", "arguments": {"city": "Paris", "name": "x"}}, '
            '{"name": "get_time", "arguments": {}}]',
}


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_whole_and_streamed_parses_agree(fmt):
    parser = tool_parser(fmt)
    content, calls = parser.parse(REPLIES[fmt])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "name": "x"}), ("get_time", {})]
    assert content == ("Let me check." if fmt == "hermes" else None)
    for step in (1, 2, 7):
        streamer, text, pieces = ToolCallStreamer(parser), REPLIES[fmt], []
        streamed = ""
        for i in range(0, len(text), step):
            new, got = streamer.feed(text[i:i + step], final=i + step >= len(text))
            streamed += new
            pieces += got
        assert "<tool_call>" not in streamed and "{" not in streamed
        assert streamed.strip() == (content or "")
        heads = [p for p in pieces if p.id is not None]
        assert [(p.index, p.name) for p in heads] == [(0, "get_weather"), (1, "get_time")]
        for index, call in enumerate(calls):
            first = pieces.index(heads[index])
            assert all(p.id is None for p in pieces[first + 1:] if p.index == index)  # id and name come first
            assert "".join(p.arguments for p in pieces if p.index == index) == call.arguments


def test_plain_replies_stay_content_and_partial_tags_are_held_back():
    hermes = tool_parser("hermes")
    assert hermes.parse("No tools needed: 2 + 2 = 4.") == ("No tools needed: 2 + 2 = 4.", [])
    streamer = ToolCallStreamer(hermes)
    assert streamer.feed("Hello <tool_")[0] == "Hello "  # might open a call: held back
    assert streamer.feed("kit>")[0] == "<tool_kit>"  # it did not
    assert streamer.feed("<tool", final=True)[0] == "<tool"  # the reply ended: it was text after all
    assert tool_parser("json").parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert tool_parser("llama3_json").parse("Hi!") == ("Hi!", [])
    unfinished = tool_parser("json").parse('[{"name": "get_weather", "arguments": {"city": "Par')
    assert unfinished[1] == []


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_the_calls_grammar_accepts_valid_calls_only(fmt, tiny_models):
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    parser = tool_parser(fmt)
    tok = from_tokenizer(AutoTokenizer.from_pretrained(tiny_models["llama"]))

    def accepts(grammar: str, text: str) -> bool:
        matcher = LLMatcher(tok, LLMatcher.grammar_from_lark(any_to_lark(grammar)), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = tok.tokenize_str(text)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    key = parser.arguments_key
    one = json.dumps({"name": "get_weather", key: {"city": "Paris", "unit": "C"}})
    other = json.dumps({"name": "get_time", key: {}})
    write = {"hermes": lambda calls, sep="\n": "".join(f"<tool_call>\n{c}\n</tool_call>{sep}" for c in calls),
             "llama3_json": lambda calls, sep="": "; ".join(calls),
             "json": lambda calls, sep="": "[" + ", ".join(calls) + "]"}[fmt]
    parallel = parser.grammar([WEATHER, TIME], parallel=True)
    assert accepts(parallel, write([one, other]))
    single = parser.grammar([WEATHER, TIME], parallel=False)
    assert accepts(single, write([one], "") if fmt == "hermes" else write([one]))
    bad_args = json.dumps({"name": "get_weather", key: {"town": "Paris"}})
    unknown = json.dumps({"name": "launch", key: {}})
    assert not accepts(parallel, write([bad_args]))
    assert not accepts(parallel, write([unknown]))


def test_the_plan_follows_tool_choice_and_the_template():
    tools = [WEATHER, TIME]
    assert plan_tools(tools, "none", True, "{{ tools }}") is None
    auto = plan_tools(tools, "auto", True, "{% if tools %}<tool_call>{% endif %}")
    assert auto.parser.name == "hermes" and auto.constraint is None and auto.template_tools()[0]["type"] == "function"
    required = plan_tools(tools, "required", False, None)
    assert required.parser.name == "json" and required.constraint.grammar and required.template_tools() is None
    named = plan_tools(tools, {"type": "function", "function": {"name": "get_time"}}, True, None)
    assert "get_time" in named.constraint.grammar and "get_weather" not in named.constraint.grammar
    with pytest.raises(ValueError, match="tool_choice names function 'nope'"):
        plan_tools(tools, {"type": "function", "function": {"name": "nope"}}, True, None)
    with pytest.raises(ValueError, match="must be unique"):
        plan_tools([WEATHER, WEATHER], "auto", True, None)
    messages = template_messages([{"role": "user", "content": "Weather in Paris?"},
                                  {"role": "assistant", "content": "", "tool_calls": [
                                      {"id": "c1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], None, required)
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'}
    assert messages[3]["role"] == "user" and "sunny" in messages[3]["content"]
    assert parser_for_template("<|python_tag|>{{ tools }}") == "llama3_json"


def test_a_plugin_format_registers_and_unregisters():
    class Bracket(ToolCallParser):
        name = "bracket"

        def split(self, text):
            return ("", [text[1:-1]], False) if text.startswith("<") else (text, [], False)

    register_tool_parser("bracket", Bracket)
    try:
        assert tool_parser("bracket").parse('<{"name": "f", "arguments": {}}>')[1][0].name == "f"
    finally:
        unregister_tool_parser("bracket")
    with pytest.raises(ValueError, match="'bracket' is not registered"):
        tool_parser("bracket")


def test_plugins_add_tool_formats_and_constraint_backends(tiny_models):
    from tokenloom import LLM, SamplingParams, StructuredOutputsParams
    from tokenloom.plugins import PluginRegistry
    from tokenloom.structured.llguidance_backend import LLGuidanceBackend

    class Upper(ToolCallParser):
        name = "upper"

    class CountingBackend(LLGuidanceBackend):
        compiled = 0

        def compile(self, params):
            CountingBackend.compiled += 1
            return super().compile(params)

    def register(registry):
        registry.add_tool_parser("upper", Upper)
        registry.add_constraint_backend("counting", CountingBackend)

    registry = PluginRegistry()
    info = registry.load("formats", lambda: register, "test")
    assert info.error is None and info.adds == {"tool_parsers": ["upper"], "constraint_backends": ["counting"]}
    assert isinstance(tool_parser("upper"), Upper)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.05)
    params = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(
        choice=["ok"], backend="counting"))
    assert llm.generate(["hi", "there"], params, use_tqdm=False)[1].outputs[0].text == "ok"
    assert CountingBackend.compiled == 1  # two requests, one compile
    registry.unload("formats")
    with pytest.raises(ValueError, match="'upper' is not registered"):
        tool_parser("upper")


def test_offline_chat_with_tools(tiny_models):
    """`LLM.chat(tools=...)` as the server does it: a named or required choice gives valid calls (parsed into
    `tool_calls`, arguments valid), `none` is a plain chat, a tool result turn renders, bad tools are refused
    naming the field."""
    import jsonschema

    from tokenloom import LLM, SamplingParams, StructuredOutputsParams
    from tokenloom.engine.request import InvalidRequestError

    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.05)
    # short: the tiny model's context is 512 tokens; bounded: a random model's strings run on
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}}
    tools = [{"type": "function", "function": weather}, {"type": "function", "function": {"name": "get_time"}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=60)
    named = llm.chat([ask, ask], params, use_tqdm=False, tools=tools,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for out in named:
        assert out.outputs[0].tool_calls, out.outputs[0].text
        (call,) = out.outputs[0].tool_calls
        assert call.name == "get_weather" and out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(call.arguments), weather["parameters"])
    required = llm.chat(ask, params, use_tqdm=False, tools=tools, tool_choice="required", parallel_tool_calls=False)
    (call,) = required[0].outputs[0].tool_calls
    assert call.name in ("get_weather", "get_time")
    plain = llm.chat(ask, params, use_tqdm=False)[0].outputs[0]
    none = llm.chat(ask, params, use_tqdm=False, tools=tools, tool_choice="none")[0].outputs[0]
    assert (none.token_ids, none.tool_calls) == (plain.token_ids, None)
    result_turn = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    assert llm.chat(result_turn, params, use_tqdm=False, tools=tools)[0].outputs[0].finish_reason is not None
    bad = [({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
           ({"tools": [{"function": WEATHER}]}, "tools"),
           ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tools": tools, "tool_choice": "sometimes"}, "tool_choice")]
    for kwargs, field in bad:
        with pytest.raises(InvalidRequestError) as err:
            llm.chat(ask, params, use_tqdm=False, **kwargs)
        assert err.value.field == field, (kwargs, str(err.value))
    constrained = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        llm.chat(ask, constrained, use_tqdm=False, tools=tools, tool_choice="required")


# Qwen 2.5's tool format (its chat template without its instructions: the tiny model's context is 512 tokens):
# tools in <tools></tools> in the system turn, calls in <tool_call></tool_call>, results in <tool_response>
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_knows_tools_gets_them_and_its_format_is_read(tiny_models):
    """A Hermes/Qwen template: the tools reach it as OpenAI's objects (rendered in its <tools> block), the
    required calls are written in its <tool_call> tags and parsed; a past call and its result render in its
    own format."""
    import jsonschema

    from tokenloom import LLM, SamplingParams

    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.05)
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=120)
    out = llm.chat(ask, params, use_tqdm=False, chat_template=HERMES_TEMPLATE,
                   tools=[{"type": "function", "function": weather}], tool_choice="required",
                   parallel_tool_calls=False)[0]
    prompt = llm.get_tokenizer().hf.decode(out.prompt_token_ids)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and "Functions you can call" not in prompt
    reply = out.outputs[0]
    assert reply.text.startswith("<tool_call>") and reply.text.rstrip().endswith("</tool_call>"), reply.text
    (call,) = reply.tool_calls
    jsonschema.validate(json.loads(call.arguments), weather["parameters"])
    turn = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    again = llm.chat(turn, params, use_tqdm=False, chat_template=HERMES_TEMPLATE,
                     tools=[{"type": "function", "function": weather}])[0]
    rendered = llm.get_tokenizer().hf.decode(again.prompt_token_ids)
    assert "<tool_response>\n18 C\n</tool_response>" in rendered and call.arguments in rendered
