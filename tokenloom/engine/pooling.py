"""Pooling requests of encoder-only models: their inputs, their parameters, and what the runner does with
them (one packed forward pass, then each request's head or pooling). They run on the one engine with
generation: the scheduler admits a pooling request whole (no chunking, no KV blocks) and it finishes in
the step that runs it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.adapters.manager import VirtualSpan
from tokenloom.engine.request import InvalidRequestError
from tokenloom.loader import LoadedModel
from tokenloom.models.layers.attention import VirtualKV
from tokenloom.models.layers.encoder_attention import EncoderMetadata
from tokenloom.models.layers.linear import onednn_gemm, shape_bucket
from tokenloom.models.pooling import PoolingConfig, pool

if TYPE_CHECKING:
    from tokenloom.adapters.manager import AdapterManager

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


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """What a pooling request asks for: `task` (embed, classify, score, token_classify, qa, fill_mask) and,
    for embed, a pooling that overrides the model's own."""

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

    @property
    def finished(self) -> bool:
        """Always True: a pooling request has exactly one output (the engine's outputs share this field)."""
        return True


def pooling_tasks(loaded: LoadedModel) -> tuple[str, ...]:
    """What an encoder-only model can do: embed, classify, score, token_classify, qa, fill_mask."""
    tasks = loaded.model.supported_tasks
    if "score" in tasks and loaded.hf_config.num_labels != 1:
        tasks = tuple(t for t in tasks if t != "score")  # a cross-encoder score needs exactly one logit
    return tasks


def encoder_max_len(loaded: LoadedModel, pooling: PoolingConfig, requested: int | None) -> int:
    """The longest input: the model's positions, or what sentence-transformers truncates to unless the
    caller set max_model_len."""
    limit = min(loaded.max_model_len, loaded.model.max_input_len)
    if requested is None and pooling.max_seq_length:
        limit = min(limit, pooling.max_seq_length)
    return limit


class EncoderTokenizer:
    """Tokenizes encoder inputs (texts, pairs, or token ids) with the model's special tokens and checks
    them against the model's limit: cut (QA pairs cut the second text) or rejected. Safe from any thread."""

    def __init__(self, loaded: LoadedModel, max_len: int) -> None:
        self.tokenizer = loaded.tokenizer
        self.max_len = max_len
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.with_types = loaded.model.spec.type_vocab_size > 1
        self._lock = threading.Lock()  # a fast tokenizer's truncation setting is state shared by every call

    def tokenize(self, text: str, text_pair: str | None = None, truncate: bool = False,
                 with_offsets: bool = False) -> EncoderInput:
        """One text (or pair) as an input; InvalidRequestError when it does not fit and truncate is off."""
        if not isinstance(text, str) or not text or (text_pair is not None and not isinstance(text_pair, str)):
            raise InvalidRequestError("input must be a non-empty string")
        with self._lock:
            return self._tokenize(text, text_pair, truncate, with_offsets)

    def _tokenize(self, text: str, text_pair: str | None, truncate: bool, with_offsets: bool) -> EncoderInput:
        hf, limit = self.tokenizer.hf, self.max_len
        enc = hf(text, text_pair, truncation=False, return_offsets_mapping=with_offsets, verbose=False)
        full = len(enc["input_ids"])
        if full > limit:
            if not truncate:
                raise InvalidRequestError(f"input has {full} tokens, more than the model's limit of "
                                          f"{limit}; shorten it or pass truncate=True")
            strategy = "only_second" if with_offsets and text_pair is not None else "longest_first"
            if strategy == "only_second":
                fixed = full - enc.sequence_ids().count(1)
                if fixed >= limit:
                    raise InvalidRequestError(f"the first text has {fixed} tokens with the special tokens, leaving no "
                                              f"room for the second within the model's limit of {limit}")
            enc = hf(text, text_pair, truncation=strategy, max_length=limit, return_offsets_mapping=with_offsets)
        types = enc.get("token_type_ids") if self.with_types else None
        return EncoderInput(list(enc["input_ids"]), list(types) if types is not None else None,
                            [tuple(o) for o in enc["offset_mapping"]] if with_offsets else None,
                            enc.sequence_ids() if with_offsets else None, full > limit)

    def from_token_ids(self, token_ids: list[int], truncate: bool = False) -> EncoderInput:
        """An input given as token ids (special tokens included, as the caller wants them)."""
        ids = list(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if not ids or bad:
            raise InvalidRequestError(f"token ids must be a non-empty list of integers in [0, {self.vocab_size}); "
                                      f"got {bad[:5] or 'an empty list'}")
        if len(ids) <= self.max_len:
            return EncoderInput(ids)
        if not truncate:
            raise InvalidRequestError(f"input has {len(ids)} tokens, more than the model's limit of "
                                      f"{self.max_len}; shorten it or pass truncate=True")
        keep_last = ids[-1] in self.tokenizer.all_special_ids  # keep a closing [SEP] / </s>
        cut = ids[:self.max_len - 1] + [ids[-1]] if keep_last else ids[:self.max_len]
        return EncoderInput(cut, truncated=True)


def filler_lens(num_tokens: int, longest: int) -> list[int]:
    """Lengths of the filler sequences that bring a batch of `num_tokens` up to its `shape_bucket`, none longer
    than the batch's longest sequence (so that attention's padded view keeps its width)."""
    pad = shape_bucket(num_tokens) - num_tokens
    return [longest] * (pad // longest) + ([pad % longest] if pad % longest else [])


class PoolingRunner:
    """The runner's pooling branch: packs the batch's inputs (no padding), runs the encoder once and each
    request's head (one call per task over the rows it reads) or pooling."""

    def __init__(self, model: nn.Module, config: PoolingConfig, mask_token_id: int | None,
                 device: torch.device, adapters: AdapterManager | None = None) -> None:
        self.model = model
        self.config = config
        self.mask_token_id = mask_token_id
        self.device = device
        self.adapters = adapters  # LoRAs on the encoder's layers, classification heads on top
        # where its products go through oneDNN, a batch is topped up to a bucket size (execute)
        self.bucketed = onednn_gemm(model.input_embeddings().weight)

    def execute(self, requests: list[Any]) -> dict[str, torch.Tensor]:
        """Each request's float32 result on the CPU, by request id."""
        lens = [r.num_prompt_tokens for r in requests]
        meta = EncoderMetadata.from_lens(lens, self.device)
        # filler sequences after the requests' bring the token count to a few sizes where the products go
        # through oneDNN (layers/linear.py, bucketed_linear, says why); they attend only to themselves
        fill = filler_lens(meta.num_tokens, max(lens)) if self.bucketed else []
        run_meta = EncoderMetadata.from_lens(lens + fill, self.device) if fill else meta
        ids = torch.tensor([t for r in requests for t in r.prompt_token_ids], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens + fill]).to(self.device)
        types = None
        if any(r.token_type_ids for r in requests):
            types = torch.tensor([t for r in requests for t in (r.token_type_ids or [0] * r.num_prompt_tokens)],
                                 device=self.device)
        if self.adapters is not None:
            meta.virtual_kv = run_meta.virtual_kv = self._begin_adapters(requests, run_meta)
        try:
            hidden = self.model(F.pad(ids, (0, sum(fill))), positions, run_meta,
                                None if types is None else F.pad(types, (0, sum(fill))))[:meta.num_tokens]
        finally:
            if self.adapters is not None:
                self.adapters.end_step()
        hidden, meta, ids = self._output_rows(requests, hidden, meta, ids)
        data = self._heads(requests, hidden, meta, ids)
        return {r.request_id: d.float().cpu() for r, d in zip(requests, data)}

    def _begin_adapters(self, requests: list[Any], meta: EncoderMetadata) -> VirtualKV | None:
        """Tell the adapters which packed rows each one's requests hold (LoRAs run on them, soft prompts and
        prefixes fill their virtual rows); the prefixes' keys and values for the attention metadata."""
        rows: dict[int, list[int]] = {}
        spans = []
        for r, start in zip(requests, meta.cu_seqlens.tolist()):
            if r.adapter_slot is not None:
                rows.setdefault(r.adapter_slot, []).extend(range(start, start + r.num_prompt_tokens))
                if r.num_virtual_tokens:
                    spans.append(VirtualSpan(r.adapter_slot, start, 0, r.num_virtual_tokens))
        return self.adapters.begin_step(rows, meta.num_tokens, spans)

    def _output_rows(self, requests: list[Any], hidden: torch.Tensor, meta: EncoderMetadata, ids: torch.Tensor
                     ) -> tuple[torch.Tensor, EncoderMetadata, torch.Tensor]:
        """The rows heads and pooling read: virtual tokens' rows dropped, except a soft prompt's for a
        sequence task (PEFT's forward returns them: pooling covers them, [CLS] pooling reads the first)."""
        skips = [r.num_virtual_tokens if r.num_virtual_tokens and (
            r.pooling_params.task in (*_TOKEN_TASKS, "fill_mask")
            or not self.adapters.outputs_virtual_rows(r.adapter_slot)) else 0 for r in requests]
        if not any(skips):
            return hidden, meta, ids
        starts = meta.cu_seqlens.tolist()
        keep = torch.cat([torch.arange(start + skip, end) for start, end, skip in zip(starts, starts[1:], skips)])
        keep = keep.to(hidden.device)
        lens = [n - skip for n, skip in zip(meta.seq_lens, skips)]
        return hidden[keep], EncoderMetadata.from_lens(lens, self.device), ids[keep]

    def _heads(self, requests: list[Any], hidden: torch.Tensor, meta: EncoderMetadata,
               ids: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(requests)
        starts = meta.cu_seqlens.tolist()
        tasks = [r.pooling_params.task for r in requests]
        for slot, members in self._adapter_heads(requests, tasks).items():
            head = self.adapters.head(slot)
            logits = head.logits(self.model, hidden[torch.tensor([starts[i] for i in members], device=hidden.device)])
            for i, part in zip(members, logits):
                out[i], tasks[i] = part, "done"
        for task in set(tasks) - {"embed", "done"}:
            members = [i for i, t in enumerate(tasks) if t == task]
            if task in _SEQUENCE_TASKS:
                rows = [torch.arange(starts[i], starts[i] + 1) for i in members]
            elif task in _TOKEN_TASKS:
                rows = [torch.arange(starts[i], starts[i + 1]) for i in members]
            else:  # fill_mask: only the [MASK] positions go through the vocabulary projection
                is_mask = (ids == self.mask_token_id).cpu()
                rows = [torch.arange(starts[i], starts[i + 1])[is_mask[starts[i]:starts[i + 1]]] for i in members]
            logits = self.model.compute_head(hidden[torch.cat(rows).to(hidden.device)])
            for i, part in zip(members, logits.split([len(r) for r in rows])):
                out[i] = part[0] if task in _SEQUENCE_TASKS else part
        configs = [r.pooling_params.pooling or self.config for r in requests]
        for config in {c for c, t in zip(configs, tasks) if t == "embed"}:
            vectors = pool(hidden, meta, config)
            for i, (c, t) in enumerate(zip(configs, tasks)):
                if t == "embed" and c == config:
                    out[i] = vectors[i]
        return out

    def _adapter_heads(self, requests: list[Any], tasks: list[str]) -> dict[int, list[int]]:
        """Classify requests whose adapter brings its own head, by adapter slot."""
        groups: dict[int, list[int]] = {}
        if self.adapters is None:
            return groups
        for i, (r, task) in enumerate(zip(requests, tasks)):
            if task == "classify" and r.adapter_slot is not None and self.adapters.head(r.adapter_slot) is not None:
                groups.setdefault(r.adapter_slot, []).append(i)
        return groups
