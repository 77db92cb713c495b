"""CPU benchmark: tokenloom vs llama.cpp (through llama-cpp-python) on the same GGUF, side by side in one run.

Run by hand (never in CI), e.g.
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_bench.py --quantization auto,int8,none:bfloat16 --json cpu.json
    TOKENLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ... cpu_bench.py  # an AVX2 machine's paths
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_bench.py --concurrency 1,4 --reps 1 --skip-llamacpp  # smoke

Workloads, all greedy with EOS ignored on random prompt token ids >= 10 from a seeded generator, with fresh
prompts for every measurement (no prefix cache can help) and the same prompts for both systems:
  prefill      a 512-token prompt; tok/s = 512 / the time to process it, median of --reps. tokenloom: `generate`
               with max_tokens=1; llama.cpp: one llama_decode of the 512-token batch, n_batch = n_ubatch = 512
               (llama-bench pp512)
  decode       one stream: a 16-token prompt, then 128 decode steps; tok/s = 128 / their time, leaving out the
               prefill step that yields the first token; median of --reps. tokenloom: `LLMEngine.step()`;
               llama.cpp: llama_decode of one token and its C greedy sampler (llama-bench tg128, really sampled)
  concurrency  N requests of 128 prompt / 128 output tokens submitted at once; tok/s = N x 128 / wall time,
               prefill included. tokenloom: one `LLM.generate`; llama.cpp: one context with n_seq_max = N, the
               prompts prefilled in batches of 2048 tokens, then one token per sequence per llama_decode, sampled
               by llama_sampler_sample (llama-batched-bench with real sampling)
  coldstart    a fresh `python -c` from its start to its first generated token: `LLM(...)` / `Llama(...)` and a
               1-token completion of "Hello"; each runs twice, the second (warm page cache) counts
Each column is a weight format, optionally with a dtype and a KV cache dtype (`int4`, `none:float32`,
`auto::float16`; `auto` is the default quantization, with --dtype, also auto by default: what `tokenloom
serve` runs with no flags). The report names the CPU's instruction-set level, the level our kernels ran at
(TOKENLOOM_ISA lowers it) and torch's own.
Each system runs in its own worker process (this script with the hidden --worker flag, printing JSON), so
llama.cpp's and torch's OpenMP thread pools never share a process, and every quantization starts fresh.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from common import cpu_model, physical_cores, physical_limits, random_prompts, read_bandwidth_gbs, timed

if TYPE_CHECKING:
    from tokenloom import SamplingParams
    from tokenloom.llm import LLM

WORKLOADS = ("prefill", "decode", "concurrency", "coldstart")
PREFILL_LEN = 512
DECODE_PROMPT_LEN, DECODE_STEPS = 16, 128
CONC_PROMPT_LEN, CONC_OUTPUT_LEN = 128, 128
LLAMA_N_BATCH = 2048  # llama.cpp's logical batch for the concurrency prefill (its default); n_ubatch stays 512
NUM_COMPARED = 8  # requests per concurrency level whose greedy outputs are kept for the agreement check
RESULT_MARK = "CPU_BENCH_RESULT "
LLAMA_LOG_ERROR = 4  # enum ggml_log_level (llama-cpp-python's _logger still maps the old numbering)
INSTALL_HINT = ('llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python '
                "(compiles llama.cpp, ~20 min on 2 cores); running tokenloom only")
# Issue 13's goals for the best mode (defaults: >= 1.0x on every row): tokenloom / llama.cpp throughput at
# least this, or cold start at most this many seconds.
GOALS: dict[str, tuple[str, float]] = {"prefill": ("ratio", 1.5), "decode": ("ratio", 1.3),
                                       "concurrency 64": ("ratio", 2.0), "coldstart": ("seconds", 5.0)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prompts (the same in every process)


def make_prompts(seed: int, vocab: int, reps: int, concurrency: list[int]) -> dict[str, Any]:
    """Every prompt of the run, from seeded streams: prefill and decode get a warm-up prompt and one per
    rep, each concurrency level its own N prompts, so no two measurements share a prompt."""
    rng = lambda *key: np.random.default_rng([seed, *key])
    return {"prefill": random_prompts(rng(0), [PREFILL_LEN] * (reps + 1), vocab),
            "decode": random_prompts(rng(1), [DECODE_PROMPT_LEN] * (reps + 1), vocab),
            "concurrency": {n: random_prompts(rng(2, n), [CONC_PROMPT_LEN] * n, vocab) for n in concurrency},
            "warmup": random_prompts(rng(3), [8, 12, 16, 20], vocab)}


# ---------------------------------------------------------------- tokenloom worker


def _greedy(max_tokens: int) -> SamplingParams:
    from tokenloom import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def tokenloom_prefill(llm: LLM, prompt: list[int]) -> float:
    """Prompt tokens per second of one `generate` of a single token."""
    _, seconds = timed(lambda: llm.generate([prompt], _greedy(1), use_tqdm=False))
    return len(prompt) / seconds


def tokenloom_decode(llm: LLM, request_id: str, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """Decode steps per second after the prefill step, driving the engine directly; and the generated ids."""
    engine = llm.engine
    engine.add_request(request_id, prompt, _greedy(steps + 1))
    engine.step()  # the whole prompt (shorter than the token budget) and the first token
    final = None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    seconds = time.perf_counter() - start
    if final is None or len(final.outputs[0].token_ids) != steps + 1:
        raise RuntimeError(f"tokenloom decode: expected {steps + 1} tokens, got {final and final.outputs[0].token_ids}")
    return steps / seconds, list(final.outputs[0].token_ids)


def tokenloom_concurrent(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    """All prompts in one `generate` call: seconds and the generated ids."""
    outs, seconds = timed(lambda: llm.generate(prompts, _greedy(output_len), use_tqdm=False))
    ids = [list(o.outputs[0].token_ids) for o in outs]
    if any(len(i) != output_len for i in ids):
        raise RuntimeError(f"tokenloom concurrency {len(prompts)}: lengths {[len(i) for i in ids][:8]}...")
    return seconds, ids


def tokenloom_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load tokenloom in one quantization, run the workloads, measure the physical limits."""
    import torch

    from tokenloom.llm import LLM
    from tokenloom.models import ops

    torch.set_num_threads(spec["threads"])
    quantization, dtype, kv = (spec["quantization"].split(":") + ["", ""])[:3]
    llm, load_s = timed(lambda: LLM(spec["model"], quantization=quantization, dtype=dtype or spec["dtype"],
                                    kv_cache_dtype=kv or "auto", num_threads=spec["threads"]))
    vocab = llm.engine.vocab_size
    prompts = make_prompts(spec["seed"], vocab, spec["reps"], spec["concurrency"])
    _log(f"tokenloom {spec['quantization']}: loaded in {load_s:.1f} s")
    llm.generate(prompts["warmup"], _greedy(4), use_tqdm=False)  # a batch of 4, then one stream
    llm.generate(prompts["warmup"][:1], _greedy(8), use_tqdm=False)
    results: dict[str, Any] = {}
    if "prefill" in spec["workloads"]:
        samples = [tokenloom_prefill(llm, p) for p in prompts["prefill"]][1:]  # the first is a warm-up
        results["prefill"] = {"tok_s": statistics.median(samples), "samples": samples}
        _log(f"tokenloom {spec['quantization']}: prefill {results['prefill']['tok_s']:.1f} tok/s")
    if "decode" in spec["workloads"]:
        runs = [tokenloom_decode(llm, f"bench-decode-{i}", p, DECODE_STEPS) for i, p in enumerate(prompts["decode"])]
        samples = [r[0] for r in runs[1:]]
        results["decode"] = {"tok_s": statistics.median(samples), "samples": samples,
                             "outputs": [r[1] for r in runs[1:]]}
        _log(f"tokenloom {spec['quantization']}: decode {results['decode']['tok_s']:.1f} tok/s")
    if "concurrency" in spec["workloads"]:
        for n in spec["concurrency"]:
            seconds, ids = tokenloom_concurrent(llm, prompts["concurrency"][n], CONC_OUTPUT_LEN)
            results[f"concurrency {n}"] = {"tok_s": n * CONC_OUTPUT_LEN / seconds, "seconds": seconds,
                                           "outputs": ids[:NUM_COMPARED]}
            _log(f"tokenloom {spec['quantization']}: concurrency {n} {n * CONC_OUTPUT_LEN / seconds:.1f} tok/s")
    limits = physical_limits(llm, llm.engine.loaded.dtype, spec["bandwidth_gbs"])
    return {"system": "tokenloom", "quantization": spec["quantization"], "dtype": str(llm.engine.loaded.dtype),
            "resolved": llm.engine.loaded.quantization, "isa": ops.describe(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "vocab": vocab, "load_s": load_s,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "limits": limits, "results": results}


# ---------------------------------------------------------------- llama.cpp worker (never imports torch)


class LlamaBatch:
    """A `llama_batch` of up to `capacity` tokens, each in one sequence."""

    def __init__(self, lc: Any, capacity: int) -> None:
        self.lc, self.capacity = lc, capacity
        self.raw = lc.llama_batch_init(capacity, 0, 1)

    def fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Set the batch to these (token, position, sequence, wants logits) entries."""
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} tokens in a batch of {self.capacity}")
        b = self.raw
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def free(self) -> None:
        """Release the C arrays."""
        self.lc.llama_batch_free(self.raw)


def _llama_log(level: int, text: bytes, user_data: Any) -> None:
    if level == LLAMA_LOG_ERROR:  # llama.cpp's info and warnings (e.g. on this GGUF's tokens) stay quiet
        sys.stderr.write(text.decode(errors="replace"))


class LlamaRunner:
    """llama.cpp's C API through llama-cpp-python's ctypes bindings: one model, contexts made on demand."""

    def __init__(self, model_path: str, threads: int) -> None:
        import llama_cpp

        self.lc, self.threads = llama_cpp, threads
        self._log_callback = llama_cpp.llama_log_callback(_llama_log)  # kept referenced while llama.cpp holds it
        llama_cpp.llama_log_set(self._log_callback, None)
        llama_cpp.llama_backend_init()
        start = time.perf_counter()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.load_s = time.perf_counter() - start
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.sampler = llama_cpp.llama_sampler_init_greedy()  # stateless: one serves every sequence

    def context(self, n_ctx: int, n_batch: int, n_ubatch: int, n_seq: int) -> Any:
        """A context with this many KV cells, batch sizes and sequences; threads for both phases."""
        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq
        p.n_threads = p.n_threads_batch = self.threads
        ctx = self.lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq})")
        return ctx

    def decode(self, ctx: Any, batch: LlamaBatch) -> None:
        """One llama_decode, finished (synchronized) when this returns."""
        rc = self.lc.llama_decode(ctx, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.lc.llama_synchronize(ctx)

    def sample(self, ctx: Any, index: int) -> int:
        """Greedy token from the logits of the batch's `index`-th token, by llama.cpp's C sampler."""
        return self.lc.llama_sampler_sample(self.sampler, ctx, index)

    def clear(self, ctx: Any) -> None:
        """Forget every sequence in the context's KV cache."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)

    def prefill(self, ctx: Any, batch: LlamaBatch, prompt: list[int]) -> float:
        """pp512: tokens per second of one llama_decode of the whole prompt (logits of the last token only)."""
        self.clear(ctx)
        batch.fill([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        _, seconds = timed(lambda: self.decode(ctx, batch))
        return len(prompt) / seconds

    def decode_stream(self, ctx: Any, batch: LlamaBatch, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        """tg: the prompt and its first token untimed, then `steps` timed single-token decodes and samples."""
        self.clear(ctx)
        batch.fill([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self.decode(ctx, batch)
        out = [self.sample(ctx, len(prompt) - 1)]
        start = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + steps):
            batch.fill([(out[-1], pos, 0, True)])
            self.decode(ctx, batch)
            out.append(self.sample(ctx, 0))
        return steps / (time.perf_counter() - start), out

    def concurrent(self, ctx: Any, batch: LlamaBatch, prompts: list[list[int]], output_len: int
                   ) -> tuple[float, list[list[int]]]:
        """All sequences at once: prompts in batches of `batch.capacity` tokens (each sequence's first token
        sampled as its prompt completes), then one token per sequence per decode; seconds and the ids."""
        self.clear(ctx)
        start = time.perf_counter()
        entries = [(t, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, t in enumerate(p)]
        outs: list[list[int]] = [[] for _ in prompts]
        for first in range(0, len(entries), batch.capacity):
            chunk = entries[first:first + batch.capacity]
            batch.fill(chunk)
            self.decode(ctx, batch)
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    outs[seq].append(self.sample(ctx, i))
        for step in range(output_len - 1):
            batch.fill([(out[-1], len(p) + step, seq, True) for seq, (p, out) in enumerate(zip(prompts, outs))])
            self.decode(ctx, batch)
            for seq, out in enumerate(outs):
                out.append(self.sample(ctx, seq))
        return time.perf_counter() - start, outs

    def warm_up(self, ctx: Any, batch: LlamaBatch, prompt: list[int]) -> None:
        """One small prompt through the context (as llama-bench / llama-batched-bench do), then cleared."""
        self.clear(ctx)
        batch.fill([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self.decode(ctx, batch)
        self.clear(ctx)

    def free(self, ctx: Any) -> None:
        """Release a context."""
        self.lc.llama_free(ctx)


def llamacpp_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the GGUF into llama.cpp and run the workloads on the prompts tokenloom saw."""
    runner = LlamaRunner(spec["model_path"], spec["threads"])
    lc = runner.lc
    vocab = spec.get("vocab") or runner.vocab
    prompts = make_prompts(spec["seed"], vocab, spec["reps"], spec["concurrency"])
    _log(f"llama.cpp: loaded in {runner.load_s:.1f} s")
    results: dict[str, Any] = {}
    if {"prefill", "decode"} & set(spec["workloads"]):
        ctx = runner.context(n_ctx=1024, n_batch=PREFILL_LEN, n_ubatch=PREFILL_LEN, n_seq=1)
        batch = LlamaBatch(lc, PREFILL_LEN)
        runner.warm_up(ctx, batch, prompts["warmup"][0])
        if "prefill" in spec["workloads"]:
            samples = [runner.prefill(ctx, batch, p) for p in prompts["prefill"]][1:]
            results["prefill"] = {"tok_s": statistics.median(samples), "samples": samples}
            _log(f"llama.cpp: prefill {results['prefill']['tok_s']:.1f} tok/s")
        if "decode" in spec["workloads"]:
            runs = [runner.decode_stream(ctx, batch, p, DECODE_STEPS) for p in prompts["decode"]]
            samples = [r[0] for r in runs[1:]]
            results["decode"] = {"tok_s": statistics.median(samples), "samples": samples,
                                 "outputs": [r[1] for r in runs[1:]]}
            _log(f"llama.cpp: decode {results['decode']['tok_s']:.1f} tok/s")
        batch.free()
        runner.free(ctx)
    if "concurrency" in spec["workloads"]:
        for n in spec["concurrency"]:
            # n_ctx is split evenly between the sequences (kv_unified off, the default): 256 cells each.
            ctx = runner.context(n_ctx=n * (CONC_PROMPT_LEN + CONC_OUTPUT_LEN), n_batch=LLAMA_N_BATCH,
                                 n_ubatch=PREFILL_LEN, n_seq=n)
            batch = LlamaBatch(lc, max(LLAMA_N_BATCH, n))
            runner.warm_up(ctx, batch, prompts["warmup"][0])
            seconds, ids = runner.concurrent(ctx, batch, prompts["concurrency"][n], CONC_OUTPUT_LEN)
            results[f"concurrency {n}"] = {"tok_s": n * CONC_OUTPUT_LEN / seconds, "seconds": seconds,
                                           "outputs": ids[:NUM_COMPARED]}
            _log(f"llama.cpp: concurrency {n} {n * CONC_OUTPUT_LEN / seconds:.1f} tok/s")
            batch.free()
            runner.free(ctx)
    info = {"system": "llama.cpp", "vocab": runner.vocab, "prompt_vocab": vocab, "load_s": runner.load_s,
            "llama_cpp_python": lc.__version__, "system_info": lc.llama_print_system_info().decode().strip(),
            "model_bytes": lc.llama_model_size(runner.model), "parameters": lc.llama_model_n_params(runner.model),
            "context": "llama.cpp defaults: flash_attn auto, f16 K/V, kv_unified off, full-size SWA cache",
            "results": results}
    lc.llama_sampler_free(runner.sampler)
    lc.llama_model_free(runner.model)
    return info


# ---------------------------------------------------------------- parent: workers and cold starts


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run this script as a `kind` worker on `spec`; its progress goes to stderr, its result is returned."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_child_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed (exit status {proc.returncode}); stdout tail: {proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def tokenloom_coldstart_code(model: str, variant: str, dtype: str, threads: int) -> str:
    """`python -c` source: build the LLM, generate one token, print it."""
    quantization, _, own_dtype = variant.partition(":")
    dtype = own_dtype or dtype
    return ("from tokenloom import LLM, SamplingParams\n"
            f"llm = LLM({model!r}, quantization={quantization!r}, dtype={dtype!r}, num_threads={threads})\n"
            "out = llm.generate('Hello', SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)\n"
            "print('FIRST_TOKEN', out[0].outputs[0].token_ids[0], flush=True)\n")


def llamacpp_coldstart_code(model_path: str, threads: int) -> str:
    """`python -c` source: llama-cpp-python's `Llama`, a one-token completion, print it."""
    return ("from llama_cpp import Llama\n"
            f"llm = Llama(model_path={model_path!r}, n_ctx=512, n_threads={threads}, n_threads_batch={threads}, "
            "verbose=False)\n"
            "out = llm.create_completion('Hello', max_tokens=1, temperature=0)\n"
            "print('FIRST_TOKEN', repr(out['choices'][0]['text']), flush=True)\n")


def coldstart(code: str, runs: int = 2, timeout_s: float = 600.0) -> list[float]:
    """Seconds from spawning `python -c code` to its FIRST_TOKEN line, for each of `runs` fresh processes
    (each killed if it has not exited `timeout_s` after its first token)."""
    times = []
    for _ in range(runs):
        with tempfile.TemporaryFile("w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True,
                                    env=_child_env())
            assert proc.stdout is not None
            seen = None
            for line in proc.stdout:
                if line.startswith("FIRST_TOKEN"):
                    seen = time.perf_counter() - start
                    break
            proc.stdout.read()
            try:
                failed = proc.wait(timeout=timeout_s) != 0
            except subprocess.TimeoutExpired:  # a slow exit after the first token does not void the run
                proc.kill()
                failed = False
            if failed or seen is None:
                err.seek(0)
                raise RuntimeError(f"cold start failed (exit status {proc.returncode}): {err.read()[-2000:]}")
        times.append(seen)
    return times


# ---------------------------------------------------------------- report


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": version("torch"), "llama_cpp_python": version("llama_cpp_python")}


def row_names(workloads: list[str], concurrency: list[int]) -> list[str]:
    """Table rows in order: prefill, decode, one per concurrency level, cold start."""
    names = [w for w in ("prefill", "decode") if w in workloads]
    names += [f"concurrency {n}" for n in concurrency] if "concurrency" in workloads else []
    return names + (["coldstart"] if "coldstart" in workloads else [])


def row_limit(name: str, decode_max: float, batched_max: float, prefill_max: float) -> float | None:
    """The physical bound on a row's tok/s: one weight read per step, or the GEMM rate."""
    if name == "prefill":
        return prefill_max
    if name == "decode":
        return decode_max
    if name.startswith("concurrency"):
        return min(int(name.split()[1]) * decode_max, batched_max)
    return None


def build_rows(names: list[str], ours: dict[str, dict[str, Any]], ref: dict[str, Any] | None,
               cold: dict[str, float]) -> list[dict[str, Any]]:
    """One dict per workload: each system's figure, its share of the physical limit, and the ratios."""
    first = next(iter(ours.values()))["limits"]
    gemm, bandwidth, head = first["gemm_gflops"] * 1e9, first["bandwidth_gbs"] * 1e9, first["head_parameters"]
    rows = []
    for name in names:
        row: dict[str, Any] = {"workload": name, "tokenloom": {}, "limit": {}, "ratio": {}}
        theirs = None
        if name == "coldstart":
            theirs = cold.get("llama.cpp")
        elif ref is not None and name in ref["results"]:
            theirs = ref["results"][name]["tok_s"]
            params = ref["parameters"]
            row["limit"]["llama.cpp"] = row_limit(name, bandwidth / ref["model_bytes"], gemm / (2 * params),
                                                  gemm / (2 * (params - head)))
        row["llama.cpp"] = theirs
        for q, worker in ours.items():
            value = cold.get(q) if name == "coldstart" else worker["results"].get(name, {}).get("tok_s")
            row["tokenloom"][q] = value
            if name != "coldstart":
                lim = worker["limits"]
                row["limit"][q] = row_limit(name, lim["decode_tok_s_max"], lim["batched_tok_s_max"],
                                            lim["prefill_tok_s_max"])
            if value is not None and theirs is not None:  # >1: tokenloom is faster
                row["ratio"][q] = theirs / value if name == "coldstart" else value / theirs
        row["goal"] = GOALS.get(name)
        rows.append(row)
    return rows


def _cell(value: float | None, limit: float | None, seconds: bool) -> str:
    if value is None:
        return "-"
    if seconds:
        return f"{value:.2f} s"
    return f"{value:.1f}" + (f" ({100 * value / limit:.0f}%)" if limit else "")


def _goal_text(row: dict[str, Any]) -> str:
    if row["goal"] is None:
        return ""
    kind, target = row["goal"]
    if kind == "seconds":
        met = [q for q, v in row["tokenloom"].items() if v is not None and v <= target]
        return f"<= {target:g} s: " + (f"met by {', '.join(met)}" if met else "not met")
    met = [q for q, r in row["ratio"].items() if r >= target]
    if not row["ratio"]:
        return f">= {target:g}x: no llama.cpp figure"
    return f">= {target:g}x: " + (f"met by {', '.join(met)}" if met else "not met")


def agreement(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """How far tokenloom's greedy outputs follow llama.cpp's on the same prompts (decode and concurrency)."""
    pairs = []
    for name, result in ours["results"].items():
        theirs = ref["results"].get(name, {}).get("outputs", [])
        pairs += list(zip(result.get("outputs", []), theirs))
    prefixes = []
    for a, b in pairs:
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same)
    return {"requests": len(pairs), "first_token_same": sum(p >= 1 for p in prefixes),
            "first_8_same": sum(p >= 8 for p in prefixes),
            "median_common_prefix": statistics.median(prefixes) if prefixes else None, "common_prefixes": prefixes}


def print_report(machine: dict[str, Any], ours: dict[str, dict[str, Any]], ref: dict[str, Any] | None,
                 rows: list[dict[str, Any]], agree: dict[str, dict[str, Any]], notes: list[str]) -> None:
    """The machine, the limits, one line per workload, then the agreement check and notes."""
    llama = f"llama-cpp-python {machine['llama_cpp_python']}" if machine["llama_cpp_python"] else "no llama.cpp"
    print(f"\nmachine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs ({machine['physical_cores']} "
          f"physical cores), {machine['threads']} threads, torch {machine['torch']}, {llama}, {machine['date']}, "
          f"1-min load average at start {machine['loadavg_start']:.2f}, at end {machine['loadavg_end']:.2f}")
    if ref is not None:
        print(f"llama.cpp: {ref['system_info']}; {ref['context']}")
    isa = next(iter(ours.values()))["isa"]
    print(f"instruction sets: CPU {isa['cpu_isa']} ({machine['cpu_flags']}); tokenloom kernels {isa['isa_in_use']}; "
          f"torch {next(iter(ours.values()))['torch_cpu_capability']}; " + ", ".join(
              f"{q} = {w['resolved']} {w['dtype'].removeprefix('torch.')}" for q, w in ours.items()))
    first = next(iter(ours.values()))["limits"]
    print(f"limits: decode <= {first['bandwidth_gbs']:.0f} GB/s / weight bytes read per step:", ", ".join(
        f"tokenloom {q} {w['limits']['weight_bytes'] / 2**20:.0f} MiB -> {w['limits']['decode_tok_s_max']:.0f} tok/s"
        for q, w in ours.items()) + ("" if ref is None else f", llama.cpp {ref['model_bytes'] / 2**20:.0f} MiB "
                                     f"(the GGUF's tensors) -> {first['bandwidth_gbs'] * 1e9 / ref['model_bytes']:.0f}"
                                     " tok/s"))
    body = (first["parameters"] - first["head_parameters"]) / 1e6
    print(f"        batched <= {first['gemm_gflops']:.0f} GFLOP/s (2048^2 GEMM in {next(iter(ours.values()))['dtype']})"
          f" / (2 x {first['parameters'] / 1e6:.0f} M params) = {first['batched_tok_s_max']:.0f} tok/s; N streams "
          f"<= min(N x decode, batched); prefill <= GEMM / (2 x {body:.0f} M params outside the LM head) = "
          f"{first['prefill_tok_s_max']:.0f} tok/s; (x%) = share of the row's limit")
    quants = list(ours)
    heads = [f"tokenloom {q}" for q in quants] + ["llama.cpp"] + [f"ratio {q}" for q in quants]
    widths = [max(16, len(h)) for h in heads]
    header = " | ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
    print(f"\n{'workload (tok/s)':<18} | {header} | goal (issue 4)")
    for row in rows:
        secs = row["workload"] == "coldstart"
        cells = [_cell(row["tokenloom"][q], row["limit"].get(q), secs) for q in quants]
        cells.append(_cell(row["llama.cpp"], row["limit"].get("llama.cpp"), secs))
        cells += [f"{row['ratio'][q]:.2f}x" if q in row["ratio"] else "-" for q in quants]
        label = "cold start (s)" if secs else row["workload"]
        print(f"{label:<18} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + f" | {_goal_text(row)}")
    print("ratio = tokenloom / llama.cpp tokens per second (cold start: llama.cpp seconds / tokenloom seconds)")
    for q, a in agree.items():
        print(f"greedy agreement, tokenloom {q} vs llama.cpp on the same prompts: first token equal in "
              f"{a['first_token_same']}/{a['requests']} requests, first 8 tokens in {a['first_8_same']}/"
              f"{a['requests']}, median common prefix {a['median_common_prefix']} tokens")
    for note in notes:
        print(f"  {note}")


# ---------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="a model whose source is a GGUF file")
    p.add_argument("--quantization", default="auto",
                   help="tokenloom's weight formats, comma-separated, each optionally :dtype[:kv_cache_dtype] "
                        "(auto,int8,none:float32,auto::float16)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="the dtype of the formats that name none")
    p.add_argument("--threads", type=int, default=physical_cores(), help="threads for both systems (physical cores)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64], help="concurrent requests, e.g. 1,4,16,64")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of prefill and decode (median)")
    p.add_argument("--skip-llamacpp", action="store_true", help="run tokenloom only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the decode limit (default: measured, a streaming read of 1 GiB)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=["tokenloom", "llamacpp"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.quantization = [q.strip() for q in args.quantization.split(",") if q.strip()]
    if set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(set(args.workloads) - set(WORKLOADS))}; choose from {', '.join(WORKLOADS)}")
    if not args.quantization:
        p.error("--quantization needs at least one weight format")
    if args.reps < 1 or args.threads < 1 or not args.concurrency or min(args.concurrency) < 1:
        p.error("--reps, --threads and every --concurrency level must be >= 1")
    return args


def _isa_flags() -> str:
    """The CPU's vector instruction-set flags that matter here (AVX2, AVX-512 and its extensions, AMX, NEON)."""
    from tokenloom.models.ops import isa

    wanted = ("avx2", "fma", "f16c", "avx512", "amx", "avx_vnni", "asimd", "sve", "bf16", "i8mm")
    return " ".join(sorted(f for f in isa.cpu_flags() if f.startswith(wanted))) or "none reported"


def _gguf_path(args: argparse.Namespace) -> str | None:
    """The model's GGUF file (None for another format); also checks the quantizations tokenloom knows."""
    from tokenloom.config import QUANTIZATIONS  # imports torch: only in this (the parent) process
    from tokenloom.loader.sources import resolve_model

    unknown = [q for q in args.quantization if q.partition(":")[0] not in QUANTIZATIONS]
    if unknown:
        sys.exit(f"--quantization: unknown {unknown}; tokenloom knows {', '.join(QUANTIZATIONS)}")
    source = resolve_model(args.model)
    return str(source.path) if source.kind == "gguf" else None


def _llamacpp_usable(args: argparse.Namespace, gguf: str | None, notes: list[str]) -> bool:
    if args.skip_llamacpp:
        return False
    if importlib.util.find_spec("llama_cpp") is None:
        _log(INSTALL_HINT)
        notes.append(INSTALL_HINT)
        return False
    if gguf is None:
        notes.append(f"{args.model} is not a GGUF file: llama.cpp skipped")
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    """Run each system's workers and the cold starts, print (and optionally save) the comparison."""
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        result = tokenloom_worker(spec) if args.worker == "tokenloom" else llamacpp_worker(spec)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    loadavg_start = os.getloadavg()[0]  # other processes on the machine skew every figure: reported with them
    notes: list[str] = []
    gguf = _gguf_path(args)
    use_llama = _llamacpp_usable(args, gguf, notes)
    if args.bandwidth_gbs is None:
        import torch

        torch.set_num_threads(args.threads)
        args.bandwidth_gbs = read_bandwidth_gbs()
        notes.append(f"bandwidth measured: {args.bandwidth_gbs:.1f} GB/s (best of 5 sums of a 1 GiB float32 buffer, "
                     f"{args.threads} threads)")
    spec = {"model": args.model, "model_path": gguf, "workloads": args.workloads, "concurrency": args.concurrency,
            "reps": args.reps, "threads": args.threads, "seed": args.seed, "dtype": args.dtype,
            "bandwidth_gbs": args.bandwidth_gbs}
    cold: dict[str, float] = {}
    cold_runs: dict[str, list[float]] = {}
    if "coldstart" in args.workloads:  # first, while nothing else of ours runs
        for q in args.quantization:
            cold_runs[q] = coldstart(tokenloom_coldstart_code(args.model, q, args.dtype, args.threads))
            _log(f"tokenloom {q}: cold start {cold_runs[q]} s")
        if use_llama:
            try:
                cold_runs["llama.cpp"] = coldstart(llamacpp_coldstart_code(gguf, args.threads))
                _log(f"llama.cpp: cold start {cold_runs['llama.cpp']} s")
            except RuntimeError as exc:
                _log(f"llama.cpp {exc}")
                notes.append(f"llama.cpp {exc}")
        cold = {k: v[-1] for k, v in cold_runs.items()}
    ours = {q: run_worker("tokenloom", {**spec, "quantization": q}) for q in args.quantization}
    ref = None
    if use_llama:
        vocab = next(iter(ours.values()))["vocab"]
        try:
            ref = run_worker("llamacpp", {**spec, "vocab": vocab})
        except RuntimeError as exc:
            _log(f"llama.cpp worker failed: {exc}")
            notes.append(f"llama.cpp worker failed: {exc}")
        if ref is not None and ref["vocab"] != vocab:
            notes.append(f"vocabularies differ: tokenloom {vocab}, llama.cpp {ref['vocab']}; prompts use ids < {vocab}")
    machine = {"cpu": cpu_model(), "cpu_flags": _isa_flags(), "logical_cpus": os.cpu_count(),
               "physical_cores": physical_cores(), "threads": args.threads, **_versions(),
               "date": datetime.datetime.now().isoformat(timespec="minutes"),
               "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]}
    names = row_names(args.workloads, args.concurrency)
    rows = build_rows(names, ours, ref, cold)
    agree = {q: agreement(w, ref) for q, w in ours.items()} if ref is not None else {}
    notes += [f"tokenloom {q}: loaded in {w['load_s']:.1f} s in its worker" for q, w in ours.items()]
    if ref is not None:
        notes.append(f"llama.cpp: model loaded in {ref['load_s']:.1f} s in its worker, "
                     f"{ref['parameters'] / 1e6:.0f} M params")
    notes += [f"cold start runs (s), {k}: {', '.join(f'{t:.2f}' for t in v)}" for k, v in cold_runs.items()]
    print_report(machine, ours, ref, rows, agree, notes)
    if args.json:
        data = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")}, "machine": machine,
                "rows": rows, "agreement": agree, "notes": notes, "cold_start_runs": cold_runs,
                "tokenloom": ours, "llama.cpp": ref}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
