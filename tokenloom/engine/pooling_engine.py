"""The pooling path for encoder-only models: batch → forward → head → one result per input.

No KV cache and no scheduler phases: each `step` takes waiting inputs in arrival order up to the
token budget (`max_num_batched_tokens`, `max_num_seqs`), runs them as one packed batch and finishes
them all. Inputs are checked against the model's limit when they are tokenized (truncated or
rejected, as the caller asks); a batch whose forward pass fails is rerun input by input, so only
the input that fails gets an error.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from tokenloom.config import ConfigError, EngineConfig
from tokenloom.engine.llm_engine import InvalidRequestError
from tokenloom.engine.threads import ThreadBinder
from tokenloom.loader import LoadedModel, load_model
from tokenloom.models.layers.encoder_attention import EncoderMetadata
from tokenloom.models.pooling import PoolingConfig, pool, read_pooling_config

logger = logging.getLogger(__name__)

# task → which hidden rows its head reads
_SEQUENCE_TASKS = ("classify", "score")
_TOKEN_TASKS = ("token_classify", "qa")


@dataclass(slots=True)
class EncoderInput:
    """One tokenized input; `offsets` (character spans per token) and `sequence_ids` (0 / 1 for the
    first / second text of a pair, None for special tokens) come from the fast tokenizer when asked."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None
    offsets: list[tuple[int, int]] | None = None
    sequence_ids: list[int | None] | None = None
    truncated: bool = False


@dataclass(slots=True)
class PoolingRequest:
    """An input waiting for its batch, with the task to run on it."""

    request_id: str
    input: EncoderInput
    task: str
    pooling: PoolingConfig | None = None


@dataclass(slots=True)
class PoolingResult:
    """One input's raw head output (float32, on the CPU), or the error that stopped it.

    `data` by task: embed [hidden]; classify / score [num_labels] logits; token_classify [tokens,
    num_labels] and qa [tokens, 2] logits; fill_mask [num_masks, vocab] logits of the [MASK] positions.
    """

    request_id: str
    data: torch.Tensor | None
    num_tokens: int
    error: str | None = None


class PoolingEngine:
    """Owns an encoder model and batches its inputs; the counterpart of LLMEngine for encoders."""

    is_generative = False

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = config.device_config.torch_device()
        self.loaded = loaded or load_model(config.model_config, self.device)
        if self.loaded.kind != "encoder":
            raise ConfigError(f"{self.loaded.name} is not an encoder-only model; it runs on LLMEngine")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.pooling_config = read_pooling_config(self.loaded.path)
        self.max_model_len = self._max_len()
        self.vocab_size = int(self.loaded.hf_config.vocab_size)
        self.waiting: deque[PoolingRequest] = deque()
        self._run_ids = itertools.count()
        self._tokenizer_lock = threading.Lock()
        self._threads = ThreadBinder.for_config(config)

    def memory_bytes(self) -> int:
        """Bytes this engine holds: the model's weights (an encoder has no KV cache)."""
        return self.loaded.weight_bytes

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """What this model can do: embed, classify, score, token_classify, qa, fill_mask."""
        tasks = self.model.supported_tasks
        if "score" in tasks and self.loaded.hf_config.num_labels != 1:
            tasks = tuple(t for t in tasks if t != "score")  # a cross-encoder score needs exactly one logit
        return tasks

    def _max_len(self) -> int:
        limit = min(self.loaded.max_model_len, self.model.max_input_len)
        st_limit = self.pooling_config.max_seq_length
        if self.config.model_config.max_model_len is None and st_limit:
            limit = min(limit, st_limit)  # what sentence-transformers truncates to, unless asked otherwise
        return limit

    # ---- inputs ----

    def tokenize(self, text: str, text_pair: str | None = None, truncate: bool = False,
                 with_offsets: bool = False) -> EncoderInput:
        """Tokenize one text (or pair) with the model's special tokens; over-long inputs are cut (QA
        pairs cut the second text) or rejected with InvalidRequestError. Safe to call from any thread."""
        if not isinstance(text, str) or not text or (text_pair is not None and not isinstance(text_pair, str)):
            raise InvalidRequestError("input must be a non-empty string")
        with self._tokenizer_lock:  # a fast tokenizer's truncation setting is state shared by every call
            return self._tokenize(text, text_pair, truncate, with_offsets)

    def _tokenize(self, text: str, text_pair: str | None, truncate: bool, with_offsets: bool) -> EncoderInput:
        hf = self.tokenizer.hf
        enc = hf(text, text_pair, truncation=False, return_offsets_mapping=with_offsets, verbose=False)
        full = len(enc["input_ids"])
        if full > self.max_model_len:
            if not truncate:
                raise InvalidRequestError(f"input has {full} tokens, more than the model's limit of "
                                          f"{self.max_model_len}; shorten it or pass truncate=True")
            strategy = "only_second" if with_offsets and text_pair is not None else "longest_first"
            if strategy == "only_second":
                fixed = full - enc.sequence_ids().count(1)
                if fixed >= self.max_model_len:
                    raise InvalidRequestError(f"the first text has {fixed} tokens with the special tokens, leaving no "
                                              f"room for the second within the model's limit of {self.max_model_len}")
            enc = hf(text, text_pair, truncation=strategy, max_length=self.max_model_len,
                     return_offsets_mapping=with_offsets)
        types = enc.get("token_type_ids") if self.model.spec.type_vocab_size > 1 else None
        return EncoderInput(list(enc["input_ids"]), list(types) if types is not None else None,
                            [tuple(o) for o in enc["offset_mapping"]] if with_offsets else None,
                            enc.sequence_ids() if with_offsets else None, full > self.max_model_len)

    def from_token_ids(self, token_ids: list[int], truncate: bool = False) -> EncoderInput:
        """An input given as token ids (special tokens included, as the caller wants them)."""
        ids = list(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if not ids or bad:
            raise InvalidRequestError(f"token ids must be a non-empty list of integers in [0, {self.vocab_size}); "
                                      f"got {bad[:5] or 'an empty list'}")
        if len(ids) <= self.max_model_len:
            return EncoderInput(ids)
        if not truncate:
            raise InvalidRequestError(f"input has {len(ids)} tokens, more than the model's limit of "
                                      f"{self.max_model_len}; shorten it or pass truncate=True")
        keep_last = ids[-1] in self.tokenizer.all_special_ids  # keep a closing [SEP] / </s>
        cut = ids[:self.max_model_len - 1] + [ids[-1]] if keep_last else ids[:self.max_model_len]
        return EncoderInput(cut, truncated=True)

    def require(self, task: str) -> None:
        """Raise InvalidRequestError unless the model supports `task`, naming what it does support."""
        if task not in self.supported_tasks:
            arch = type(self.model).__name__
            raise InvalidRequestError(f"model {self.loaded.name} ({arch}) does not support {task}; "
                                      f"it supports: {', '.join(self.supported_tasks)}")

    def run(self, inputs: list[EncoderInput], task: str, pooling: PoolingConfig | None = None) -> list[PoolingResult]:
        """Encode every input for `task` and return the results in input order. Inputs go in longest
        first, so each batch holds inputs of similar length (little padding in attention)."""
        self.require(task)
        base = f"run{next(self._run_ids)}-"
        for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i].token_ids)):
            self.add_request(f"{base}{i}", inputs[i], task, pooling)
        results: dict[str, PoolingResult] = {}
        try:
            while self.has_unfinished_requests():
                results.update((r.request_id, r) for r in self.step())
        finally:
            self.abort_request([f"{base}{i}" for i in range(len(inputs)) if f"{base}{i}" not in results])
        return [results[f"{base}{i}"] for i in range(len(inputs))]

    # ---- the loop ----

    def add_request(self, request_id: str, inp: EncoderInput, task: str, pooling: PoolingConfig | None = None) -> None:
        """Queue one tokenized input for `task`."""
        self.require(task)
        self.waiting.append(PoolingRequest(request_id, inp, task, pooling))

    def has_unfinished_requests(self) -> bool:
        """True while inputs wait."""
        return bool(self.waiting)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Drop waiting inputs by id."""
        drop = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        self.waiting = deque(r for r in self.waiting if r.request_id not in drop)

    def step(self) -> list[PoolingResult]:
        """Run the next batch (arrival order, within the token budget) and return its results."""
        self._threads.ensure()
        batch = self._next_batch()
        if not batch:
            return []
        try:
            return self._execute(batch)
        except Exception:  # find the input that fails; the others still get their results
            logger.exception("pooling batch failed; rerunning its inputs one by one")
            return [self._execute_alone(r) for r in batch]

    def _next_batch(self) -> list[PoolingRequest]:
        s = self.config.scheduler_config
        batch: list[PoolingRequest] = []
        tokens = 0
        while self.waiting and len(batch) < s.max_num_seqs:
            n = len(self.waiting[0].input.token_ids)
            if batch and tokens + n > s.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        return batch

    def _execute_alone(self, request: PoolingRequest) -> PoolingResult:
        try:
            return self._execute([request])[0]
        except Exception as exc:
            return PoolingResult(request.request_id, None, len(request.input.token_ids),
                                 f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _execute(self, batch: list[PoolingRequest]) -> list[PoolingResult]:
        lens = [len(r.input.token_ids) for r in batch]
        meta = EncoderMetadata.from_lens(lens, self.device)
        ids = torch.tensor([t for r in batch for t in r.input.token_ids], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        types = None
        if any(r.input.token_type_ids for r in batch):
            types = torch.tensor([t for r in batch for t in (r.input.token_type_ids or [0] * len(r.input.token_ids))],
                                 device=self.device)
        hidden = self.model(ids, positions, meta, types)
        data = self._heads(batch, hidden, meta, ids)
        return [PoolingResult(r.request_id, d, n) for r, d, n in zip(batch, data, lens)]

    def _heads(self, batch: list[PoolingRequest], hidden: torch.Tensor, meta: EncoderMetadata,
               ids: torch.Tensor) -> list[torch.Tensor]:
        """Each request's head output; one head call per task over the batch rows that task reads."""
        out: list[torch.Tensor | None] = [None] * len(batch)
        starts = meta.cu_seqlens.tolist()
        for task in {r.task for r in batch} - {"embed"}:
            members = [i for i, r in enumerate(batch) if r.task == task]
            if task in _SEQUENCE_TASKS:
                rows = [torch.arange(starts[i], starts[i] + 1) for i in members]
            elif task in _TOKEN_TASKS:
                rows = [torch.arange(starts[i], starts[i + 1]) for i in members]
            else:  # fill_mask: only the [MASK] positions go through the vocabulary projection
                is_mask = (ids == self.tokenizer.hf.mask_token_id).cpu()
                rows = [torch.arange(starts[i], starts[i + 1])[is_mask[starts[i]:starts[i + 1]]] for i in members]
            logits = self.model.compute_head(hidden[torch.cat(rows).to(hidden.device)])
            for i, part in zip(members, logits.split([len(r) for r in rows])):
                out[i] = part[0] if task in _SEQUENCE_TASKS else part
        for config in {r.pooling or self.pooling_config for r in batch if r.task == "embed"}:
            vectors = pool(hidden, meta, config)
            for i, r in enumerate(batch):
                if r.task == "embed" and (r.pooling or self.pooling_config) == config:
                    out[i] = vectors[i]
        return [t.float().cpu() for t in out]
