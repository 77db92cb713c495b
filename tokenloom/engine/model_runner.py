"""SchedulerOutput → packed tensors (ids, positions, slots, block tables) → model → sampled ids, or, for an
encoder-only model, → encoder → heads and pooling (engine/pooling.py): the runner branches once per step.

The packed batch has no padding: prefill chunks first, then one token per decoding request. Logits
are computed only for positions that are sampled (and for prompt positions whose logprobs were
asked for).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from torch import nn

from tokenloom import faults
from tokenloom.adapters.manager import AdapterManager, VirtualSpan
from tokenloom.engine.encoder_cache import EncoderCache
from tokenloom.engine.pooling import PoolingRunner
from tokenloom.engine.request import Request
from tokenloom.engine.sampler import Sampler, prompt_logprobs, takes_forced_token
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.engine.speculative import accepted_prefix, draft_position
from tokenloom.models.layers.attention import (
    AttentionMetadata,
    PrefillSpan,
    attention_layers,
    index_attention_layers,
)
from tokenloom.models.registry import model_kind
from tokenloom.outputs import PositionLogprobs
from tokenloom.structured import StructuredOutputs
from tokenloom.structured.manager import StepMasks

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
SHORT_CHUNK = 8  # a draft runner's chunk of up to this many tokens after computed ones runs as decode rows


@dataclass(slots=True)
class RunnerOutput:
    """New tokens per request id (one, or with speculation its accepted guesses and the model's next token),
    plus their logprobs where asked for; a pooling step's results instead."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, other: RunnerOutput) -> None:
        """Merge another step's results (the engine's one-request-at-a-time retry)."""
        self.sampled.update(other.sampled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.pooled.update(other.pooled)


@cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep freed memory for reuse.

    By default every allocation above a few MiB is a fresh mmap, returned on free: a step's large
    tensors (a batch's logits are 64 MiB at 64 rows) then fault in new zero pages every step, which
    can cost more than the arithmetic (docs/benchmarks.md, "Kernel design notes"). The process keeps its
    peak heap instead of returning it, as a server would with jemalloc or tcmalloc.
    `TOKENLOOM_MALLOC_TUNING=0` leaves malloc alone."""
    if os.environ.get("TOKENLOOM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    if not ok:
        logger.debug("mallopt refused the tuning; malloc keeps its defaults")
    return ok


class FreedMemoryReleaser:
    """Hands the free memory malloc keeps (`keep_freed_memory`) back to the operating system now and then.

    Under a long mixed load glibc's heaps fragment: freed blocks that no later request fits stay resident, and
    in a server soak most of the resident memory's growth was such free bytes (docs/reliability.md: 46.7 MiB
    per 1,000 requests before, 18.1 after, over 15 minutes). `malloc_trim(0)` returns the free pages inside the
    heaps.
    It runs at most every `interval` seconds while the engine works and when it goes idle; the step after it
    faults its large tensors' pages in again, once."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._trim = None
        if keep_freed_memory():
            try:
                self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
        self._last = time.monotonic()

    def after_step(self, idle: bool) -> None:
        """Called after every engine step; `idle` when no request is left."""
        if self._trim is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or (idle and now - self._last >= 1.0):
            self._trim(0)
            self._last = time.monotonic()
            logger.debug("malloc_trim took %.1f ms", 1e3 * (self._last - now))


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block occupies across every attention layer (keys and values) in the cache's `dtype`."""
    per_token = sum(2 * a.num_kv_heads * a.head_dim for a in attention_layers(model))
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    """Runs the model on a scheduled batch over its bound paged KV cache."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, pooling: PoolingRunner | None = None, adapters: AdapterManager | None = None,
                 short_chunks_as_decode: bool = False) -> None:
        """`dtype` is the KV cache's (the engine's `kv_cache_dtype` resolved); `short_chunks_as_decode` runs chunks
        of up to SHORT_CHUNK tokens after computed ones as decode rows (a draft model's runner)."""
        self.short_chunks_as_decode = short_chunks_as_decode
        self.model = model
        self.pooling = pooling
        self.adapters = adapters
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.freed_memory = FreedMemoryReleaser() if device.type == "cpu" else None
        self.attention = index_attention_layers(model)
        for attn in self.attention:
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = (torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))
        self.encoder_cache = EncoderCache(model, device) if model_kind(model) == "encoder-decoder" else None
        self.structured: StructuredOutputs | None = None  # the engine's, for constrained requests' bitmasks

    def kv_cache_bytes(self) -> int:
        """Bytes of the paged KV cache tensors, every layer."""
        return sum(t.numel() * t.element_size() for attn in self.attention for t in attn.kv_cache or ())

    def release(self, request_ids: list[str]) -> None:
        """Forget per-request state (encoder outputs) of requests that finished or were preempted."""
        if self.encoder_cache is not None and request_ids:
            self.encoder_cache.release(request_ids)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and sample the requests that reached their last token (pool them, on an
        encoder-only model)."""
        if self.pooling is not None:
            return RunnerOutput(pooled=self.pooling.execute(sched.requests))
        faults.hit("forward", (r.prompt_token_ids for r in sched.requests))
        self._copy_blocks(sched.block_copies)
        batch = self._prepare(sched)
        if self.adapters is not None:
            batch.meta.virtual_kv = self.adapters.begin_step(batch.adapter_rows, len(batch.input_ids),
                                                             batch.virtual_spans)
        # the sampled rows' requests (a speculating request at each of its guesses: engine/speculative.py)
        row_reqs = [sched.requests[i] if not guesses else draft_position(sched.requests[i], guesses)
                    for i, guesses in zip(batch.sample_rows, batch.sample_guesses, strict=True)]
        # constrained requests' token masks, filled on a helper thread: beside the forward pass where cores
        # are spare, else before it (StructuredOutputs.spare_cores)
        masks = self.structured.bitmask_async([r for r in row_reqs if not r.head_only]) \
            if self.structured is not None and row_reqs else None
        if masks is not None and not self.structured.spare_cores:
            masks.result()
        try:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
        finally:
            if self.adapters is not None:
                self.adapters.end_step()
        out = RunnerOutput()
        heads = [] if self.adapters is None else [
            (k, sched.requests[i]) for k, i in enumerate(batch.sample_rows) if sched.requests[i].head_only]
        if heads:  # classification requests: their adapter's head, not the sampler
            for k, request in heads:
                row = hidden[batch.sample_index[k]].unsqueeze(0)
                out.pooled[request.request_id] = self.adapters.head(request.adapter_slot).logits(self.model, row)[0]
            keep = [k for k, i in enumerate(batch.sample_rows) if not sched.requests[i].head_only]
            batch.sample_rows = [batch.sample_rows[k] for k in keep]
            batch.sample_index = batch.sample_index[keep]
            row_reqs = [row_reqs[k] for k in keep]
        if batch.sample_rows:
            self._sample(hidden, batch, row_reqs, masks.result() if masks is not None else None, out)
            if sched.drafts:
                self._verify(sched, out)
        for request, index, targets in batch.prompt_logprob_rows:
            logits = self.model.compute_logits(hidden[index])
            k = request.sampling_params.prompt_logprobs
            out.prompt_logprobs[request.request_id] = prompt_logprobs(logits, targets, k)
        return out

    def _sample(self, hidden: torch.Tensor, batch: _Batch, reqs: list[Request], masks: StepMasks | None,
                out: RunnerOutput) -> None:
        """Next tokens of the sampled rows. A constrained row whose grammar allows one token takes it with no
        logits computed (the LM head is most of a small model's step: JSON keys and punctuation are forced)."""
        index, bitmask = batch.sample_index, None
        tokens: list[int] = [0] * len(reqs)
        rest = list(range(len(reqs)))
        if masks is not None:
            bitmask = masks.bitmask
            forced = {k: t for k, t in masks.forced.items() if takes_forced_token(reqs[k])}
            for k, token in forced.items():
                tokens[k] = token
            if forced:
                rest = [k for k in rest if k not in forced]
                index, bitmask = index[rest], bitmask[rest]
        if rest:
            result = self.sampler(self.model.compute_logits(hidden[index]), [reqs[k] for k in rest], bitmask)
            for k, token, lp in zip(rest, result.token_ids, result.logprobs, strict=True):
                tokens[k] = token
                if lp is not None:  # a request's rows all have logprobs or none (forced rows have none)
                    out.logprobs.setdefault(reqs[k].request_id, []).append(lp)
        for r, token in zip(reqs, tokens, strict=True):  # a speculating request's rows come in order
            out.sampled.setdefault(r.request_id, []).append(token)

    @staticmethod
    def _verify(sched: SchedulerOutput, out: RunnerOutput) -> None:
        """Keep each speculating request's tokens up to its first rejected guess (engine/speculative.py)."""
        for request_id, guesses in sched.drafts.items():
            sampled = out.sampled.get(request_id)
            if sampled is None:
                continue
            emitted = out.sampled[request_id] = accepted_prefix(sampled, guesses)
            if request_id in out.logprobs:
                out.logprobs[request_id] = out.logprobs[request_id][:len(emitted)]

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy cached partial blocks into their new owners' blocks (copy-on-write), every layer, one
        indexed copy per cache tensor. Whole blocks are copied: the slots past the copied count are not
        computed yet for the new owner, so it writes them before anything reads them."""
        moves = [(src, dst) for src, dst, _ in copies if src != dst]
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], device=self.device)
        dst = torch.tensor([m[1] for m in moves], device=self.device)
        for attn in self.attention:
            for tensor in attn.kv_cache or ():
                tensor[dst] = tensor[src]

    def _prepare(self, sched: SchedulerOutput) -> _Batch:
        """Pack the batch: prefill chunks first, then decode rows (single tokens, a speculating request's tokens,
        short continuations); an encoder–decoder model's new requests are encoded here, for the cross-attention
        metadata."""
        # A speculating request's tokens, and on a draft model's runner a few tokens after cached ones (catching
        # up), are decode rows too, each seeing the cache up to itself (the step writes every token's keys before
        # attending): the paged decode kernel instead of a prefill's gathered context, which costs a fixed ~5 ms
        # a step on gemma-3-270m however few its tokens. (The target's own chunks keep the prefill path: in bf16
        # the two round differently, and a prefix-cache hit should not change a greedy answer.)
        decode_like = [sched.num_tokens[i] == 1 or sched.requests[i].request_id in sched.drafts
                       or (self.short_chunks_as_decode and sched.requests[i].num_computed_tokens > 0
                           and sched.num_tokens[i] <= SHORT_CHUNK)
                       for i in range(len(sched.requests))]
        order = sorted(range(len(sched.requests)), key=lambda i: decode_like[i])
        bs = self.block_size
        ids, positions, slots = [], [], []
        spans, decode_rows, sample_rows, sample_index, sample_guesses, plp_rows = [], [], [], [], [], []
        adapter_rows: dict[int, list[int]] = {}
        virtual_spans = []
        offset = 0
        for i in order:
            request, n = sched.requests[i], sched.num_tokens[i]
            start = request.num_computed_tokens
            if request.adapter_slot is not None:
                adapter_rows.setdefault(request.adapter_slot, []).extend(range(offset, offset + n))
                if start < request.num_virtual_tokens:
                    virtual_spans.append(VirtualSpan(request.adapter_slot, offset, start,
                                                     min(n, request.num_virtual_tokens - start)))
            pos = np.arange(start, start + n)
            table = np.asarray(request.block_ids)
            guesses = sched.drafts.get(request.request_id, [])
            ids.extend(request.token_slice(start, start + n - len(guesses)))
            ids.extend(guesses)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if decode_like[i]:
                decode_rows.extend((table, start + j + 1) for j in range(n))
            else:
                ctx = np.arange(start + n)
                kv = torch.from_numpy(table[ctx // bs] * bs + ctx % bs).to(self.device) if start else None
                spans.append(PrefillSpan(offset, n, start, kv))
            if sched.samples(i):  # its last token's row, and one after each guess
                for j in range(len(guesses) + 1):
                    sample_rows.append(i)
                    sample_index.append(offset + n - 1 - len(guesses) + j)
                    sample_guesses.append(guesses[:j])
            plp = self._prompt_logprob_positions(request, start, n, offset)
            if plp is not None:
                plp_rows.append(plp)
            offset += n
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(self.device),
            prefills=spans, num_prefill_tokens=sum(s.length for s in spans), block_size=bs)
        if decode_rows:
            meta.decode_block_table, meta.decode_lens = self._decode_tables(decode_rows)
        if self.encoder_cache is not None:
            meta.cross = self.encoder_cache.prepare([sched.requests[i] for i in order],
                                                    [sched.num_tokens[i] for i in order])
        return _Batch(torch.tensor(ids, dtype=torch.long, device=self.device),
                      torch.from_numpy(np.concatenate(positions)).to(self.device), meta,
                      sample_rows, torch.tensor(sample_index, dtype=torch.long, device=self.device), plp_rows,
                      sample_guesses, adapter_rows, virtual_spans)

    def _decode_tables(self, rows: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        lens = np.array([length for _, length in rows])
        max_blocks = -(-int(lens.max()) // bs)
        table = np.zeros((len(rows), max_blocks), dtype=np.int64)
        for r, (blocks, length) in enumerate(rows):
            used = -(-length // bs)
            table[r, :used] = blocks[:used]
        return torch.from_numpy(table).to(self.device), torch.from_numpy(lens).to(self.device)

    def _prompt_logprob_positions(self, request: Request, start: int, n: int,
                                  offset: int) -> tuple[Request, torch.Tensor, torch.Tensor] | None:
        """Packed rows whose logits score the next prompt token, for requests that asked."""
        if request.sampling_params.prompt_logprobs is None:
            return None
        last = min(start + n, request.num_prompt_tokens - 1)
        first = max(start, request.num_virtual_tokens)  # virtual tokens' and the first real token's go unscored
        if last <= first:
            return None
        index = torch.arange(offset + first - start, offset + last - start, device=self.device)
        targets = torch.tensor(request.prompt_token_ids[first + 1:last + 1], device=self.device)
        return request, index, targets


@dataclass(slots=True)
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]
    sample_index: torch.Tensor
    prompt_logprob_rows: list[tuple[Request, torch.Tensor, torch.Tensor]]
    sample_guesses: list[list[int]]  # per sampled row: the guesses before it (empty unless speculating)
    adapter_rows: dict[int, list[int]] = field(default_factory=dict)  # adapter slot → its requests' packed rows
    virtual_spans: list[VirtualSpan] = field(default_factory=list)  # virtual tokens' rows (prompt adapters)
