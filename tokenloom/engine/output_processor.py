"""Per-request output state: incremental text, stop strings, logprobs, and n>1 fan-in.

A request with n > 1 runs as n child requests (sharing the prompt's KV blocks through the prefix
cache); their completions are gathered back into one RequestOutput here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenloom.engine.detokenizer import IncrementalDetokenizer
from tokenloom.engine.request import Request
from tokenloom.loader.tokenizer import Tokenizer
from tokenloom.outputs import CompletionOutput, PositionLogprobs, RequestOutput


@dataclass
class _Child:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    index: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    cumulative_logprob: float = 0.0


@dataclass
class ParentState:
    """One user request and its `n` children."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        """All children finished."""
        return all(c.request.is_finished for c in self.children)


class OutputProcessor:
    """Turns engine steps into RequestOutputs (final, delta or cumulative, per request)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, _Child]] = {}

    def add(self, parent: ParentState, children: list[Request]) -> None:
        """Track a new user request and its child requests."""
        for index, request in enumerate(children):
            params = request.sampling_params
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids[request.num_virtual_tokens:],
                                           params)
            child = _Child(request, detok, [] if params.logprobs is not None else None, index)
            parent.children.append(child)
            self.child_to_parent[request.request_id] = (parent, child)
        if children[0].sampling_params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[parent.request_id] = parent

    def on_token(self, request: Request, token: int, logprobs: PositionLogprobs | None, ends: bool) -> str | None:
        """Feed one sampled token; returns a stop string when one was hit. `ends` says the token ended the
        request by EOS or a stop token id: its text is hidden (the scheduler decides the stop)."""
        _, child = self.child_to_parent[request.request_id]
        if child.logprobs is not None and logprobs is not None:
            self._decode_logprob_tokens(logprobs)
            child.logprobs.append(logprobs)
            child.cumulative_logprob += logprobs[token].logprob
        return child.detokenizer.update([token], is_eos=ends)

    def on_prompt_logprobs(self, request: Request, logprobs: list[PositionLogprobs]) -> None:
        """Append a chunk's prompt logprobs (once per prompt, not again after a recompute)."""
        parent, child = self.child_to_parent[request.request_id]
        if parent.prompt_logprobs is None or child is not parent.children[0]:
            return
        if len(parent.prompt_logprobs) < request.num_real_prompt_tokens:
            for lp in logprobs:
                self._decode_logprob_tokens(lp)
            parent.prompt_logprobs.extend(logprobs)

    def _decode_logprob_tokens(self, logprobs: PositionLogprobs) -> None:
        for token_id, lp in logprobs.items():
            if lp.decoded_token is None:
                lp.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)

    def make_output(self, request: Request) -> RequestOutput | None:
        """The parent's RequestOutput after a child changed, or None if nothing is due yet."""
        parent, child = self.child_to_parent[request.request_id]
        kind = request.sampling_params.output_kind
        if kind == "final" and not parent.finished:
            return None
        if kind == "delta":
            # The output that finishes the parent is its last: it must carry every sibling's unsent tokens too.
            outputs = [self._completion(c, delta=True) for c in parent.children
                       if c is child or (parent.finished and c.sent_tokens < len(c.request.output_token_ids))]
        else:
            outputs = [self._completion(c, delta=False) for c in parent.children]
        out = RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs,
                            parent.finished, parent.prompt_logprobs,
                            max(0, parent.children[0].request.num_cached_tokens
                                - parent.children[0].request.num_virtual_tokens))
        if parent.finished:
            self.forget(parent)
        return out

    def _completion(self, child: _Child, delta: bool) -> CompletionOutput:
        r = child.request
        finished = r.is_finished
        if delta:
            text = child.detokenizer.get_delta(finished)
            token_ids = r.output_token_ids[child.sent_tokens:]
            logprobs = child.logprobs[child.sent_logprobs:] if child.logprobs is not None else None
            child.sent_tokens = len(r.output_token_ids)
            child.sent_logprobs = len(child.logprobs or [])
        else:
            if finished:
                child.detokenizer.get_delta(finished=True)  # flush held-back text into output_text
            text, token_ids, logprobs = child.detokenizer.output_text, list(r.output_token_ids), child.logprobs
        return CompletionOutput(child.index, text, token_ids,
                                child.cumulative_logprob if child.logprobs is not None else None,
                                logprobs, r.finish_reason, r.stop_reason)

    def forget(self, parent: ParentState) -> None:
        """Drop a request's state."""
        self.parents.pop(parent.request_id, None)
        for child in parent.children:
            self.child_to_parent.pop(child.request.request_id, None)
