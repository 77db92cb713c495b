"""Beam search: tokenloom's `LLM.beam_search` against transformers' `generate(num_beams=...)` on the same
model and dtype, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/beam_search.py [--model gemma-3-270m] [--beam-width 4]
        [--max-tokens 64] [--dtype float32] [--threads 2]

EOS is ignored on both sides, so every hypothesis runs to max_tokens and the work is fixed. tokenloom
searches all prompts together (one batch of prompts x beams per step, each beam's history reused from
its parent's blocks); transformers runs each prompt alone (exact, for the agreement check) and all
prompts as one left-padded batch. Printed: wall time, beam tokens/s (prompts x beams x max_tokens per
second), the ratio, and how many prompts' best hypotheses agree token for token with transformers'.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_model, timed  # noqa: E402
from benchmarks.throughput import load_hf  # noqa: E402

PROMPTS = ["The history of the printing press begins", "A good recipe for bread needs", "In the year 2100, cities",
           "The main difference between a compiler and an interpreter is", "Once upon a time, in a small village,",
           "To train a neural network, you first", "The ocean covers most of the Earth and", "My favourite book is"]


def hf_beams(hf: torch.nn.Module, prompts: list[list[int]], width: int, max_tokens: int, pad: int) -> list[list[int]]:
    """Best hypothesis of each prompt, all prompts in one left-padded batch."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, num_beams=width, do_sample=False, max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, pad_token_id=pad)
    return [row[longest:].tolist() for row in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tokenloom import BeamSearchParams
    from tokenloom.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, kv_cache_gib=1.0, num_threads=args.threads)
    prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens, ignore_eos=True)
    llm.beam_search(prompts[:1], BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))  # warm-up
    ours, t_ours = timed(lambda: llm.beam_search(prompts, params))
    ours_best = [out.sequences[0].token_ids for out in ours]

    hf = load_hf(args.model, getattr(torch, args.dtype))
    pad = hf.generation_config.pad_token_id or 0
    alone, t_alone = timed(lambda: [hf_beams(hf, [p], args.beam_width, args.max_tokens, pad)[0] for p in prompts])
    _, t_batch = timed(lambda: hf_beams(hf, prompts, args.beam_width, args.max_tokens, pad))

    work = len(prompts) * args.beam_width * args.max_tokens
    agree = sum(a == b for a, b in zip(ours_best, alone))
    print(f"machine: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"model: {args.model} ({args.dtype}), {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, beam width {args.beam_width}, {args.max_tokens} tokens, EOS ignored")
    print(f"{'system':<36}{'seconds':>9}{'beam tok/s':>12}{'tokenloom x':>13}")
    for name, seconds in (("tokenloom (all prompts together)", t_ours), ("transformers, each prompt alone", t_alone),
                          ("transformers, one padded batch", t_batch)):
        print(f"{name:<36}{seconds:>9.2f}{work / seconds:>12,.0f}{seconds / t_ours:>12.2f}x")
    print(f"best hypotheses equal to transformers' (each prompt alone): {agree}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
