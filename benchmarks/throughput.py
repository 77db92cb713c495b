"""Offline throughput: tokenloom vs transformers' batched `generate`, same model and dtype, in one run.

Run by hand (never in CI), e.g.
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/throughput.py --workloads fixed,mixed,single
    .venv/bin/python benchmarks/throughput.py --scale 0.05 --skip-hf        # quick smoke run

Workloads are greedy with EOS ignored, on random prompt token ids in [10, vocab) from a seeded generator:
  fixed   64 requests x 128 prompt x 128 output tokens (transformers: one unpadded batch)
  mixed   128 requests, prompt lengths U[16, 512], output lengths U[16, 256] (transformers: left-padded
          batches of 64, each generating the batch's longest output; only requested tokens count)
  single  one request, 128 prompt x 128 output tokens, plus time to first token (a max_tokens=1 run)
tokens/s = generated tokens / wall time of the whole workload. `--scale` multiplies counts and lengths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from common import MIN_TOKEN_ID, cpu_model, physical_limits, random_prompts, timed

from tokenloom import SamplingParams
from tokenloom.llm import LLM
from tokenloom.loader.sources import resolve_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
NUM_COMPARED = 8  # fixed workload: how many requests' greedy outputs to compare between the two systems


@dataclass
class Workload:
    """Prompts, how many tokens each request asks for, and the transformers batch size."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    hf_batch: int


@dataclass
class Result:
    """One system's run of one workload."""

    tokens: int
    seconds: float
    ttft_s: float | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tok_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.tokens / self.seconds


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def make_workload(name: str, vocab: int, scale: float, seed: int) -> Workload:
    """Build one named workload; each gets its own seeded stream, so prompts never repeat across them."""
    rng = np.random.default_rng([seed, ["fixed", "mixed", "single"].index(name)])
    s = lambda n: _scaled(n, scale)
    if name == "fixed":
        n = s(64)
        return Workload(name, random_prompts(rng, [s(128)] * n, vocab), [s(128)] * n, n)
    if name == "mixed":
        n = s(128)
        prompt_lens = rng.integers(s(16), s(512) + 1, size=n).tolist()
        output_lens = rng.integers(s(16), s(256) + 1, size=n).tolist()
        return Workload(name, random_prompts(rng, prompt_lens, vocab), output_lens, s(64))
    return Workload(name, random_prompts(rng, [s(128)], vocab), [s(128)], 1)


# ---------------------------------------------------------------- tokenloom


def tokenloom_generate(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
    """Greedy, EOS ignored, each request its own max_tokens; returns the generated ids."""
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in output_lens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def run_tokenloom(llm: LLM, wl: Workload, ttft_prompt: list[int] | None) -> Result:
    """The whole workload as one `generate` call (continuous batching), optionally then a TTFT probe."""
    outputs, seconds = timed(lambda: tokenloom_generate(llm, wl.prompts, wl.output_lens))
    _check_lengths("tokenloom", wl, outputs)
    ttft = None
    if ttft_prompt is not None:  # a fresh prompt, so the prefix cache cannot help
        ttft = timed(lambda: tokenloom_generate(llm, [ttft_prompt], [1]))[1]
    return Result(sum(wl.output_lens), seconds, ttft, outputs)


# ---------------------------------------------------------------- transformers


def load_hf(model: str, dtype: torch.dtype) -> torch.nn.Module:
    """The same model through transformers (a GGUF file is dequantized to `dtype`, which takes a while)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(model)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if source.kind == "gguf":
        try:  # newer transformers may keep GGUF blocks packed (fp32 kernels): ask for a dense model in `dtype`
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
        hf = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, **kwargs)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    hf.generation_config.eos_token_id = None  # ignore EOS, as tokenloom's ignore_eos (no masking either)
    return hf.eval()


def hf_pad_id(hf: torch.nn.Module) -> int:
    """The model's pad token id (0 when it names none)."""
    pad = hf.generation_config.pad_token_id
    pad = pad if pad is not None else getattr(hf.config, "pad_token_id", None)
    return int(pad[0] if isinstance(pad, list) else pad) if pad is not None else 0


def hf_generate(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """One left-padded batch, greedy, exactly `new_tokens` per row; returns the generated ids."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=hf.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id)
    return out[:, width:].tolist()


def run_hf(hf: torch.nn.Module, wl: Workload, pad_id: int, ttft_prompt: list[int] | None) -> Result:
    """Batches of `wl.hf_batch` in request order; each batch runs to its longest requested output."""
    outputs: list[list[int]] = []
    seconds = 0.0
    for start in range(0, len(wl.prompts), wl.hf_batch):
        prompts = wl.prompts[start:start + wl.hf_batch]
        lens = wl.output_lens[start:start + wl.hf_batch]
        longest = max(lens)
        batch, took = timed(lambda p=prompts, k=longest: hf_generate(hf, p, k, pad_id))
        outputs += [row[:k] for row, k in zip(batch, lens)]
        seconds += took
    _check_lengths("transformers", wl, outputs)
    ttft = None if ttft_prompt is None else timed(lambda: hf_generate(hf, [ttft_prompt], 1, pad_id))[1]
    return Result(sum(wl.output_lens), seconds, ttft, outputs)


def _check_lengths(system: str, wl: Workload, outputs: list[list[int]]) -> None:
    got = [len(o) for o in outputs]
    if got != wl.output_lens:
        raise RuntimeError(f"{system} {wl.name}: generated {got[:8]}... tokens, asked for {wl.output_lens[:8]}...")


# ---------------------------------------------------------------- context: machine and physical limits


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, library versions and the date, for the results table."""
    import transformers

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "loadavg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------- report


def _cell(r: Result | None) -> str:
    return "-" if r is None else f"{r.tok_s:9.1f} ({r.seconds:6.1f} s)"


def print_report(machine: dict[str, Any], limits: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """The machine, the physical limits, then one line per workload."""
    print(f"\nmachine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['threads']} threads, "
          f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['date']}, "
          f"1-min load average at start {machine['loadavg_start']:.2f}, at end {machine['loadavg_1min']:.2f}")
    print(f"model: {limits['parameters'] / 1e6:.1f} M parameters, {limits['weight_bytes'] / 2**20:.0f} MiB of weights; "
          f"limits: decode <= {limits['bandwidth_gbs']:.0f} GB/s / weight bytes = {limits['decode_tok_s_max']:.0f} "
          f"tok/s; batched <= {limits['gemm_gflops']:.0f} GFLOP/s (2048^2 GEMM) / (2 x params) = "
          f"{limits['batched_tok_s_max']:.0f} tok/s")
    print(f"\n{'workload':<8} | {'requests':>8} | {'out tokens':>10} | {'tokenloom tok/s':>22} | "
          f"{'transformers tok/s':>22} | {'ratio':>6}")
    for row in rows:
        ours, ref = row["tokenloom"], row["transformers"]
        ratio = f"{ours.tok_s / ref.tok_s:6.2f}" if ref else "     -"
        print(f"{row['workload']:<8} | {row['requests']:>8} | {ours.tokens:>10} | {_cell(ours):>22} | "
              f"{_cell(ref):>22} | {ratio}")
    for row in rows:
        for note in row["notes"]:
            print(f"  {row['workload']}: {note}")


def _notes(wl: Workload, ours: Result, ref: Result | None) -> list[str]:
    notes = []
    if ours.ttft_s is not None:
        hf_ttft = f", transformers {ref.ttft_s * 1e3:.0f} ms" if ref and ref.ttft_s is not None else ""
        notes.append(f"time to first token: tokenloom {ours.ttft_s * 1e3:.0f} ms{hf_ttft}")
    if ref is not None and wl.name == "fixed":
        k = min(NUM_COMPARED, len(wl.prompts))
        same = sum(a == b for a, b in zip(ours.outputs[:k], ref.outputs[:k]))
        notes.append(f"greedy outputs identical to transformers for {same} of the first {k} requests")
    if wl.name == "mixed" and ref is not None:
        padded = sum(max(wl.output_lens[i:i + wl.hf_batch]) * len(wl.output_lens[i:i + wl.hf_batch])
                     for i in range(0, len(wl.output_lens), wl.hf_batch))
        notes.append(f"transformers generated {padded} tokens in its padded batches; {ours.tokens} count")
    return notes


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--workloads", default="fixed,mixed,single")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies request counts and lengths")
    p.add_argument("--quantization", default="none", help="tokenloom's weight format (none, int8, int4)")
    p.add_argument("--skip-hf", action="store_true", help="run tokenloom only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (use physical cores)")
    p.add_argument("--bandwidth-gbs", type=float, default=30.0, help="memory bandwidth for the decode limit")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both systems)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - {"fixed", "mixed", "single"}
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from fixed, mixed, single")
    return args


def _load_tokenloom(args: argparse.Namespace) -> LLM:
    llm, seconds = timed(lambda: LLM(args.model, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
                                      max_num_seqs=args.max_num_seqs, num_threads=args.threads,
                                      max_num_batched_tokens=args.max_num_batched_tokens,
                                      quantization=args.quantization, device=args.device))
    print(f"tokenloom loaded {args.model} in {seconds:.1f} s", flush=True)
    tokenloom_generate(llm, [[MIN_TOKEN_ID + i for i in range(8)]] * 2, [4, 4])  # warm-up
    return llm


def _load_hf(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    hf, seconds = timed(lambda: load_hf(args.model, DTYPES[args.dtype]).to(args.device))
    print(f"transformers loaded {args.model} in {seconds:.1f} s", flush=True)
    pad_id = hf_pad_id(hf)
    hf_generate(hf, [[MIN_TOKEN_ID + i for i in range(8)], [MIN_TOKEN_ID + 1] * 6], 4, pad_id)  # warm-up
    return hf, pad_id


def main(argv: list[str] | None = None) -> None:
    """Load both systems, run each workload on each, print (and optionally save) the comparison."""
    args = parse_args(argv)
    load_start = os.getloadavg()[0]  # other processes on the machine skew every figure: reported with them
    torch.set_num_threads(args.threads)
    llm = _load_tokenloom(args)
    hf, pad_id = (None, 0) if args.skip_hf else _load_hf(args)
    vocab = llm.engine.vocab_size
    ttft_prompt = random_prompts(np.random.default_rng([args.seed, 99]), [_scaled(128, args.scale)], vocab)[0]
    rows = []
    for name in args.workloads:
        wl = make_workload(name, vocab, args.scale, args.seed)
        probe = ttft_prompt if name == "single" else None
        print(f"running {name}: {len(wl.prompts)} requests, {sum(wl.output_lens)} output tokens", flush=True)
        ours = run_tokenloom(llm, wl, probe)
        ref = None if hf is None else run_hf(hf, wl, pad_id, probe)
        rows.append({"workload": name, "requests": len(wl.prompts), "tokenloom": ours, "transformers": ref,
                     "notes": _notes(wl, ours, ref)})
    machine = {**machine_info(args.threads), "loadavg_start": load_start}
    limits = physical_limits(llm, DTYPES[args.dtype], args.bandwidth_gbs)
    print_report(machine, limits, rows)
    if args.json:
        _write_json(args, machine, limits, rows)


def _write_json(args: argparse.Namespace, machine: dict[str, Any], limits: dict[str, float],
                rows: list[dict[str, Any]]) -> None:
    def result(r: Result | None) -> dict[str, Any] | None:
        return None if r is None else {**{k: v for k, v in asdict(r).items() if k != "outputs"}, "tok_s": r.tok_s}

    data = {"args": vars(args), "machine": machine, "limits": limits,
            "results": [{**row, "tokenloom": result(row["tokenloom"]), "transformers": result(row["transformers"]),
                         "ratio": row["tokenloom"].tok_s / row["transformers"].tok_s if row["transformers"] else None}
                        for row in rows]}
    with open(args.json, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
