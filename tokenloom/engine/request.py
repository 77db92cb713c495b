"""A request as the engine tracks it: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.engine.pooling import PoolingParams


class InvalidRequestError(ValueError):
    """A request cannot be served as given; the message says why, and `field` names the request field at
    fault where one is (e.g. `prompt`, `max_tokens` for a context-length error)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestStatus(enum.Enum):
    """Where a request stands; every FINISHED_* status is final."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        """True for the final statuses."""
        return self.name.startswith("FINISHED")


@dataclass(eq=False)
class Request:
    """One sequence being generated, or one input being pooled (`pooling_params` set, `sampling_params`
    None: an encoder-only model's request, admitted whole, no KV blocks, finished in the step that runs it).

    `num_computed_tokens` counts the tokens whose keys and values are in the cache; the scheduler's
    single rule is to bring it up to `num_tokens`. `block_ids` are the request's KV blocks in order.
    Each field has one writer after creation: the scheduler (status, counts, output tokens, stop_reason),
    the KV cache manager (blocks and their hashes).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_published_blocks: int = 0
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # The request's own logits processor objects, built from its params when it is added (a processor may
    # keep per-sequence state, so each child of an n > 1 request has its own).
    logits_processors: list[Any] = field(default_factory=list)
    # Encoder–decoder models: the prompt is the encoder's input; `prompt_token_ids` is then the decoder's
    # start ([decoder_start_token_id]). `cache_salt` seeds the prefix-cache hash chain (blocks computed
    # against another encoder input, or under another adapter, must not match).
    encoder_token_ids: list[int] | None = None
    cache_salt: int | None = None
    pooling_params: PoolingParams | None = None
    adapter_slot: int | None = None  # the adapter's slot (engine.adapters), None for the base model
    # A prompt-learning adapter's virtual tokens: the first prompt tokens, placeholders the model takes the
    # adapter's vectors for; never shown in outputs.
    num_virtual_tokens: int = 0
    # A decoder's classification request: its last prompt token's hidden state goes through its adapter's
    # head (a PEFT SEQ_CLS adapter's `score`) instead of the sampler, and it ends there.
    head_only: bool = False
    token_type_ids: list[int] | None = None  # a pooling request's segment ids (BERT pairs)
    matcher: Any = None  # structured outputs: the request's grammar matcher (tokenloom.structured.Matcher)

    @property
    def is_pooling(self) -> bool:
        """True for a pooling request (an encoder-only model's input; a decoder's classification request
        runs as a generation request until its head reads it: `head_only`)."""
        return self.pooling_params is not None and not self.head_only

    @property
    def num_encoder_tokens(self) -> int:
        """Length of the encoder input (0 for decoder-only models)."""
        return len(self.encoder_token_ids) if self.encoder_token_ids is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt (an adapter's virtual tokens included)."""
        return len(self.prompt_token_ids)

    @property
    def num_real_prompt_tokens(self) -> int:
        """Length of the prompt the caller gave (an adapter's virtual tokens left out)."""
        return len(self.prompt_token_ids) - self.num_virtual_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) across prompt and output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        """True once the request has a final status."""
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: stop, length or abort."""
        return self.status.value if self.status.finished else None
