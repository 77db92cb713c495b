"""Faults contained, through the live server (faults armed with TOKENLOOM_FAULTS): a forward pass, a KV
allocation or the tokenizer failing for one request gives that request an OpenAI-shaped 500 (or, streamed, an
error event then [DONE]) within a second, while the requests beside it get their normal outputs; a model that
fails to load is a 500 naming it and the others serve on; /health stays healthy and /metrics counts the
errors. When the engine loop itself dies, every open stream ends with an error, /health is never healthy
again and the process exits with status 1 so a supervisor restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from tests.server.conftest import TINY_FLAGS, launch
from tests.server.test_errors import assert_error

FORWARD_MARK, KV_MARK = 301, 302  # token ids only the faulted prompts hold
FAULTS = [{"site": "forward", "token": FORWARD_MARK}, {"site": "kv_allocate", "token": KV_MARK},
          {"site": "tokenize", "text": "BOOM-TOKENIZER"}, {"site": "load", "model": "fragile"}]


@pytest.fixture(scope="module")
def faulty(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    catalog = root / "models.yaml"
    catalog.write_text(f"models:\n  - name: fragile\n    source: {tiny_path}\n")
    server = launch(tiny_path, [*TINY_FLAGS, "--models-config", str(catalog)], root, "faulty",
                    env={"TOKENLOOM_FAULTS": json.dumps(FAULTS)})
    yield server.wait_ready()
    server.stop()


def _completion(prompt, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **extra}


@pytest.mark.parametrize("mark", [FORWARD_MARK, KV_MARK])
def test_an_engine_fault_fails_only_its_request(faulty, mark):
    good = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    alone = [httpx.post(f"{faulty.url}/v1/completions", json=_completion(p)).json()["choices"][0]["text"]
             for p in good]

    async def together() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as http:
            start = time.monotonic()
            bad = asyncio.ensure_future(http.post("/v1/completions", json=_completion([5, mark, 6])))
            rest = asyncio.gather(*(http.post("/v1/completions", json=_completion(p)) for p in good))
            failed = await bad
            elapsed = time.monotonic() - start
            return [failed, *await rest], elapsed

    responses, elapsed = asyncio.run(together())
    assert_error(responses[0], 500, "injected fault")
    assert elapsed < 1.0
    assert [r.json()["choices"][0]["text"] for r in responses[1:]] == alone
    assert httpx.get(f"{faulty.url}/health").status_code == 200


def test_a_streamed_request_hit_by_a_fault_ends_with_an_error_event(faulty):
    with httpx.stream("POST", f"{faulty.url}/v1/completions", json=_completion([5, FORWARD_MARK], stream=True),
                      timeout=30) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "injected fault" in error["message"]


def test_a_tokenizer_fault_and_a_failed_load_are_500s_and_the_rest_serves(faulty):
    r = httpx.post(f"{faulty.url}/v1/completions", json=_completion("say BOOM-TOKENIZER now"))
    assert_error(r, 500)
    assert "Traceback" not in r.text
    r = httpx.post(f"{faulty.url}/v1/completions", json={**_completion("Hi"), "model": "fragile"})
    assert_error(r, 500, "fragile")
    assert httpx.post(f"{faulty.url}/v1/completions", json=_completion("Hello")).status_code == 200
    assert httpx.get(f"{faulty.url}/health").status_code == 200
    metrics = httpx.get(f"{faulty.url}/metrics").text
    counted = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
               if line.startswith(("tokenloom:http_errors_total", "tokenloom:request_success_total"))}
    assert counted['tokenloom:http_errors_total{status="500"}'] >= 2
    assert counted['tokenloom:request_success_total{finished_reason="error",model_name="tiny"}'] >= 1


def test_a_dead_engine_loop_ends_every_stream_and_the_process(tiny_path, tmp_path):
    server = launch(tiny_path, TINY_FLAGS, tmp_path, "doomed",
                    env={"TOKENLOOM_FAULTS": json.dumps([{"site": "engine_loop", "step": 40}])}).wait_ready()
    try:
        async def streams() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                async def one(i: int) -> list[str]:
                    body = {**_completion([5 + i, 6]), "max_tokens": 200, "stream": True}
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        return [line async for line in r.aiter_lines() if line.startswith("data: ")]
                return await asyncio.gather(*(one(i) for i in range(4)))

        for events in asyncio.run(streams()):
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):  # refused once it has stopped listening
                assert httpx.get(f"{server.url}/health", timeout=1).status_code == 503
            time.sleep(0.05)
        assert server.proc.returncode == 1, server.log.read_text()[-2000:]
    finally:
        server.stop()
