"""The scheduler: one token-budget rule for prefill, chunked prefill, decode and recompute.

Each step hands out up to `max_num_batched_tokens` tokens, first to running requests (oldest
first), then to waiting ones (FCFS). A request is given `num_tokens - num_computed_tokens` tokens or
what is left of the budget, whichever is smaller. When the KV pool runs dry, the most recently
admitted running request is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed later (its prefix may still be found in the cache).

An encoder–decoder request's encoder runs in the step that admits it (again after a preemption), so
its encoder tokens are charged to that step's budget too; they cannot be chunked, so a request whose
encoder input does not fit what is left waits for the next step (or runs alone if it exceeds the budget).
A pooling request (an encoder-only model's input) is admitted the same way, whole, with no KV blocks,
and finishes in the step that runs it.

With speculative decoding (engine/speculative.py) a decoding request may run its guesses of its next tokens
too: they take budget and KV slots like any token, are dropped first when either runs short, and after the
step its computed tokens advance only over the guesses the model accepted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenloom.config import SchedulerConfig
from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.request import Request, RequestStatus
from tokenloom.engine.speculative import Speculator

# (request, its new token, whether that token ended the request by EOS or a stop token id) → a stop string
# found in the text, or None. The output processor's detokenizer is the one implementation.
TextStop = Callable[[Request, int, bool], "str | None"]


INCOMPLETE_CONSTRAINT = "max_tokens reached before the structured-output constraint was complete"


@dataclass(slots=True)
class SchedulerOutput:
    """What to run this step: each scheduled request and how many of its tokens to compute; after the step,
    which requests it finished. Preempted and finished requests' per-request runner state can go."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # (source block, destination block, slots): cached partial blocks copied before the step runs
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # filled by Scheduler.update / finish(out=...)
    failed: list[Request] = field(default_factory=list)  # ended with an error while being scheduled
    # speculative decoding: request id → its guesses of its next tokens, run after its last token (counted in
    # its num_tokens)
    drafts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def released_req_ids(self) -> list[str]:
        """Requests that hold no blocks after this step: finished or preempted."""
        return self.finished_req_ids + [r.request_id for r in self.preempted]

    @property
    def total_tokens(self) -> int:
        """Tokens in the batch."""
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Whether request i reaches its last token this step, and so samples a new one (one at each of its
        guesses too, with speculation)."""
        r = self.requests[i]
        return r.num_computed_tokens + self.num_tokens[i] >= r.num_tokens


class Scheduler:
    """Owns the waiting queue and the running list; decides each step's batch."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 speculator: Speculator | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.speculator = speculator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a new request."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's requests and token counts, allocating their KV blocks."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        speculate = self.speculator is not None and self.speculator.active(len(self.running))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = self._drafts(request, n, budget, out) if speculate else []
            if drafts is None:  # failed and gone from the running list
                continue
            allocated = True if drafts else self._allocate_or_preempt(request, n, out)
            if allocated is None:
                continue
            if not allocated:
                break
            out.requests.append(request)
            out.num_tokens.append(n + len(drafts))
            budget -= n + len(drafts)
            i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _drafts(self, request: Request, n: int, budget: int, out: SchedulerOutput) -> list[int] | None:
        """A decoding request's guesses, with KV slots allocated for its token and them; [] when it has none or
        they do not fit (nothing allocated: the caller allocates its one token, preempting if need be)."""
        if n != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return []
        drafts = self.speculator.propose(request, budget - 1)
        if not drafts:
            return []
        allocated = self._allocate(request, 1 + len(drafts), out)
        if allocated is None:
            return None
        if not allocated:
            return []
        out.drafts[request.request_id] = drafts
        return drafts

    def _allocate_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool | None:
        while not (allocated := self._allocate(request, n, out)):
            if allocated is None:
                return None
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _allocate(self, request: Request, n: int, out: SchedulerOutput, cached: list = (), num_copied: int = 0
                  ) -> bool | None:
        """kv.allocate, with an error there (a bug, an injected fault) failing this request alone: it ends
        with the error, listed in `out.failed`, and None is returned."""
        try:
            return self.kv.allocate(request, n, cached, num_copied)
        except Exception as exc:
            self.finish(request, RequestStatus.FINISHED_ERROR, f"error: {type(exc).__name__}: {exc}", out)
            out.failed.append(request)
            return None

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.is_pooling:
                if request.num_prompt_tokens > budget and out.requests:
                    break
                budget -= self._admit(request, request.num_prompt_tokens, out)
                continue
            cached = self.kv.find_cached_prefix(request)
            partial = self.kv.find_cached_partial(request, len(cached))
            num_copied = partial[1] if partial else 0
            num_cached = len(cached) * self.kv.block_size + num_copied
            n = request.num_tokens - num_cached
            enc = request.num_encoder_tokens
            if (n + enc > budget and not self.config.enable_chunked_prefill) or (enc >= budget and out.requests):
                break
            n = max(1, min(n, budget - enc))
            allocated = self._allocate(request, n, out, cached, num_copied)
            if allocated is None:  # failed and gone from the queue
                continue
            if not allocated:
                break
            if partial:
                out.block_copies.append((partial[0], request.block_ids[len(cached)], num_copied))
            self.kv.stats.queries += request.num_tokens
            self.kv.stats.hits += num_cached
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            budget -= self._admit(request, n, out) + enc

    def _admit(self, request: Request, n: int, out: SchedulerOutput) -> int:
        """Move the queue's first request to running and into this step with n tokens; returns n."""
        self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.requests.append(request)
        out.num_tokens.append(n)
        return n

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]],
               text_stop: TextStop | None = None) -> list[Request]:
        """Advance computed counts, append each request's new tokens (one, or with speculation its accepted
        guesses and the model's next token) and decide every stop after each token, in this order: EOS and stop
        token ids (after min_tokens), max_tokens and the context length, then a stop string that `text_stop`
        (the detokenizer) finds in the new token's text, then a constrained request's complete grammar (its
        token's text kept); tokens after a stop are dropped. A pooling request that ran is done.
        Returns the requests that finished, also listed in `out.finished_req_ids`."""
        finished = []
        for request, n in zip(out.requests, out.num_tokens):
            if request.is_finished:
                continue
            drafts = out.drafts.get(request.request_id, ())
            request.num_computed_tokens += n - len(drafts)
            if request.is_pooling:
                self.finish(request, RequestStatus.FINISHED_STOPPED, None, out)
                finished.append(request)
                continue
            tokens = sampled.get(request.request_id)
            if not tokens:
                self.kv.cache_full_blocks(request)
                continue
            if drafts:
                self.speculator.observe(request, len(drafts), len(tokens) - 1)
            status = reason = None
            for j, token in enumerate(tokens):
                request.num_computed_tokens += j > 0  # the accepted guess before this token was computed
                request.output_token_ids.append(token)
                status, reason = self._stop(request, token, text_stop)
                if status is not None:
                    break
            self.kv.cache_full_blocks(request)
            if status is not None:
                self.finish(request, status, reason, out)
                finished.append(request)
        return finished

    def _stop(self, request: Request, token: int, text_stop: TextStop | None
              ) -> tuple[RequestStatus | None, int | str | None]:
        """Whether the request stops after its new `token`, and why (see update)."""
        if request.matcher is not None and request.matcher.error() is not None:
            # the grammar gave up while computing this step's mask (its mask then allows only EOS): an
            # error, never a clean stop that would pass the unconstrained text off as an answer
            return RequestStatus.FINISHED_ERROR, "error: the constraint failed: " + \
                request.matcher.error().splitlines()[0]
        status, reason = self._token_stop(request, token)
        text = text_stop(request, token, status is RequestStatus.FINISHED_STOPPED) if text_stop else None
        if status is None and text is not None:
            status, reason = RequestStatus.FINISHED_STOPPED, text
        if request.matcher is not None and status is not RequestStatus.FINISHED_STOPPED:
            status, reason = self._grammar_stop(request, token, status, reason)
        return status, reason

    def _token_stop(self, request: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if num_out >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    @staticmethod
    def _grammar_stop(request: Request, token: int, status: RequestStatus | None, reason: int | None
                      ) -> tuple[RequestStatus | None, int | str | None]:
        """Advance a constrained request's matcher over `token`: a complete grammar stops the request (nothing
        else could follow), a refused token (which the mask should have made impossible) fails it, and a
        request cut by max_tokens with its constraint unfinished says so in its stop reason."""
        if not request.matcher.accept(token):
            return RequestStatus.FINISHED_ERROR, f"error: the constraint refused token {token}: " \
                                                 f"{request.matcher.error()}"
        if request.matcher.is_terminated():
            return RequestStatus.FINISHED_STOPPED, None
        if status is RequestStatus.FINISHED_LENGTH and not request.matcher.is_accepting():
            return status, INCOMPLETE_CONSTRAINT
        return status, reason

    def finish(self, request: Request, status: RequestStatus, reason: int | str | None = None,
               out: SchedulerOutput | None = None) -> None:
        """End a request (a stop, an abort, an error): drop it from the queues, free its blocks, record
        `reason` (the stop token or string, or the error) and list it in `out`'s finished ids."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = reason
        self.kv.free(request)
        if self.speculator is not None:
            self.speculator.forget([request.request_id])
        if out is not None:
            out.finished_req_ids.append(request.request_id)
