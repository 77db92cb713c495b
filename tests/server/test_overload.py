"""Overload: a request whose client has gone while it waited in the queue is never computed, and a server
flooded past its queue sheds with 503s (Retry-After), then serves normally by itself."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server.test_errors import KEY, assert_serving


def _queried(url: str) -> float:
    """Prompt tokens the scheduler has looked up so far (counted when a request first runs)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tokenloom:prefix_cache_queries_total{"))


def test_a_request_abandoned_in_the_queue_is_never_computed(restricted_server):
    """One running sequence: a long request runs; a second one waits behind it and its client leaves after
    0.1 s; when the first is done, the scheduler has looked up the first one's prompt only."""
    url = restricted_server.url
    before = _queried(url)
    long_prompt, waiting_prompt = [5, 6, 7, 8], list(range(10, 60))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as http:
            first = asyncio.ensure_future(http.post("/v1/completions", json={
                "model": "tiny", "prompt": long_prompt, "max_tokens": 500, "ignore_eos": True}))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.TimeoutException):
                await http.post("/v1/completions", json={"model": "tiny", "prompt": waiting_prompt, "max_tokens": 4},
                                timeout=0.1)
            return await first

    assert asyncio.run(run()).status_code == 200
    time.sleep(0.3)
    assert _queried(url) - before == len(long_prompt)
    assert_serving(url, KEY)


def test_a_flood_is_shed_and_the_server_recovers(restricted_server):
    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=restricted_server.url, headers=KEY, timeout=60) as http:
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 50, "ignore_eos": True}
            responses = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(40)))
            return [r.status_code for r in responses]

    statuses = asyncio.run(flood())
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 30
    assert_serving(restricted_server.url, KEY)
