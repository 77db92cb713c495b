"""Structured outputs over HTTP through the official `openai` client: response_format json_schema and json_object
(streamed and not) on gemma-3-270m give valid JSON equal to the offline engine's; vLLM's `structured_outputs`
extra field; bad constraints are 400s naming the field, and the next request succeeds."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import offline
from tokenloom import SamplingParams, StructuredOutputsParams

# bounded (the default model is the pretrained one, which may not close a free string in a chat reply)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "moons": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "moons"], "additionalProperties": False}
QUESTION = [{"role": "user", "content": "Describe the planet Mars as JSON with its name and number of moons."}]


@pytest.fixture(scope="module")
def gemma(gemma_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gemma_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


def _schema_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "planet", "schema": SCHEMA, "strict": True}}


def test_json_schema_response_format_streamed_and_not_equals_offline(gemma, gemma_llm):
    want = offline(gemma_llm, "chat", [QUESTION], SamplingParams(
        temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMA)))[0].outputs[0].text
    r = gemma.chat.completions.create(model="gemma-3-270m", messages=QUESTION, temperature=0, max_tokens=60,
                                      response_format=_schema_format())
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and text == want
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = gemma.chat.completions.create(model="gemma-3-270m", messages=QUESTION, temperature=0, max_tokens=60,
                                           response_format=_schema_format(), stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_json_object_and_the_structured_outputs_extra_field(gemma):
    r = gemma.completions.create(model="gemma-3-270m", prompt='A cat as JSON: {"name": "Tom"}\nA dog as JSON: ',
                                 temperature=0, max_tokens=80, extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = gemma.completions.create(model="gemma-3-270m", prompt="The year the Berlin wall fell:", temperature=0,
                                 max_tokens=8, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) == 4
    r = gemma.completions.create(model="gemma-3-270m", prompt="Is water wet? Answer:", temperature=0, max_tokens=4,
                                 extra_body={"structured_outputs": {"choice": [" yes", " no"]}})
    assert r.choices[0].text in (" yes", " no")


@pytest.mark.parametrize("kwargs, param", [
    ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs"),
])
def test_bad_constraints_are_400s_naming_the_field_and_the_next_request_runs(tiny, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        tiny.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     **kwargs)
    assert info.value.body["param"] == param, info.value.body
    ok = tiny.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      extra_body={"structured_outputs": {"choice": ["fine"]}})
    assert ok.choices[0].message.content == "fine"


def test_a_constraint_cut_by_max_tokens_says_so(tiny):
    r = tiny.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0,
                                extra_body={"structured_outputs": {"json": {"type": "object", "properties": {
                                    "a": {"type": "string"}}, "required": ["a"]}}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].model_extra["stop_reason"] == ("max_tokens reached before the structured-output "
                                                      "constraint was complete")
    plain = tiny.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].model_extra["stop_reason"] is None
