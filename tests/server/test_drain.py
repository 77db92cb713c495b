"""SIGTERM drains: no new requests, requests in flight finish (up to the drain timeout), then a clean exit."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.server.conftest import TINY_FLAGS, launch

DRAIN_TIMEOUT = 2.0
MAX_TOKENS = 480  # the tiny model's context is 512


async def stream(http: httpx.AsyncClient, max_tokens: int, admitted: asyncio.Event) -> tuple[list[dict], float]:
    """A streamed completion's events (the [DONE] marker as {"done": True}) and when the last arrived."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list[dict] = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        admitted.set()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
    return events, time.monotonic()


def test_sigterm_drains_then_exits_cleanly(tiny_path, tmp_path):
    # One sequence at a time: 32 long requests (15k tokens) queue up far longer than the drain timeout.
    server = launch(tiny_path, [*TINY_FLAGS, "--max-num-seqs", "1", "--drain-timeout", str(DRAIN_TIMEOUT)],
                    tmp_path, "drain").wait_ready()
    assert f"serving on http://127.0.0.1:{server.port}" in server.log.read_text()  # the address, bound early
    try:
        async def run() -> tuple[list, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                admitted = [asyncio.Event() for _ in range(32)]
                tasks = [asyncio.create_task(stream(http, MAX_TOKENS, event)) for event in admitted]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in admitted)), 30)
                sigterm_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                try:  # no new requests: the listening socket is closed (or the server says it is draining)
                    r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                    assert r.status_code == 503
                except httpx.TransportError:
                    pass
                return await asyncio.gather(*tasks), sigterm_at

        results, sigterm_at = asyncio.run(run())
        assert server.proc.wait(DRAIN_TIMEOUT + 10) == 0
        exited_at = time.monotonic()
        assert exited_at - sigterm_at < DRAIN_TIMEOUT + 8
        assert all(ev[-1] == {"done": True} for ev, _ in results)  # every stream ends well-formed
        completed = [(ev, t) for ev, t in results if ev[-2].get("usage")]
        aborted = [ev for ev, _ in results if "error" in ev[-2]]
        assert any(t > sigterm_at for _, t in completed), "a request in flight at SIGTERM should finish"
        for ev, _ in completed:
            assert ev[-2]["usage"]["completion_tokens"] == MAX_TOKENS
            assert ev[-3]["choices"][0]["finish_reason"] == "length"
        assert aborted and all("shut" in ev[-2]["error"]["message"] for ev in aborted)
        assert len(completed) + len(aborted) == 32
        log = server.log.read_text()
        assert "Traceback" not in log
    finally:
        server.stop()


def test_a_taken_port_fails_at_once_with_a_clear_error(tiny_path, tmp_path):
    # The address is bound before the model loads (or Ray starts): a taken port is an error in a second, not
    # after the load, and nothing started meanwhile can take a free one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "tokenloom.cli", "serve", tiny_path, *TINY_FLAGS,
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert ", quantization " not in proc.stderr  # refused before the model load (its log line)
    assert time.monotonic() - started < 60
