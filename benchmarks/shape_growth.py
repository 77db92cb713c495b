"""Native memory kept per distinct step shape, offline (issue 17): random batches through `LLM.generate`, malloc's
bytes in use read after `gc.collect()` and `malloc_trim(0)` every few batches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shape_growth.py --requests 2000 [--fixed] [--onednn-verbose]
        [--feature plain|sampled|n2|logprobs|stop|structured|chat]

Batches hold 1–24 prompts of 3–60 words and ask 4–24 new tokens each (`--fixed`: always 8 prompts of 30 words,
16 tokens: one shape, the control). It prints the in-use bytes against requests served and the growth per 1,000
requests over the second half; `--onednn-verbose` also counts oneDNN primitives created, by kind and shape
(torch's GEMMs that build a primitive per new shape and keep it in a cache). `--feature` adds one of the soak's
request kinds to every request (benchmarks/soak.py: temperature 0.8, n = 2, logprobs 3, two stop strings, its JSON
schema, chat through the template), so the growth the server shows can be pinned on a feature offline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import io
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memwatch import _mallinfo  # noqa: E402

FEATURES = ("plain", "sampled", "n2", "logprobs", "stop", "structured", "chat")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "bright", "stars",
         "drift", "above", "quiet", "hills", "and", "rivers", "carry", "old", "songs", "toward", "distant", "sea"]


def _batch(rng: random.Random, fixed: bool) -> tuple[list[str], int]:
    if fixed:
        return [" ".join(rng.choices(WORDS, k=30)) for _ in range(8)], 16
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for _ in range(rng.randint(1, 24))], \
        rng.randint(4, 24)


def _in_use_mib() -> float:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _mallinfo().get("in_use", 0) / 2**20


def main() -> None:
    """Run the batches and print the growth."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--fixed", action="store_true", help="every batch the same shape (the control)")
    parser.add_argument("--onednn-verbose", action="store_true", help="count oneDNN primitive creations")
    parser.add_argument("--model", default=None, help="default: the embedded gemma-3-270m")
    parser.add_argument("--feature", choices=FEATURES, default="plain", help="a soak request kind on every request")
    args, engine_args = parser.parse_known_args()
    import torch

    from tokenloom import LLM

    options = {}
    for item in engine_args:  # --key=value engine options
        key, _, value = item.lstrip("-").partition("=")
        options[key.replace("-", "_")] = value
    llm = LLM(args.model, **options)
    rng = random.Random(0)
    served, readings, created = 0, [], Counter()
    start = time.perf_counter()
    while served < args.requests:
        prompts, tokens = _batch(rng, args.fixed)
        run = _request(llm, prompts, tokens, args.feature, rng)
        if args.onednn_verbose:
            created.update(_created_primitives(run, torch))
        else:
            run()
        served += len(prompts)
        if not readings or served - readings[-1][0] >= args.requests // 20:
            readings.append((served, _in_use_mib()))
            made = f"  {sum(created.values())} oneDNN primitives so far" if args.onednn_verbose else ""
            print(f"{served:6d} requests  {readings[-1][1]:9.1f} MiB in use  {time.perf_counter() - start:7.1f} s"
                  f"{made}", flush=True)
    half = [r for r in readings if r[0] >= args.requests // 2]
    if len(half) >= 2:
        (n0, m0), (n1, m1) = half[0], half[-1]
        print(f"growth over the second half: {(m1 - m0) / (n1 - n0) * 1000:.1f} MiB per 1,000 requests")
    print(f"total {time.perf_counter() - start:.1f} s")
    for (kind, shape), count in created.most_common(40):
        print(f"{count:6d}  {kind:12s} {shape}")
    print(f"{sum(created.values())} primitives created in all, {len(created)} distinct")


def _request(llm, prompts: list[str], tokens: int, feature: str, rng: random.Random):
    """The batch as a call of `llm`, with `feature`'s parameters."""
    from soak import SCHEMA

    from tokenloom import SamplingParams
    from tokenloom.sampling_params import StructuredOutputsParams

    options: dict = {"max_tokens": tokens, "min_tokens": tokens, "temperature": 0.0}
    if feature in ("sampled", "n2"):
        options.update(temperature=0.8, seed=rng.randrange(2**31), n=2 if feature == "n2" else 1)
    elif feature == "logprobs":
        options.update(logprobs=3)
    elif feature == "stop":
        options.update(stop=[rng.choice(WORDS), "."], min_tokens=0)
    elif feature == "structured":
        options.update(structured_outputs=StructuredOutputsParams(json=SCHEMA), max_tokens=48, min_tokens=0)
    params = SamplingParams(**options)
    if feature in ("chat", "structured"):
        conversations = [[{"role": "user", "content": text}] for text in prompts]
        return functools.partial(llm.chat, conversations, params, use_tqdm=False)
    return functools.partial(llm.generate, prompts, params, use_tqdm=False)


def _created_primitives(run, torch) -> Counter:
    """Primitives oneDNN created (cache misses) while `run` ran, by kind and problem description."""
    out = Counter()
    buffer = io.StringIO()
    saved = os.dup(1)
    with open("/tmp/_onednn_verbose.txt", "w+") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
                run()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        buffer.write(sink.read())
    for line in buffer.getvalue().splitlines():
        fields = line.split(",")
        if "create:cache_miss" in line and len(fields) > 6:
            out[(fields[5], fields[-2])] += 1
    return out


if __name__ == "__main__":
    main()
