"""Issue 17's findings, each kept as a regression test: a multi-prompt completion admitted as one unit and
cancelled as one; server-side max_tokens default and limit; header and body deadlines (slowloris), a
connection cap; 503 with Retry-After, counting only requests that cannot start; strict types and ranges;
OpenAI-shaped answers to malformed HTTP; a 405 with Allow; an OpenAPI document that lists the errors; no
server paths in /v1/models or error messages; a lone UTF-16 surrogate is a 400; the Bearer scheme in any case."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.server.test_errors import KEY, assert_error, assert_serving

BODY = {"model": "tiny", "prompt": "Hello", "temperature": 0, "ignore_eos": True}


def _raw(server, data: bytes, wait: float = 0.0, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection (after `wait` more seconds of silence) and read until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        sock.sendall(data)
        time.sleep(wait)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def _error_of(response: bytes) -> tuple[int, dict, dict[str, str]]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), json.loads(body)["error"], headers


def test_the_bearer_scheme_is_case_insensitive(restricted_server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    for header in ("bearer sekrit", "BEARER sekrit", "Bearer  sekrit"):
        r = httpx.post(f"{restricted_server.url}/v1/completions", json=body, headers={"Authorization": header})
        assert r.status_code == 200, (header, r.text)
    for header in ("Basic sekrit", "Bearer", "Bearersekrit", "sekrit"):
        assert_error(httpx.post(f"{restricted_server.url}/v1/completions", json=body,
                                headers={"Authorization": header}), 401)


def test_a_burst_into_free_slots_is_admitted_and_a_full_queue_says_retry_after(hardened_server):
    """Four slots, a queue of one: a burst of four starts at once (none is queued); a burst of twelve long
    ones overflows, and every 503 carries Retry-After."""

    async def burst(count: int, max_tokens: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=hardened_server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={**BODY, "max_tokens": max_tokens})
                                          for _ in range(count)))

    assert [r.status_code for r in asyncio.run(burst(4, 4))] == [200] * 4
    responses = asyncio.run(burst(12, 60))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.status_code in (200, 503) for r in responses)
    for r in busy:
        assert_error(r, 503, "waiting queue is full")
        assert r.headers["retry-after"] == "1"
    assert_serving(hardened_server.url)


def test_max_tokens_default_and_limit(hardened_server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{hardened_server.url}/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8  # the server's default
    r = httpx.post(f"{hardened_server.url}/v1/chat/completions", json={**chat, "max_tokens": 20})
    assert r.json()["usage"]["completion_tokens"] == 20
    assert_error(httpx.post(f"{hardened_server.url}/v1/chat/completions", json={**chat, "max_tokens": 65}), 400,
                 "64", param="max_tokens")
    assert_error(httpx.post(f"{hardened_server.url}/v1/chat/completions",
                            json={**chat, "max_completion_tokens": 100}), 400, "64", param="max_completion_tokens")
    assert_error(httpx.post(f"{hardened_server.url}/v1/completions", json={**BODY, "max_tokens": 99}), 400,
                 param="max_tokens")


def test_a_list_of_prompts_is_capped_admitted_together_and_cancelled_together(hardened_server, tiny_server):
    assert_error(httpx.post(f"{hardened_server.url}/v1/completions",
                            json={**BODY, "prompt": ["a"] * 5, "max_tokens": 2}), 400, "at most 4", param="prompt")
    r = httpx.post(f"{hardened_server.url}/v1/completions",
                   json={**BODY, "prompt": ["a", "b", "c", "d"], "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    url = tiny_server.url

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post("/v1/completions", json={**BODY, "prompt": ["a", "b"] * 8, "max_tokens": 480})

    asyncio.run(leave_early())  # the client goes away mid-generation: all sixteen are aborted
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics").text
        running = [line for line in metrics.splitlines() if line.startswith("tokenloom:num_requests_running")]
        if running and all(line.endswith(" 0.0") for line in running):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"requests still running after the client left: {running}")
    assert_serving(url)


def test_slow_headers_and_bodies_time_out_and_connections_are_capped(hardened_server):
    server = hardened_server
    status, error, _ = _error_of(_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", wait=0))
    assert status == 408 and error["code"] == "request_timeout"  # headers never finished
    assert _raw(server, b"", wait=0) == b""  # a connection that sends nothing is closed
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    status, error, _ = _error_of(_raw(server, head + b'{"prompt": ', wait=0))
    assert status == 408 and "body" in error["message"]
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(16)]
    try:
        status, error, headers = _error_of(_raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503 and headers["retry-after"] == "1" and error["code"] == "server_busy"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert_serving(server.url)


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_malformed_http_gets_an_openai_shaped_400(tiny_server, request_bytes):
    status, error, headers = _error_of(_raw(tiny_server, request_bytes))
    assert status == 400 and set(error) == {"message", "type", "param", "code"}
    assert headers["content-type"] == "application/json"
    assert_serving(tiny_server.url)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "max_tokens": "4"}, "max_tokens"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": "Hi", "seed": 2**70}, "seed"),
    ({"prompt": "Hi", "keep_alive": -5}, "keep_alive"),
    ({"prompt": "Hi", "keep_alive": "-3m"}, "keep_alive"),
    ({"prompt": "Hi", "stop": ["x"] * 65}, "stop"),
    ({"prompt": "Hi", "logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
])
def test_strict_types_and_ranges(tiny_server, body, param):
    assert_error(httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", **body}), 400, param=param)
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={**BODY, "max_tokens": 2, "keep_alive": -1,
                                                              "seed": 2**64 - 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800 x"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udc00"]}', "prompt[1]"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/tokenize", '{"model": "tiny", "prompt": "a\\ud800"}', "prompt"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(tiny_server, path, raw, param):
    r = httpx.post(tiny_server.url + path, content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate", param=param)


def test_405_allow_openapi_errors_and_no_server_paths(tiny_server, restricted_server):
    r = httpx.get(f"{tiny_server.url}/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    doc = httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert "ErrorResponse" in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "422" not in codes and {"400", "500", "503"} <= codes, (path, method, codes)
            assert "401" not in codes
    tokenize = doc["components"]["schemas"]["TokenizeRequest"]
    assert {"required": ["prompt"]} in tokenize["anyOf"]
    locked = httpx.get(f"{restricted_server.url}/openapi.json", headers=KEY).json()
    assert "401" in locked["paths"]["/v1/completions"]["post"]["responses"]
    assert "401" not in locked["paths"]["/health"]["get"]["responses"]
    for card in httpx.get(f"{tiny_server.url}/v1/models").json()["data"]:
        assert not card["root"].startswith("/"), card
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "/etc/passwd/nowhere", "prompt": "x"})
    assert r.status_code in (400, 404) and "/etc/" not in r.text


def test_error_messages_hide_absolute_paths():
    from tokenloom.server.errors import error_body

    message = error_body(500, "cannot read /tmp/models/private/model.gguf: truncated")["error"]["message"]
    assert message == "cannot read model.gguf: truncated"
    assert error_body(404, "no route GET /v1/nothing")["error"]["message"] == "no route GET /v1/nothing"
