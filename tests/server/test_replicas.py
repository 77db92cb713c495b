"""Two replicas on a local Ray behind one endpoint (`tokenloom serve --replicas 2`), through the `openai` client:
the same outputs as one engine, prefix affinity with per-replica cache hits, metrics per replica, the API key,
and a replica killed mid-load (only its requests fail, the endpoint keeps serving, the replica comes back)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server.test_openai_api import metric

KEY = {"Authorization": "Bearer sekrit"}
# 80 tokens of shared system prompt: five full blocks of 16, the affinity key
SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def front(replicas_server):
    return openai.OpenAI(base_url=f"{replicas_server.url}/v1", api_key="sekrit", max_retries=0)


@pytest.fixture(scope="module")
def single(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="none", max_retries=0)


def _events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


def _replicas(server) -> list[dict]:
    return httpx.get(f"{server.url}/replicas", headers=KEY, timeout=30).json()["replicas"]


def test_two_replicas_answer_as_one_engine_does(front, single):
    prompts = ["The capital of France", "Once upon a time", "1, 2, 3,", "def main():"]
    for prompt in prompts:
        want = single.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
        got = front.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
        streamed = "".join(c.choices[0].text for c in front.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert got == streamed == want
    messages = [{"role": "user", "content": "Say something."}]
    want = single.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    got = front.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in front.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert got.choices[0].message.content == streamed == want.choices[0].message.content


def test_both_replicas_serve_and_the_key_is_checked_at_the_front(replicas_server, front):
    for i in range(8):
        front.completions.create(model="tiny", prompt=f"Request number {i} is about topic {i * 7}", max_tokens=2)
    assert all(r["up"] and r["routed"] > 0 for r in _replicas(replicas_server))
    refused = httpx.post(f"{replicas_server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(f"{replicas_server.url}/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    models = httpx.get(f"{replicas_server.url}/v1/models", headers=KEY).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    bad = httpx.post(f"{replicas_server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0},
                     headers=KEY)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


def test_a_shared_prefix_stays_on_one_replica_and_hits_its_cache(replicas_server):
    before = _replicas(replicas_server)
    seen = set()
    for i in range(6):
        response = httpx.post(f"{replicas_server.url}/v1/chat/completions", headers=KEY, json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": f"Question {i}?"}]})
        assert response.status_code == 200, response.text
        seen.add(response.headers["x-tokenloom-replica"])
    assert len(seen) == 1
    replica = int(seen.pop())
    after = _replicas(replicas_server)
    assert after[replica]["affinity_hits"] - before[replica]["affinity_hits"] >= 5
    text = httpx.get(f"{replicas_server.url}/metrics").text
    hits = metric(text, f'tokenloom:prefix_cache_hits_total{{model_name="tiny",replica="{replica}"}}')
    assert hits >= 5 * 64, "the replica's prefix cache did not serve the shared system prompt"
    assert metric(text, "tokenloom:replica_requests_total") >= 6
    assert metric(text, f'tokenloom:replica_up{{replica="{replica}"}}') == 1.0


def test_a_client_that_leaves_before_the_answer_is_aborted_on_its_replica(replicas_server):
    def aborted() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{replicas_server.url}/metrics").text
                   .splitlines() if line.startswith("tokenloom:request_success_total{") and '"abort"' in line)

    before = aborted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{replicas_server.url}/v1/completions", headers=KEY, timeout=httpx.Timeout(30, read=0.3),
                   json={"model": "tiny", "prompt": "A long answer:", "max_tokens": 480, "min_tokens": 480, "n": 16})
    deadline = time.monotonic() + 20
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted() > before
    assert all(r["in_flight"] == 0 for r in _replicas(replicas_server))


def test_a_replica_killed_mid_load_fails_only_its_own_requests_and_comes_back(replicas_server, front):
    """Last in the module: it kills a replica."""
    under_way = threading.Barrier(9)

    def stream(i: int) -> tuple[str | None, str]:
        body = ""
        try:
            with httpx.stream("POST", f"{replicas_server.url}/v1/completions", headers=KEY, timeout=120, json={
                    "model": "tiny", "prompt": f"Stream {i}:", "max_tokens": 480, "min_tokens": 480,
                    "stream": True}) as response:
                for chunk in response.iter_text():
                    if not body:
                        under_way.wait(timeout=60)
                    body += chunk
                return response.headers.get("x-tokenloom-replica"), body
        except httpx.HTTPError as exc:
            return None, f"transport error: {exc}"

    victim = _replicas(replicas_server)[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        under_way.wait(timeout=60)  # every stream has its first event
        os.kill(victim["pid"], signal.SIGKILL)
        started = time.monotonic()
        results = [f.result(timeout=120) for f in futures]
    on_victim = [body for replica, body in results if replica == "0"]
    on_other = [body for replica, body in results if replica == "1"]
    assert on_victim and on_other, [r for r, _ in results]
    for body in on_victim:  # each ended with an error event, then [DONE]: no hang, no silent truncation
        assert _events(body)[-1]["error"]["code"] == "replica_failed" and body.rstrip().endswith("data: [DONE]")
    for body in on_other:
        events = _events(body)
        assert not any("error" in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - started < 30
    # the endpoint keeps serving meanwhile, on the replica left
    for i in range(3):
        out = front.completions.create(model="tiny", prompt=f"After the kill {i}", max_tokens=3)
        assert out.choices[0].text is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        replicas = _replicas(replicas_server)
        if all(r["up"] for r in replicas) and replicas[0]["pid"] not in (None, victim["pid"]):
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"replica 0 did not come back: {_replicas(replicas_server)}")
    assert httpx.get(f"{replicas_server.url}/health").json()["replicas_up"] == 2
