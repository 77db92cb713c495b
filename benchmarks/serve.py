"""Load generator for OpenAI-compatible servers: streamed completions at a Poisson arrival rate or a fixed
concurrency; reports request throughput, output tokens/s, time to first token and inter-token latency.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --num-requests 64 --concurrency 16
    python benchmarks/serve.py --base-url URL_A --base-url URL_B --request-rate 4   # side by side, with ratios

Every server gets the same prompts (random words, `--input-len` of them, with a unique head so no prefix
cache hit) and is asked for exactly `--output-len` tokens (`ignore_eos`, a vLLM extension that
llama.cpp's server also reads). Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community")


@dataclass
class Result:
    """One request's measurements (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    """`n` prompts of about `input_len` tokens (one common word is about one token)."""
    rng, words = random.Random(seed), WORDS.split()
    return [f"Request {i}: " + " ".join(rng.choice(words) for _ in range(input_len - 4)) for i in range(n)]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, args: argparse.Namespace) -> Result:
    """Stream one completion and time its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    result, last, chunks = Result(ok=False), None, 0
    try:
        async with http.stream("POST", f"{url}/completions", json=body) as r:
            if r.status_code != 200:
                return Result(ok=False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("error"):
                    return Result(ok=False, error=str(data["error"])[:200])
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                if not data.get("choices") or not data["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
    except httpx.HTTPError as exc:
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}")
    result.ok, result.e2e = True, time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    return result


async def run_load(url: str, model: str, prompts: list[str], args: argparse.Namespace) -> tuple[list[Result], float]:
    """Send every prompt: Poisson arrivals at `--request-rate` (capped by `--concurrency` if given), or a
    fixed number of requests in flight."""
    limit = args.concurrency or len(prompts)
    gate = asyncio.Semaphore(limit)
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=limit + 4),
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else None) as http:
        async def gated(prompt: str) -> Result:
            async with gate:
                return await one_request(http, url, model, prompt, args)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict[str, float]:
    """Throughput and latency figures of one run (latencies in ms)."""
    ok = [r for r in results if r.ok]
    itl = [gap for r in ok for gap in r.itl]
    ttft = [r.ttft for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_tok_s": tokens / duration, "output_tokens": tokens,
            "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in ok) if ok else 0.0,
            "ttft_mean_ms": 1000 * statistics.fmean(ttft) if ttft else 0.0,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
            "e2e_p50_ms": 1000 * percentile([r.e2e for r in ok], 50)}


async def served_model(url: str, api_key: str | None) -> str:
    """The first model the server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        return (await http.get(f"{url}/models")).json()["data"][0]["id"]


ROWS = [("request_throughput", "requests/s", True), ("output_tok_s", "output tok/s", True),
        ("ttft_p50_ms", "TTFT p50 (ms)", False), ("ttft_p99_ms", "TTFT p99 (ms)", False),
        ("itl_p50_ms", "ITL p50 (ms)", False), ("itl_p99_ms", "ITL p99 (ms)", False),
        ("e2e_p50_ms", "E2E p50 (ms)", False), ("mean_prompt_tokens", "prompt tokens", True),
        ("output_tokens", "output tokens", True), ("completed", "completed", True), ("failed", "failed", False)]


def report(labels: list[str], summaries: list[dict[str, float]]) -> str:
    """A table with one column per server and, for two servers, the ratio first/second (> 1 = first better
    for throughput; < 1 = first better for latency)."""
    head = f"{'metric':<16}" + "".join(f"{label:>16}" for label in labels)
    if len(summaries) == 2:
        head += f"{'ratio':>10}"
    lines = [head]
    for key, name, _ in ROWS:
        line = f"{name:<16}" + "".join(f"{s[key]:>16.2f}" for s in summaries)
        if len(summaries) == 2 and key not in ("completed", "failed", "mean_prompt_tokens", "output_tokens"):
            a, b = summaries[0][key], summaries[1][key]
            line += f"{(a / b if b else float('nan')):>9.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the load against each URL in turn, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", action="append", required=True, help="OpenAI base URL, ending in /v1 (1 or 2)")
    p.add_argument("--label", action="append", default=None, help="a name per URL for the table")
    p.add_argument("--model", action="append", default=None, help="model name per URL (default: first listed)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16 without a rate)")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summaries here")
    args = p.parse_args()
    if args.request_rate is None and args.concurrency is None:
        args.concurrency = 16
    urls = [u.rstrip("/") for u in args.base_url]
    labels = args.label or [f"server{i + 1}" for i in range(len(urls))]
    prompts = make_prompts(args.num_requests, args.input_len, args.seed)
    summaries = []
    for i, url in enumerate(urls):
        try:
            model = args.model[i] if args.model else asyncio.run(served_model(url, args.api_key))
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise SystemExit(f"{url}: cannot list models ({type(exc).__name__}: {exc}); is the server up?") from None
        if args.warmup:
            asyncio.run(run_load(url, model, make_prompts(args.warmup, args.input_len, args.seed + 99), args))
        results, duration = asyncio.run(run_load(url, model, prompts, args))
        summaries.append(summarize(results, duration))
        errors = [r.error for r in results if not r.ok]
        print(f"{labels[i]}: {url} model={model} {len(results) - len(errors)}/{len(results)} ok in {duration:.1f}s"
              + (f"; first error: {errors[0]}" if errors else ""))
    mode = f"rate {args.request_rate}/s" if args.request_rate else "fixed"
    print(f"\n{args.num_requests} requests, {args.input_len} in / {args.output_len} out, {mode}, "
          f"concurrency {args.concurrency or 'unbounded'}")
    print(report(labels, summaries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": dict(zip(labels, summaries))}, f, indent=2)


if __name__ == "__main__":
    main()

