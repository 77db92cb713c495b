"""Replicas on Ray vs one engine, same load, in one run (issue 19):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/replicas.py [--model gemma-3-270m] [--num-requests 96]

Four servers in turn, each started here and stopped after its run: one engine with 1 thread, one engine with 2
threads, 2 replicas x 1 thread routed by prefix, and the same routed round-robin. The load: streamed
completions at a fixed concurrency, each prompt one of `--prefixes` shared system prompts (~`--prefix-len`
words) plus a question of its own, `--output-len` tokens each (ignore_eos). Printed: output tokens/s, TTFT,
and the prefix-cache hit rate (prompt tokens found in a cache / prompt tokens looked up, summed over replicas),
with ratios against one engine with 1 thread. Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import cpu_model
from serve import WORDS, run_load, summarize

ROOT = Path(__file__).resolve().parents[1]


def shared_prefix_prompts(n: int, prefixes: int, prefix_len: int, seed: int) -> list[str]:
    """`n` prompts, each one of `prefixes` system prompts (drawn at random) plus a question of its own."""
    rng, words = random.Random(seed), WORDS.split()
    systems = [f"System prompt {k}: " + " ".join(rng.choice(words) for _ in range(prefix_len)) for k in range(prefixes)]
    return [f"{rng.choice(systems)}\nQuestion {i}: " + " ".join(rng.choice(words) for _ in range(12)) + "?"
            for i in range(n)]


def start(model: str, flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`tokenloom serve` with `flags` on a free port; returns once /health answers 200."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tokenloom.cli", "serve", model, "--port", str(port), *flags],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not up after 600 s: {log}")


def cache_counts(url: str) -> tuple[float, float]:
    """Prompt tokens found in a prefix cache and prompt tokens looked up, summed over every replica."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    return total("tokenloom:prefix_cache_hits_total"), total("tokenloom:prefix_cache_queries_total")


def main() -> None:
    """Run the four servers on the same load and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=160)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", default="0.5")
    args = p.parse_args()
    args.request_rate, args.no_ignore_eos, args.api_key = None, False, None
    prompts = shared_prefix_prompts(args.num_requests, args.prefixes, args.prefix_len, args.seed)
    warmup = shared_prefix_prompts(4, 1, args.prefix_len, args.seed + 99)
    common = ["--kv-cache-gib", args.kv_cache_gib, "--served-model-name", "m"]
    configs = [("1 engine x 1 thread", ["--num-threads", "1"]), ("1 engine x 2 threads", ["--num-threads", "2"]),
               ("2 replicas x 1, prefix", ["--replicas", "2", "--num-threads", "1"]),
               ("2 replicas x 1, round-robin", ["--replicas", "2", "--num-threads", "1", "--routing", "round_robin"])]
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="tokenloom-replicas-"))
    for label, flags in configs:
        proc, url = start(args.model, [*common, *flags], logs / f"{len(rows)}.log")
        try:
            asyncio.run(run_load(f"{url}/v1", "m", warmup, args))
            hits, queries = cache_counts(url)
            results, duration = asyncio.run(run_load(f"{url}/v1", "m", prompts, args))
            summary = summarize(results, duration)
            hits_after, queries_after = cache_counts(url)
            summary["hit_rate"] = (hits_after - hits) / max(queries_after - queries, 1.0)
            rows.append((label, summary))
            print(f"{label}: {summary['completed']:.0f} ok, {summary['failed']:.0f} failed, {duration:.1f} s",
                  flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    base = rows[0][1]
    print(f"\n{datetime.date.today()}  CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; model {args.model}; "
          f"{args.num_requests} requests at concurrency {args.concurrency}, {args.prefixes} shared prefixes of "
          f"~{args.prefix_len} words, {args.output_len} tokens out")
    print(f"{'server':<30}{'output tok/s':>14}{'vs 1x1':>8}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
          f"{'cache hit rate':>16}")
    for label, s in rows:
        print(f"{label:<30}{s['output_tok_s']:>14.1f}{s['output_tok_s'] / base['output_tok_s']:>7.2f}x"
              f"{s['ttft_p50_ms']:>13.0f}{s['ttft_p99_ms']:>13.0f}{s['hit_rate']:>16.3f}")


if __name__ == "__main__":
    main()
