"""The engine's structured outputs: compiled constraints cached by value, one matcher per request, and each
step's token bitmask for the constrained rows, filled on a helper thread while the forward pass runs.

Compiling is thread-safe and cached (an LRU of `cache_size` constraints): the server compiles a request's
constraint on a worker thread before the request reaches the engine's loop, so a slow grammar never stalls
the other requests' steps, and the engine's own lookup is then a cache hit.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenloom.models import ops
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured.backend import Backend, Matcher, StructuredOutputError, TokenizerInfo, backend_factory


@dataclass(slots=True)
class StepMasks:
    """One step's token masks: `bitmask` [rows, words] (int32; only constrained rows are set) and the rows whose
    grammar allows exactly one token, with that token (`forced`: row -> token id)."""

    bitmask: torch.Tensor
    forced: dict[int, int] = field(default_factory=dict)


class StructuredOutputs:
    """Constraint compilation (cached), matchers, and per-step bitmasks for one engine."""

    def __init__(self, info: TokenizerInfo, default_backend: str = "llguidance", cache_size: int = 256) -> None:
        self.info = info
        self.default_backend = default_backend
        self.cache_size = cache_size
        self.words = (info.vocab_size + 31) // 32
        self._backends: dict[str, Backend] = {}
        self._cache: OrderedDict[tuple[str, StructuredOutputsParams], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # Where cores are spare (torch runs on fewer than this process may use) the masks fill beside the
        # forward pass, with a backend's parallel fill. Where torch's threads take every core, a thread
        # beside them stalls each of their parallel regions (measured on 2 cores: 1.5x the fill's own time
        # added to the step), so the runner waits for the masks before the forward starts. Decided here, on
        # the engine's thread (torch's thread count is that thread's setting).
        self.spare_cores = len(os.sched_getaffinity(0)) > torch.get_num_threads() \
            if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > torch.get_num_threads()

    def _backend(self, name: str) -> Backend:
        with self._lock:
            if name not in self._backends:
                self._backends[name] = backend_factory(name)(self.info)
            return self._backends[name]

    def compile(self, params: StructuredOutputsParams) -> tuple[Backend, Any]:
        """The backend and compiled form of `params`, from the cache or compiled now (thread-safe);
        StructuredOutputError names what is wrong."""
        name = params.backend or self.default_backend
        key = (name, params)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._backends[name], self._cache[key]
        backend = self._backend(name)
        compiled = backend.compile(params)  # outside the lock: other constraints compile meanwhile
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return backend, compiled

    def warm_up(self) -> None:
        """Prepare the default backend on a background thread (llguidance converts the tokenizer: seconds
        for a large vocabulary), so a server's first constrained request does not wait for it."""
        def prepare() -> None:
            backend = self._backend(self.default_backend)
            if hasattr(backend, "prepare"):
                backend.prepare()

        threading.Thread(target=prepare, name="tokenloom-structured-warm-up", daemon=True).start()

    def matcher(self, params: StructuredOutputsParams) -> Matcher:
        """A fresh matcher for one request."""
        backend, compiled = self.compile(params)
        return backend.matcher(compiled)

    def bitmask_async(self, requests: list[Any]) -> Future[StepMasks] | None:
        """Start filling the step's masks for `requests` (the bitmask's rows of requests with a matcher, the
        others left unset) on the helper thread; None when no request has a matcher."""
        rows = [(r.matcher, i) for i, r in enumerate(requests) if r.matcher is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenloom-masks")
        return self._pool.submit(self._fill, rows, len(requests))

    def _fill(self, rows: list[tuple[Matcher, int]], num_rows: int) -> StepMasks:
        bitmask = torch.empty((num_rows, self.words), dtype=torch.int32)  # only constrained rows are read
        by_type: dict[type, list[tuple[Matcher, int]]] = {}
        for matcher, row in rows:
            by_type.setdefault(type(matcher), []).append((matcher, row))
        for kind, group in by_type.items():
            fill_many = getattr(kind, "fill_many", None) if self.spare_cores else None
            if fill_many is not None and len(group) > 1:
                fill_many(group, bitmask)
            else:
                for matcher, row in group:
                    matcher.fill_bitmask(bitmask, row)
        return StepMasks(bitmask, single_tokens(bitmask, [row for _, row in rows], self.info.vocab_size))


def single_tokens(bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> dict[int, int]:
    """The rows of `bitmask` that allow exactly one token (below `vocab_size`), with that token. numpy, not
    torch: this runs on the helper thread, beside the forward pass's own thread pool."""
    words = bitmask.numpy()
    forced = {}
    for row in rows:
        line = words[row]
        if np.count_nonzero(line) != 1:
            continue
        w = int(np.flatnonzero(line)[0])
        word = int(line[w]) & 0xFFFFFFFF
        token = 32 * w + word.bit_length() - 1
        if word & (word - 1) == 0 and token < vocab_size:
            forced[row] = token
    return forced

def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of `rows` whose bit is clear in the same row of `bitmask` (a native
    kernel on CPU; elsewhere the bits unpacked with tensor ops)."""
    if ops.apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.long)):
        return
    vocab = logits.shape[1]
    index = torch.tensor(rows, device=logits.device)
    words = bitmask[index.cpu()].to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
    logits[index] = logits[index].masked_fill_(~allowed, float("-inf"))


__all__ = ["StepMasks", "StructuredOutputError", "StructuredOutputs", "apply_bitmask", "single_tokens"]
