"""Speculative decoding: guess a decoding request's next tokens, let the model score them all in one step, keep
the ones it would have produced itself.

A request with guesses d1..dk runs k + 1 tokens in the step (its last token and the guesses, as k + 1 decode
rows each seeing the cache up to itself) and is sampled at each of the k + 1 positions, position j seeing its
output followed by d1..dj (`DraftPosition`: penalties, logit bias and min_tokens see that history). Walking the
positions, the token sampled at position j is emitted, and the walk goes on while it equals the guess d(j+1); so a step
emits between 1 and k + 1 tokens. Every emitted token is sampled from the model's own processed distribution
given the tokens before it, so outputs are exact: greedy outputs equal decoding without speculation, and a
sampled token's distribution is the model's. For a deterministic guess this is the standard rejection rule
(accept d with probability p(d), else draw from p with d removed): drawing from p and comparing with d
accepts it with probability p(d), and a rejected draw is distributed as p without d.

The keys and values written for rejected guesses are simply not counted: a request's computed tokens advance
only over the accepted ones, and the next step overwrites those slots (the scheduler's one rule).

Proposers: `ngram` (prompt lookup) finds the longest recent n-gram of the request's own tokens that ends its
sequence and proposes what followed it, while the scheduler builds the step; a draft model (engine/draft_model.py:
`draft`, `self`) gets PENDING slots reserved by the scheduler and fills them, batched, before the step runs. A
request's guess count adapts: all accepted → two more next time, a miss → one fewer. A step with many running
requests is compute-bound, where a guessed row costs as much as a generated token: speculation pauses there
(`speculative_max_batch`, per method by default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenloom.config import DEFAULT_SPECULATIVE_MAX_BATCH, SpeculativeConfig
from tokenloom.engine.request import Request
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.engine.draft_model import DraftModelProposer
    from tokenloom.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

NGRAM_MAX_BATCH_TILED = 8  # ngram's speculative_max_batch for a target whose layers run in row tiles
PENDING = -1  # a guess slot reserved by the scheduler, filled by a draft model before the step runs


@dataclass(slots=True)
class SpeculativeStats:
    """Counters of speculation: steps in which a request had guesses, guesses made, guesses accepted."""

    method: str
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a speculating request emitted per step on average (accepted guesses plus the model's own)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(slots=True)
class GuessedMatcher:
    """A constrained request's grammar as seen at a guess position: the mask after its guesses so far. The
    matcher advances over them while the mask is filled (on the mask thread, before the scheduler touches the
    matcher again) and rolls back."""

    matcher: Any
    guesses: list[int]

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """The allowed tokens after the guesses; every token where a guess is refused (the model's token
        before it then differs from it, so this row's token is never used)."""
        if self.matcher.validate(self.guesses) < len(self.guesses):
            bitmask[row].fill_(-1)
            return
        for token in self.guesses:
            self.matcher.accept(token)
        try:
            self.matcher.fill_bitmask(bitmask, row)
        finally:
            self.matcher.rollback(len(self.guesses))


@dataclass(slots=True)
class DraftPosition:
    """A speculating request as the sampler sees it at guess position j: its output followed by the first j
    guesses (and its grammar's mask after them). Speculating requests have no logits processors
    (`Speculator.eligible`)."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None
    matcher: GuessedMatcher | None
    request_id: str
    logits_processors: tuple = ()
    head_only: bool = False


def draft_position(request: Request, guesses: list[int]) -> DraftPosition:
    """`request` at the position after `guesses` (its next tokens, assumed accepted)."""
    matcher = GuessedMatcher(request.matcher, guesses) if request.matcher is not None else None
    return DraftPosition(request.sampling_params, request.prompt_token_ids, request.output_token_ids + guesses,
                         request.eos_token_ids, request.generator, matcher, request.request_id)


def accepted_prefix(sampled: list[int], guesses: list[int]) -> list[int]:
    """The tokens a speculating request emits: `sampled[j]` is the model's token at position j (after the
    first j guesses); each is emitted, and the walk stops at the first one that differs from its guess."""
    emitted = [sampled[0]]
    for guess, token in zip(guesses, sampled[1:]):
        if emitted[-1] != guess:
            break
        emitted.append(token)
    return emitted


def ngram_proposal(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Prompt lookup: the up to `k` tokens that followed the most recent earlier occurrence of the longest
    suffix of `tokens` (between `min_n` and `max_n` tokens long); [] when the suffix never occurred before."""
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return []
    # candidate ends e: tokens[e] equals the last token, with at least one token after it
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if ends.size == 0:
        return []
    matched = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, min(max_n, length - 1)):
        ok = ends >= back
        ok[ok] = tokens[ends[ok] - back] == tokens[length - 1 - back]
        alive &= ok
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(matched == best)[-1]])
    return tokens[end + 1:end + 1 + k].tolist()


@dataclass(slots=True)
class _RequestState:
    k: int  # guesses to make next step
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # its tokens, grown in place
    size: int = 0


class Speculator:
    """Makes each step's guesses and adapts each request's guess count to its acceptance."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, drafter: DraftModelProposer | None = None,
                 tiled_target: bool = False) -> None:
        self.config = config
        self.tiled_target = tiled_target  # the target's layers run in row tiles (quantized, at the avx2 level)
        self.max_model_len = max_model_len
        self.drafter = drafter  # the draft model of methods draft and self; None for ngram
        self.stats = SpeculativeStats(config.speculative_method or "none")
        self._state: dict[str, _RequestState] = {}
        self.max_batch = self._max_batch()  # read every step

    def _max_batch(self) -> int:
        """Running requests above which a step does not speculate (0: always speculates)."""
        limit = self.config.speculative_max_batch
        if limit is not None:
            return limit
        method = self.config.speculative_method
        if method == "ngram" and self.tiled_target:
            # avx2's row-tile kernels make a step of a few dozen rows compute-bound: measured there, ngram
            # gains 1.36x at 2 streams, ~1.0x at 4-8 and loses at 16 (0.76x) (docs/benchmarks.md, 2026-12-03).
            # A dense target is bound by reading its weights: ngram gained 1.49x at 16 streams, 1.29x at 64.
            return NGRAM_MAX_BATCH_TILED
        return DEFAULT_SPECULATIVE_MAX_BATCH.get(method, 0)

    def active(self, num_running: int) -> bool:
        """Whether this step speculates: not when more requests run than `max_batch`."""
        return self.max_batch == 0 or num_running <= self.max_batch

    @staticmethod
    def eligible(request: Request) -> bool:
        """Requests that can speculate: generation requests of a decoder-only model without logits processors
        (a plugin's processor may keep state per call); a grammar's backend must be able to check guesses."""
        return (request.sampling_params is not None and request.pooling_params is None and not request.head_only
                and not request.logits_processors and request.encoder_token_ids is None
                and (request.matcher is None or hasattr(request.matcher, "validate")))

    def propose(self, request: Request, budget: int) -> list[int]:
        """Up to `budget` guesses of the decoding request's next tokens (never past its max_tokens or the
        context length: the model's own token after the last guess must still be allowed). With a draft model
        they are PENDING slots, for `fill` to write once the step's batch is known."""
        if not self.eligible(request) or (self.drafter is not None and request.num_virtual_tokens):
            return []
        state = self._state.get(request.request_id)
        if state is None:
            state = self._state[request.request_id] = _RequestState(self.config.num_speculative_tokens)
        remaining = request.max_tokens - len(request.output_token_ids)
        room = min(state.k, budget, remaining - 1, self.max_model_len - request.num_tokens - 1)
        if room < 1:
            return []
        if self.drafter is not None:
            # a draft far behind (the request ran while speculation paused) first runs the whole gap, a prefill
            # that pays back only over enough tokens still to come: about 4 draft-prefill tokens per saved step
            return [PENDING] * room if self.drafter.catch_up(request) <= max(8, 4 * remaining) else []
        tokens = self._tokens(state, request)
        c = self.config
        guesses = ngram_proposal(tokens, c.prompt_lookup_min, c.prompt_lookup_max, room)
        return self._allowed(request, guesses)

    @staticmethod
    def _allowed(request: Request, guesses: list[int]) -> list[int]:
        """The guesses up to the first one the request's grammar refuses (the model could not pick it)."""
        if guesses and request.matcher is not None:
            guesses = guesses[:request.matcher.validate(guesses)]
        return guesses

    def fill(self, sched: SchedulerOutput) -> None:
        """Write the draft model's guesses into the PENDING slots of the scheduled requests, shrinking a
        request's tokens where it has fewer. A draft that fails costs only this step's speculation."""
        if self.drafter is None or not sched.drafts:
            return
        rows = [i for i, r in enumerate(sched.requests) if r.request_id in sched.drafts]
        requests = [sched.requests[i] for i in rows]
        try:
            guesses = self.drafter.draft(requests, [len(sched.drafts[r.request_id]) for r in requests])
        except Exception:  # the target's step goes on, without guesses
            logger.exception("the draft model failed; this step runs without speculation")
            guesses = {}
        for i, request in zip(rows, requests, strict=True):
            reserved = len(sched.drafts[request.request_id])
            kept = self._allowed(request, guesses.get(request.request_id, []))
            sched.num_tokens[i] -= reserved - len(kept)
            if kept:
                sched.drafts[request.request_id] = kept
            else:
                del sched.drafts[request.request_id]

    @staticmethod
    def _tokens(state: _RequestState, request: Request) -> np.ndarray:
        """The request's tokens (after any virtual ones) as an array, appended to rather than rebuilt each step."""
        start, n = request.num_virtual_tokens, request.num_tokens
        if n - start < state.size:  # cannot shrink: rebuild
            state.size = 0
        if len(state.tokens) < n - start:
            grown = np.empty(max(2 * len(state.tokens), n - start + 64), dtype=np.int64)
            grown[:state.size] = state.tokens[:state.size]
            state.tokens = grown
        state.tokens[state.size:n - start] = request.token_slice(start + state.size, n)
        state.size = n - start
        return state.tokens[:state.size]

    def observe(self, request: Request, num_guesses: int, num_accepted: int) -> None:
        """Record a verified step: adapt the request's guess count (all accepted: two more; a miss: one fewer)."""
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_guesses
        self.stats.num_accepted_tokens += num_accepted
        state = self._state.get(request.request_id)
        if state is not None:
            limit = self.config.num_speculative_tokens
            state.k = min(limit, state.k + 2) if num_accepted == num_guesses else max(1, state.k - 1)

    def forget(self, request_ids: list[str]) -> None:
        """Drop finished requests' state."""
        for request_id in request_ids:
            self._state.pop(request_id, None)
        if self.drafter is not None:
            self.drafter.forget(request_ids)
