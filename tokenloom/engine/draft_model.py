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

from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.request import Request
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.loader import LoadedModel
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
                 device: torch.device, vocab_size: int) -> None:
        self.loaded = loaded
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
