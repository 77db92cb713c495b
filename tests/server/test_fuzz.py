"""Schemathesis against the live server's OpenAPI document (issue 17): every operation with positive and negative
data (wrong types, missing fields, huge numbers, unicode, empty lists, nulls), on a server without and one behind
--api-key. No 5xx, every response as the document says (status, content type, headers, body; a stream event by
event), every error in OpenAI's shape (fuzz_hooks.openai_error_shape). Settings are tests/server/fuzz.toml's: a
fixed seed and a few dozen examples per operation here (TOKENLOOM_FUZZ_EXAMPLES raises it); scripts/fuzz.sh runs
500. Below the fuzzing, each finding is kept as a plain regression test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis import BaseSchema
from schemathesis.engine import events

from tests.server import fuzz_hooks
from tests.server.test_errors import KEY, assert_error

FUZZ_CONFIG = Path(__file__).with_name("fuzz.toml")
API_KEY = KEY["Authorization"].removeprefix("Bearer ")


def fuzz_config(api_key: str | None = None) -> schemathesis.Config:
    """fuzz.toml's settings, the bearer token of a server behind `api_key`, and TOKENLOOM_FUZZ_EXAMPLES
    examples per operation when it is set."""
    text = FUZZ_CONFIG.read_text()
    if api_key is not None:
        text += f'\n[auth.openapi.bearerAuth]\nbearer = "{api_key}"\n'
    config = schemathesis.Config.from_str(text)
    if os.environ.get("TOKENLOOM_FUZZ_EXAMPLES"):
        config.projects.get_default().generation.update(max_examples=int(os.environ["TOKENLOOM_FUZZ_EXAMPLES"]))
    return config


@pytest.fixture(scope="module")
def open_schema(fuzz_server) -> BaseSchema:
    """The OpenAPI document of a server without an API key."""
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=fuzz_config())


@pytest.fixture(scope="module")
def keyed_schema(fuzz_keyed_server) -> BaseSchema:
    """The OpenAPI document of a server behind --api-key (requests carry the key unless a check drops it)."""
    return schemathesis.openapi.from_url(f"{fuzz_keyed_server.url}/openapi.json", config=fuzz_config(API_KEY),
                                         headers=KEY)


def run_schemathesis(schema: BaseSchema) -> tuple[int, list[str]]:
    """Every phase fuzz.toml enables over every operation of `schema`, on Schemathesis's engine as `st run` drives
    it (its pytest plugin does not run on pytest 9): the number of test cases sent, and each distinct failed
    check or error with a curl command reproducing it."""
    cases, problems = 0, {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        key = f"{event.recorder.label}: {check.name}: {failure.title}"
                        problems.setdefault(key, f"{key}\n{failure.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            problems.setdefault(event.label, f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    return cases, list(problems.values())


def test_fuzz_without_api_key(open_schema):
    cases, problems = run_schemathesis(open_schema)
    assert not problems, "\n\n".join(problems)
    assert cases >= 13 * 20  # every operation was reached


def test_fuzz_behind_api_key(keyed_schema):
    """Requests carry the key; ignored_auth also sends each without it and with a wrong one, expecting 401s."""
    cases, problems = run_schemathesis(keyed_schema)
    assert not problems, "\n\n".join(problems)
    assert cases >= 13 * 20


# The findings, each a plain regression test.

CONFORMING = [  # (method, path, body): answers that used to break the document, or that it did not describe
    ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True, "n": 2, "logprobs": 2,
                                 "stream_options": {"include_usage": True}}),
    ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "echo": True, "logprobs": 1,
                                 "prompt_logprobs": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                      "stream": True, "logprobs": True, "top_logprobs": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                      "structured_outputs": {"choice": ["yes", "no"]}}),
    ("POST", "/v1/completions", {"prompt": "Hello", "stream": True, "structured_outputs": {"choice": []}}),
    ("POST", "/v1/embeddings", {"input": "Hello"}),  # a decoder: a 400
    ("POST", "/tokenize", {"prompt": "Hello"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("POST", "/v1/models/load", {"model": "tiny", "keep_alive": -1}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/{model}", None),
    ("GET", "/health", None),
    ("GET", "/version", None),
    ("GET", "/metrics", None),  # Prometheus text, not JSON
]


@pytest.mark.parametrize("method,path,body", CONFORMING)
def test_answers_conform_to_the_document(open_schema, method, path, body):
    """Streams are documented as server-sent events (each event a chunk, an error or [DONE]), /metrics as text,
    the other answers with their fields."""
    kwargs = {"path_parameters": {"model": "tiny"}} if "{model}" in path else {}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = open_schema[path][method].Case(**kwargs)
    response = case.call()
    case.validate_response(response)


def _call_and_validate(url: str, method: str, path: str, body: dict | None = None, model: str | None = None) -> None:
    """One request to the server at `url`, answered 200 as its document says."""
    operation = schemathesis.openapi.from_url(f"{url}/openapi.json", config=fuzz_config())[path][method]
    kwargs: dict = {"path_parameters": {"model": model}} if model is not None else {}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = operation.Case(**kwargs)
    response = case.call()
    assert response.status_code == 200, response.text
    case.validate_response(response)


def test_embeddings_and_classifications_conform_to_the_document(multi_server):
    """What the fuzzed tiny decoder never answers with a 200."""
    _call_and_validate(multi_server.url, "POST", "/v1/embeddings", {"model": "minilm", "input": ["Hello", "world"]})
    _call_and_validate(multi_server.url, "POST", "/v1/embeddings",
                       {"model": "minilm", "input": "Hello", "encoding_format": "base64"})
    _call_and_validate(multi_server.url, "POST", "/classify", {"model": "classifier", "input": ["Hello", "world"]})
    _call_and_validate(multi_server.url, "GET", "/v1/models")  # a failed model's card among them


def test_adapter_cards_conform_to_the_document(adapters_server):
    _call_and_validate(adapters_server.url, "GET", "/v1/models")
    _call_and_validate(adapters_server.url, "GET", "/v1/models/{model}", model="a1")


def test_stream_media_types_in_the_document(fuzz_server):
    doc = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert set(doc["paths"][path]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                 "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    health = doc["paths"]["/health"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/HealthResponse"} in health["anyOf"]  # {"status": "draining"}
    assert "409" not in doc["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/models/load", "/v1/models/unload"])
def test_other_methods_on_load_and_unload_are_405_allowing_post(fuzz_server, method, path):
    """/v1/models/{model} (GET) was matched first, so these answered Allow: GET."""
    r = httpx.request(method, fuzz_server.url + path)
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_a_tiny_repetition_penalty_is_a_400(fuzz_server):
    """It divided positive logits into float32 infinities and the draw failed: a 500."""
    body = {"prompt": "hello hello world", "max_tokens": 2, "temperature": 1e-4}
    for value in (1e-308, 1e-40, 0.0099):
        r = httpx.post(f"{fuzz_server.url}/v1/completions", json={**body, "repetition_penalty": value})
        assert_error(r, 400, "0.01", param="repetition_penalty")
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={**body, "repetition_penalty": 0.01})
    assert r.status_code == 200, r.text


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deep_json_is_a_400_naming_where(fuzz_server):
    """A schema nested 500 deep recursed past Python's stack (a 500); a deeper body is FastAPI's parse error."""
    url = f"{fuzz_server.url}/v1/completions"
    body = {"prompt": "Hi", "max_tokens": 2}
    r = httpx.post(url, json={**body, "response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": _nested(250)}}})
    error = assert_error(r, 400, "nested over 100 deep")
    assert error["param"].startswith("response_format.json_schema.schema.properties.a.properties.a")
    assert_error(httpx.post(url, json={**body, "user": json.loads("[" * 101 + "]" * 101)}), 400, param="user" +
                 "[0]" * 99)
    r = httpx.post(url, json={**body, "structured_outputs": {"json": _nested(20)}})  # 41 deep: fine
    assert r.status_code == 200, r.text
    headers = {"Content-Type": "application/json"}
    for raw in ('{"user": ' + "[" * 5000 + "]" * 5000 + "}", b'{"prompt": "caf\xe9"}'):
        error = assert_error(httpx.post(url, content=raw, headers=headers), 400, "JSON")
        assert error["code"] == "invalid_json"


def test_choices_and_tools_are_capped(fuzz_server):
    """A choice of 2000 strings compiled, then failed at the first token: a 500."""
    url = fuzz_server.url
    choice = [f"c{i}" for i in range(1025)]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "structured_outputs": {"choice": choice}})
    assert_error(r, 400, "1024", param="structured_outputs.choice")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 16,
                                                  "structured_outputs": {"choice": choice[:1024]}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in choice, r.text
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "tools": tools, "tool_choice": "required"})
    assert_error(r, 400, "128", param="tools")


def test_a_seed_past_64_bits_for_its_last_choice_is_a_400(fuzz_server):
    """Choice i draws with seed + i: the largest seed with n = 4 was a 400 leaking torch's "Overflow when
    unpacking long long", naming no parameter."""
    body = {"prompt": "Hi", "max_tokens": 2, "n": 4}
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={**body, "seed": 2**64 - 1})
    assert_error(r, 400, str(2**64 - 4), param="seed")
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={**body, "seed": 2**64 - 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text


def test_a_constraint_the_engine_gives_up_on_is_a_400(fuzz_server):
    """llguidance gives up on `root ::= "a" root` at the first token (too many parser items): a request's own
    constraint, once a 500 "generation failed" with llguidance's state dump; streamed, an error event."""
    body = {"prompt": "Hi", "max_tokens": 4, "structured_outputs": {"grammar": 'root ::= "a" root'}}
    error = assert_error(httpx.post(f"{fuzz_server.url}/v1/completions", json=body), 400, "gave up",
                         param="structured_outputs")
    assert "\n" not in error["message"]
    with httpx.stream("POST", f"{fuzz_server.url}/v1/completions", json={**body, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["param"] == "structured_outputs"
    regex = {"prompt": "Hi", "max_tokens": 4, "structured_outputs": {"regex": "a{1000000}"}}
    for _ in range(2):  # the second time too: once a clean stop with empty text, the constraint ignored
        assert_error(httpx.post(f"{fuzz_server.url}/v1/completions", json=regex), 400, "gave up",
                     param="structured_outputs")


def test_every_protected_operation_is_a_401_without_the_key(fuzz_keyed_server):
    """The document declares the Bearer scheme, required on every operation but /health, /version and /metrics;
    each of those answers 401 in OpenAI's shape without the key or with a wrong one."""
    url = fuzz_keyed_server.url
    doc = httpx.get(f"{url}/openapi.json", headers=KEY).json()
    assert doc["components"]["securitySchemes"] == {"bearerAuth": {
        "type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
    protected = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if path in ("/health", "/version", "/metrics"):
                assert "security" not in operation and "401" not in operation["responses"], path
                assert httpx.request(method, url + path).status_code == 200
                continue
            assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"], path
            protected.append((method, path.replace("{model}", "tiny")))
    assert len(protected) == 10
    for method, path in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, url + path, json={"model": "tiny"}, headers=headers)
            assert_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"


def test_the_error_shape_check_refuses_other_shapes():
    """openai_error_shape, which the fuzzing runs on every answer, catches what it is meant to."""
    good = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert fuzz_hooks.error_shape_problem(good) is None
    for bad in ({"detail": "x"}, {"error": "x"}, {"error": {"message": "m"}}, {**good, "extra": 1},
                {"error": {**good["error"], "message": ""}}, {"error": {**good["error"], "code": 5}}, [good]):
        assert fuzz_hooks.error_shape_problem(bad) is not None, bad
