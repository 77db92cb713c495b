"""Helpers shared by the benchmarks: prompts, timing, the machine, and the physical limits of a step.

Importing this module is cheap (no torch): `cpu_bench.py` runs llama.cpp in a worker process that
must not load torch's OpenMP runtime next to llama.cpp's, and that worker imports it too.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tokenloom.llm import LLM

MIN_TOKEN_ID = 10  # below this are the special tokens (pad, bos, eos, unk, ...)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn's value and the wall time it took, in seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def random_prompts(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[list[int]]:
    """One prompt of random token ids in [MIN_TOKEN_ID, vocab) per length."""
    return [rng.integers(MIN_TOKEN_ID, vocab, size=n).tolist() for n in lengths]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or "unknown")
    except OSError:
        return platform.processor() or "unknown"


def physical_cores() -> int:
    """Distinct (socket, core) pairs in /proc/cpuinfo; the logical CPU count where that is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().strip().split("\n\n")
    except OSError:
        return os.cpu_count() or 1
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or os.cpu_count() or 1


def gemm_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (one warm-up, then `reps` timed)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    _, seconds = timed(lambda: [torch.mm(a, b) for _ in range(reps)])
    return 2 * n**3 * reps / seconds


def read_bandwidth_gbs(mib: int = 1024, reps: int = 5) -> float:
    """Measured streaming-read bandwidth in GB/s: the best of `reps` sums of a float32 buffer of `mib` MiB
    (far larger than the caches), on torch's threads."""
    import torch

    buffer = torch.ones(mib * (1 << 20) // 4)
    buffer.sum()
    best = min(timed(buffer.sum)[1] for _ in range(reps))
    return buffer.numel() * 4 / best / 1e9


def physical_limits(llm: LLM, dtype: torch.dtype, bandwidth_gbs: float) -> dict[str, float]:
    """Decode <= bandwidth / weight bytes read per token; batched <= GEMM FLOP/s / (2 x parameters);
    prefill <= GEMM FLOP/s / (2 x parameters outside the LM head), which runs for sampled positions only."""
    from tokenloom.models.layers.quantized import GroupQuantLinear

    model = llm.engine.loaded.model
    num_params = sum(p.numel() for p in model.parameters()) + sum(  # quantized layers hold buffers, not parameters
        m.out_features * m.in_features for m in model.modules() if isinstance(m, GroupQuantLinear))
    head_params = lm_head_parameters(model)
    weight_bytes = decode_bytes(model)
    flops = gemm_flops(dtype)
    return {"parameters": num_params, "head_parameters": head_params, "weight_bytes": weight_bytes,
            "bandwidth_gbs": bandwidth_gbs, "gemm_gflops": flops / 1e9,
            "decode_tok_s_max": bandwidth_gbs * 1e9 / weight_bytes, "batched_tok_s_max": flops / (2 * num_params),
            "prefill_tok_s_max": flops / (2 * (num_params - head_params))}


def lm_head_parameters(model: torch.nn.Module) -> int:
    """Entries of the vocabulary projection (a quantized head wraps the dense one); 0 without an lm_head."""
    head = getattr(model, "lm_head", None)
    weight = getattr(getattr(head, "dense", head), "weight", None)
    return 0 if weight is None else weight.numel()


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of matrices one single-row decode step reads: every linear layer and the LM head in the
    format the step uses (embedding lookups read one row and are left out)."""
    import torch

    from tokenloom.models.layers.linear import TiedLMHead
    from tokenloom.models.layers.quantized import GroupQuantLinear, QuantizedLMHead

    def nbytes(*tensors: torch.Tensor | None) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    head = getattr(model, "lm_head", None)
    dense_head = head.dense if isinstance(head, QuantizedLMHead) else None  # not read at a few rows
    total = 0
    for m in model.modules():
        if isinstance(m, (GroupQuantLinear, QuantizedLMHead)):  # codes, scales, minimums (a head's dense matrix
            # is a submodule, not read at a few rows)
            total += nbytes(*m.buffers(recurse=False))
        elif isinstance(m, (torch.nn.Linear, TiedLMHead)) and m is not dense_head:
            total += nbytes(m.weight, getattr(m, "bias", None))
    return total
