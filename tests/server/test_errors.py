"""Every error comes back in OpenAI's shape with the right status, and the server answers normally right after."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

KEY = {"Authorization": "Bearer sekrit"}


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in r.text
    return error


def assert_serving(url: str, headers: dict | None = None) -> None:
    r = httpx.post(f"{url}/v1/completions", headers=headers,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path,body,param,words", [
    (CHAT, {"messages": MESSAGES, "temperature": "hot"}, "temperature", ["temperature"]),
    (CHAT, {"messages": MESSAGES, "top_p": 7}, "top_p", ["top_p", "(0, 1]"]),
    (CHAT, {"messages": MESSAGES, "n": 0}, "n", ["n"]),
    (CHAT, {"messages": MESSAGES, "max_tokens": -1}, "max_tokens", ["max_tokens"]),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs", ["top_logprobs"]),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, "logprobs", ["logprobs", "[0, 20]"]),
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role", ["role"]),
    (CHAT, {"messages": []}, "messages", ["messages"]),
    (CHAT, {}, "messages", ["messages"]),
    (CHAT, {"messages": MESSAGES, "max_tokenz": 3}, "max_tokenz", ["max_tokenz"]),
    ("/v1/completions", {"prompt": [1.5]}, "prompt", ["prompt"]),
    ("/v1/completions", {"prompt": ""}, "prompt", ["prompt"]),
    ("/v1/completions", {"prompt": [[]]}, "prompt", ["prompt"]),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt", ["99999"]),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias", ["logit_bias"]),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [123456]}, "stop_token_ids", ["stop_token_ids"]),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 9, "max_tokens": 2}, "min_tokens", ["min_tokens"]),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of", ["best_of"]),
    ("/detokenize", {"tokens": [-1]}, "tokens", ["tokens"]),
    ("/tokenize", {}, "prompt", ["prompt", "messages"]),
])
def test_bad_parameters_are_400_naming_the_parameter(tiny_server, path, body, param, words):
    assert_error(httpx.post(tiny_server.url + path, json=body), 400, *words, param=param)
    assert_serving(tiny_server.url)


def test_invalid_json_and_non_object_bodies(tiny_server):
    url = tiny_server.url + CHAT
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(url, content=b'{"messages": [', headers=headers), 400, "JSON")
    assert_error(httpx.post(url, content=b"[1, 2]", headers=headers), 400, "JSON object")
    assert_error(httpx.post(url, content=b"", headers=headers), 400, "JSON")
    assert_serving(tiny_server.url)


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(tiny_server):
    prompt = "Hello world " * 30
    n_prompt = len(httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": prompt}).json()["tokens"])
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 500})
    assert_error(r, 400, "512", str(n_prompt), "500", param="max_tokens")
    r = httpx.post(tiny_server.url + CHAT, json={"messages": MESSAGES, "max_completion_tokens": 600})
    assert_error(r, 400, "512", "600", param="max_completion_tokens")
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": [5] * 600})
    assert_error(r, 400, "512", "600", param="prompt")
    assert_serving(tiny_server.url)


def test_unknown_model_is_404_and_unknown_route_404(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["param"] == "model" and "gpt-4o" in info.value.body["message"]
    assert_error(httpx.get(f"{tiny_server.url}/v1/nothing"), 404, "/v1/nothing")
    assert_error(httpx.get(f"{tiny_server.url}/v1/completions"), 405)
    assert_serving(tiny_server.url)


def test_api_key_required_except_health(restricted_server):
    url = restricted_server.url
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    assert_error(httpx.post(f"{url}/v1/completions", json=body), 401, "API key")
    assert_error(httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(f"{url}/v1/models"), 401)
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(f"{url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
    assert client.completions.create(**body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(**body)


def test_oversized_body_is_413(restricted_server):
    url = f"{restricted_server.url}/v1/completions"
    big = {"model": "tiny", "prompt": "x" * 70_000, "max_tokens": 2}
    assert_error(httpx.post(url, json=big, headers=KEY), 413, "65536")

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'
    r = httpx.post(url, content=chunked(), headers={**KEY, "content-type": "application/json"})
    assert_error(r, 413, "65536")
    assert_serving(restricted_server.url, KEY)


def test_full_waiting_queue_is_503(restricted_server):
    """One running sequence and a waiting queue of one: of eight simultaneous long requests, only a few
    get in; the others are told 503 at once, and the server serves normally afterwards."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=restricted_server.url, headers=KEY, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) <= 4, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "waiting queue is full")
        else:
            assert r.json()["usage"]["completion_tokens"] == 400
    assert_serving(restricted_server.url, KEY)
