"""Guesses from a draft model: a smaller model sharing the tokenizer (`--speculative-method draft`), or the target's
own weights at 4 bits (`self`), each with a paged KV cache of its own in the engine.

The draft's cache has the target's blocks and block size, and a request's guesses use the request's own block
table: the scheduler allocates the slots of a request's last token and its guesses before the draft writes
them. Before guessing, the draft catches up on the request's tokens it has not seen (the whole prompt the first
time; after a step, the target's next token and any guesses the draft had not consumed), then takes its argmax
once per guess. Its keys and values stay valid up to the request's computed tokens, like the target's: guesses
the target rejected are overwritten later. After a preemption (new blocks) it starts again from the prompt.
Guesses are the draft's argmax (deterministic), which keeps verification the plain rule of
engine/speculative.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.request import Request
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.loader import LoadedModel
from tokenloom.models.layers.group_quant import GroupQuantWeight
from tokenloom.models.layers.linear import vocab_projection
from tokenloom.models.layers.quantized import QuantizedLMHead
from tokenloom.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)


@dataclass(slots=True)
class _DraftView:
    """A request as the draft runner sees it: its tokens followed by the guesses made so far this step, with
    `num_computed_tokens` counting the positions the draft's cache holds."""

    request: Request
    num_computed_tokens: int
    guesses: list[int] = field(default_factory=list)
    adapter_slot: None = None
    num_virtual_tokens: int = 0
    head_only: bool = False
    matcher: None = None
    logits_processors: tuple = ()
    generator: None = None

    def __getattr__(self, name: str):  # noqa: ANN204 - the rest (ids, blocks, tokens) is the request's
        return getattr(self.request, name)

    @property
    def sampling_params(self) -> SamplingParams:
        return _GREEDY  # guesses are the draft's argmax

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens + len(self.guesses)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = self.request.num_tokens
        head = self.request.token_slice(start, min(end, n)) if start < n else []
        return head + self.guesses[max(start - n, 0):end - n] if end > n else head


@dataclass(slots=True)
class _DraftState:
    computed: int  # positions of the request whose keys and values the draft's cache holds
    num_preemptions: int


class DraftModelProposer:
    """Runs the draft model over its own KV cache to guess requests' next tokens."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device, vocab_size: int, draft_vocab: int | None = None,
                 special_ids: list[int] = ()) -> None:
        """`draft_vocab`: guess among the first that many token ids and `special_ids` only (DraftVocabHead)."""
        self.loaded = loaded
        head = getattr(loaded.model, "lm_head", None)
        width = None if head is None else getattr(head, "out_features", None) or head.weight.shape[0]
        if draft_vocab is not None and width is not None and draft_vocab < width:
            loaded.model.lm_head = DraftVocabHead(head, draft_vocab, list(special_ids), width)
        self.runner = ModelRunner(loaded.model, num_blocks, block_size, kv_dtype, device, short_chunks_as_decode=True)
        self.vocab_size = vocab_size  # the target's: a draft token past it cannot be a guess
        self._state: dict[str, _DraftState] = {}

    def draft(self, requests: list[Request], rooms: list[int]) -> dict[str, list[int]]:
        """Up to rooms[i] guesses for each request (a decoding request whose last token and guesses have slots)."""
        views = [_DraftView(request, self._held(request)) for request in requests]
        active = [i for i, room in enumerate(rooms) if room > 0]
        while active:
            sched = SchedulerOutput([views[i] for i in active],
                                    [views[i].num_tokens - views[i].num_computed_tokens for i in active])
            sampled = self.runner.execute(sched).sampled
            for i in active:
                view = views[i]
                view.num_computed_tokens = view.num_tokens
                view.guesses.append(sampled[view.request_id][0])
            active = [i for i in active if len(views[i].guesses) < rooms[i]]
        out = {}
        for view, room in zip(views, rooms, strict=True):
            # the last guess was never fed back: the cache holds the positions before it
            self._state[view.request_id] = _DraftState(view.num_computed_tokens, view.request.num_preemptions)
            guesses = view.guesses[:room]
            valid = next((j for j, t in enumerate(guesses) if t >= self.vocab_size), len(guesses))
            out[view.request_id] = guesses[:valid]
        return out

    def catch_up(self, request: Request) -> int:
        """Tokens the draft would have to run before its first guess for `request`."""
        return request.num_tokens - self._held(request)

    def _held(self, request: Request) -> int:
        """Positions of `request` whose keys and values the draft's cache holds and the target still counts: none
        when it never drafted for it or after a preemption (new blocks)."""
        state = self._state.get(request.request_id)
        if state is None or state.num_preemptions != request.num_preemptions:
            return 0
        return min(state.computed, request.num_computed_tokens)

    def forget(self, request_ids: list[str]) -> None:
        """Drop finished requests' state."""
        for request_id in request_ids:
            self._state.pop(request_id, None)

    def kv_cache_bytes(self) -> int:
        """Bytes of the draft's KV cache."""
        return self.runner.kv_cache_bytes()


class DraftVocabHead(nn.Module):
    """A draft's vocabulary projection onto a subset of token ids (the first `leading` ids and `extra` ones, such
    as end-of-turn tokens listed at the end); every other id gets -inf, so the draft never guesses it.

    Tokenizers list their pieces by merge rank (BPE) or score (unigram), so the leading ids are the frequent ones
    and a draft's guesses rarely need the rest, while the projection onto the whole vocabulary is most of a
    small model's step (gemma-3-270m: 168 M of its 268 M parameters). A guess the subset cannot make costs a
    rejection, never a wrong token: the target verifies every guess."""

    def __init__(self, head: nn.Module, leading: int, extra: list[int], vocab: int) -> None:
        super().__init__()
        ids = list(range(leading)) + sorted({t for t in extra if leading <= t < vocab})
        self.vocab = vocab
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long))
        if isinstance(head, QuantizedLMHead):
            w, rows = head.packed, self.ids.to(head.packed.codes.device)
            sub = GroupQuantWeight(w.codes[rows], w.d[rows], w.m[rows], None if w.high is None else w.high[rows])
            self.head = QuantizedLMHead(_Selected(head.dense, self.ids), sub)
        else:
            self.head = _Selected(head, self.ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, K] → float32 logits [M, vocab], -inf outside the subset."""
        sub = self.head(hidden).float()
        out = sub.new_full((hidden.shape[0], self.vocab), float("-inf"))
        return out.index_copy_(1, self.ids.to(out.device), sub)


class _Selected(nn.Module):
    """A dense head's logits for some token ids only: the leading ones from a view of its matrix, the others from
    their own rows."""

    def __init__(self, head: nn.Module, ids: torch.Tensor) -> None:
        super().__init__()
        self.full = head
        self.leading = int((ids == torch.arange(len(ids))).sum())
        self.register_buffer("extra_rows", head.weight[ids[self.leading:].to(head.weight.device)].clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, K] → [M, len(ids)]."""
        weight = self.full.weight
        return torch.cat([vocab_projection(hidden, weight[:self.leading]).float(),
                          vocab_projection(hidden, self.extra_rows).float()], dim=1)
