"""Soak test of the server (issue 17), run by hand, never in CI:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soak.py --duration 1800 --clients 32 [--model gemma-3-270m]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID   # a running server

Starts `tokenloom serve` (the model, plus all-MiniLM-L6-v2 for embeddings) unless given `--url`, then drives it
for `--duration` seconds with `--clients` concurrent clients, each looping over a mix of requests: completions,
streamed chats, n > 1, logprobs, stop strings, JSON-schema structured output, embeddings, and completions under
a LoRA adapter (trained here for one short epoch) beside the base model. Of the streamed
requests 10% disconnect after their first chunks; 1% of all requests are invalid on purpose (they must be 400s).

Records: requests served and errors by kind (5xx apart from none injected: the target is zero), resident anonymous
memory (RssAnon) of the server over time and its growth after warm-up per 1,000 requests (target < 1 MB), KV
blocks free after the load drains (from /metrics: usage must return to 0), and p50/p99 time to first token of
the streamed requests in the first and last tenth of the run (target: p99 drift < 10%). Prints a markdown
summary and writes the raw series as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_TEXT = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word")
WORDS = _TEXT.split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "count"], "additionalProperties": False}
KINDS = {"completion": 20, "chat_stream": 25, "n2": 8, "logprobs": 8, "stop": 10, "structured": 8, "embedding": 13,
         "adapter": 8}


@dataclass
class Tally:
    """What the clients saw."""

    served: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (time since start, seconds)
    disconnects: int = 0
    invalid_ok: int = 0  # invalid requests answered with a 4xx in OpenAI's shape

    @property
    def total(self) -> int:
        return sum(self.served.values()) + sum(self.errors.values()) + self.invalid_ok + self.disconnects


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Tally, start: float, model: str,
                      embedder: str | None, adapter: str | None) -> None:
    """Send one request of a random kind and record its outcome."""
    if rng.random() < 0.01:  # invalid on purpose
        r = await http.post("/v1/completions", json={"model": model, "prompt": prompt(rng, 3), "max_tokens": "x"})
        if 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}:
            tally.invalid_ok += 1
        else:
            tally.errors[f"invalid got {r.status_code}"] += 1
        return
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind == "embedding" and embedder is None:
        kind = "completion"
    base = {"model": model, "max_tokens": rng.randint(8, 32), "temperature": rng.choice([0.0, 0.8])}
    if kind == "chat_stream":
        await chat_stream(http, rng, tally, start, base)
        return
    if kind == "embedding":
        texts = [prompt(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 4))]
        body, path = {"model": embedder, "input": texts}, "/v1/embeddings"
    else:
        body, path = {**base, "prompt": prompt(rng, rng.randint(4, 60))}, "/v1/completions"
        if kind == "n2":
            body.update(n=2, temperature=0.8)
        elif kind == "logprobs":
            body.update(logprobs=3)
        elif kind == "stop":
            body.update(stop=[rng.choice(WORDS), "."])
        elif kind == "adapter":
            body.update(model=adapter or model)
        elif kind == "structured":
            body = {**base, "messages": [{"role": "user", "content": "A record: " + prompt(rng, 8)}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
                    "max_tokens": 48}
            path = "/v1/chat/completions"
    r = await http.post(path, json=body)
    if r.status_code == 200:
        tally.served[kind] += 1
    else:
        tally.errors[f"{kind} {r.status_code}"] += 1


async def chat_stream(http: httpx.AsyncClient, rng: random.Random, tally: Tally, start: float, base: dict) -> None:
    """A streamed chat; 10% of them leave after their first chunks."""
    body = {**base, "messages": [{"role": "user", "content": prompt(rng, rng.randint(4, 40))}], "stream": True}
    leave_after = rng.randint(1, 3) if rng.random() < 0.10 else None
    sent = time.monotonic()
    chunks = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally.errors[f"chat_stream {r.status_code}"] += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"error"' in line:
                tally.errors["chat_stream error event"] += 1
                return
            if chunks == 0:
                tally.ttft.append((sent - start, time.monotonic() - sent))
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                tally.disconnects += 1
                return  # closing the stream here drops the connection mid-response
    tally.served["chat_stream"] += 1


async def client(url: str, seed: int, deadline: float, tally: Tally, start: float, model: str,
                 embedder: str | None, adapter: str | None) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            try:
                await one_request(http, rng, tally, start, model, embedder, adapter)
            except httpx.HTTPError as exc:
                tally.errors[f"transport {type(exc).__name__}"] += 1


def rss_anon_kib(pid: int) -> int:
    match = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


async def sample_memory(pid: int, tally: Tally, deadline: float, start: float, series: list) -> None:
    while time.monotonic() < deadline:
        series.append((time.monotonic() - start, tally.total, rss_anon_kib(pid)))
        await asyncio.sleep(5)


def kv_usage(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split("{")[1].split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("tokenloom:kv_cache_usage_perc{")}


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan")
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def growth_kib_per_1000(series: list[tuple[float, int, int]], warm_up: float) -> float:
    """Least-squares slope of RssAnon against requests served, after the warm-up fraction of the run."""
    points = [(n, kib) for t, n, kib in series if t >= warm_up]
    if len(points) < 3:
        return float("nan")
    mx, my = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.encoder_models import minilm_path

    folder = Path(tempfile.mkdtemp(prefix="tokenloom-soak-"))
    catalog = folder / "models.yaml"
    catalog.write_text(f"models:\n  - name: minilm\n    source: {minilm_path()}\n")
    port = 18000 + os.getpid() % 1000
    log = folder / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A LoRA of our own training (one short epoch): a share of the requests runs under it, beside the base model.
    data = folder / "lora.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} is a word.", "completion": f" {w.upper()}"}) + "\n"
                            for w in WORDS[:16]))
    subprocess.run([sys.executable, "-m", "tokenloom.cli", "train", "-m", args.model, "--method", "lora", "--data",
                    str(data), "--output", str(folder / "lora"), "--epochs", "1", "--batch-size", "8"],
                   check=True, env=env, capture_output=True)
    watch = [str(Path(__file__).with_name("memwatch.py")), args.memwatch]
    launcher = watch if args.memwatch else ["-m", "tokenloom.cli"]
    cmd = [sys.executable, *launcher, "serve", args.model, "--port", str(port), "--models-config",
           str(catalog), "--max-num-seqs", str(max(args.clients, 16)), "--adapters", f"soak-lora={folder / 'lora'}",
           *args.server_flag]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready")


async def soak(args, url: str, pid: int) -> dict:
    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    model = args.model if args.model in models else models[0]
    embedder = "minilm" if "minilm" in models else None
    adapter = "soak-lora" if "soak-lora" in models else None
    if embedder is not None:  # loaded on demand: not inside the measured run
        httpx.post(f"{url}/v1/embeddings", json={"model": embedder, "input": "warm"}, timeout=300)
    tally, series = Tally(), []
    start = time.monotonic()
    deadline = start + args.duration
    await asyncio.gather(sample_memory(pid, tally, deadline, start, series),
                         *(client(url, args.seed + i, deadline, tally, start, model, embedder, adapter)
                           for i in range(args.clients)))
    elapsed = time.monotonic() - start
    await asyncio.sleep(2)  # the aborted and last requests drain
    usage = kv_usage(url)
    tenth = args.duration / 10
    first = percentiles([s for t, s in tally.ttft if t < tenth])
    last = percentiles([s for t, s in tally.ttft if t >= args.duration - tenth])
    return {"seconds": elapsed, "clients": args.clients, "requests": tally.total, "served": dict(tally.served),
            "errors": dict(tally.errors), "disconnects": tally.disconnects, "invalid_refused": tally.invalid_ok,
            "rss_anon_kib_start": series[0][2] if series else None, "rss_anon_kib_end": rss_anon_kib(pid),
            "growth_kib_per_1000_requests": growth_kib_per_1000(series, args.duration * 0.1),
            "kv_usage_after_drain": usage, "ttft_first_tenth_p50_p99": first, "ttft_last_tenth_p50_p99": last,
            "p99_drift": (last[1] / first[1] - 1) if first[1] else float("nan"), "memory_series": series}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--url", help="a running server (then --pid gives its process for memory readings)")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-flag", action="append", default=[], help="extra flags for tokenloom serve")
    parser.add_argument("--out", default="/tmp/soak.json")
    parser.add_argument("--memwatch", help="record where the server's memory goes into this JSON-lines file "
                                           "(benchmarks/memwatch.py)")
    args = parser.parse_args()
    proc = None
    if args.url is None:
        proc, url, log = start_server(args)
        pid = proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
    try:
        result = asyncio.run(soak(args, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    Path(args.out).write_text(json.dumps(result, indent=1))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_model

    print(f"CPU: {cpu_model()}; {result['clients']} clients for {result['seconds']:.0f} s; server exit "
          f"{proc.returncode if proc else 'n/a'}")
    print("| measure | value |\n|---|---|")
    for key in ("requests", "served", "errors", "disconnects", "invalid_refused", "rss_anon_kib_start",
                "rss_anon_kib_end", "growth_kib_per_1000_requests", "kv_usage_after_drain",
                "ttft_first_tenth_p50_p99", "ttft_last_tenth_p50_p99", "p99_drift"):
        print(f"| {key} | {result[key]} |")


if __name__ == "__main__":
    main()
