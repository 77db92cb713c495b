"""Beam search over the engine, with transformers' selection, length penalty and stopping rules.

Each step sends every live beam of every prompt to the engine as one request for one token with its
top-K log-probabilities (K = max(2, 1 + number of EOS ids) x beam width, as transformers keeps), so all
beams of all prompts run in one continuous batch. Beams share their parent's blocks: the full ones
through the prefix cache (found by hash, reference-counted), and the parent's partly filled last block by
copy-on-write (kv_cache.py: the child gets a fresh block with a copy of those slots), so each beam
computes one new token per step, not its history.

The bookkeeping follows `GenerationMixin._beam_search` (transformers 5): the K best continuations over
all beams by cumulative log-probability; those that end (an EOS id, or max_tokens reached) and rank in
the first `beam_width` become finished hypotheses scored sum_logprobs / generated_len ** length_penalty;
the best `beam_width` unfinished ones run on; the search stops when no running beam can beat the worst
finished one (early_stopping False: judged at the current length; "never": at the longest length when
length_penalty > 0), when `beam_width` hypotheses are finished (early_stopping True), or when every
continuation ended.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenloom.engine.request import InvalidRequestError
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import BeamSearchParams, SamplingParams, SamplingParamsError

if TYPE_CHECKING:
    from tokenloom.adapters import AdapterRequest
    from tokenloom.engine.llm_engine import LLMEngine

NEG = -1.0e9  # transformers' "impossible" score; kept so scores and comparisons match it exactly
MAX_LOGPROBS = 20  # what SamplingParams.logprobs allows

# Top-k next-token log-probabilities for each sequence (prompt + generated so far).
Expander = Callable[[list[list[int]], int], list[dict[int, float]]]


@dataclass(slots=True)
class BeamSequence:
    """One finished hypothesis: its generated tokens (EOS included), text, summed log-probability and the
    length-penalised score beams are ranked by."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (an EOS id) or "length"
    text: str = ""


@dataclass(slots=True)
class BeamSearchOutput:
    """The best hypotheses of one prompt, best first (up to beam_width)."""

    prompt_token_ids: list[int]
    sequences: list[BeamSequence]


@dataclass(slots=True)
class _Search:
    """One prompt's beam search state."""

    prompt: list[int]
    running: list[tuple[list[int], float]]  # (generated tokens, cumulative logprob), best first
    finished: list[tuple[float, BeamSequence | None]] = field(default_factory=list)  # beam_width slots
    improvable: bool = True
    done: bool = False


def candidates_per_step(params: BeamSearchParams, eos_ids: frozenset[int]) -> int:
    """K: how many continuations transformers keeps each step (enough that `beam_width` of them go on even
    when the best ones all end in an EOS id)."""
    return max(2, 1 + (0 if params.ignore_eos else len(eos_ids))) * params.beam_width


def beam_search(prompts: Sequence[list[int]], params: BeamSearchParams, eos_ids: frozenset[int],
                expand: Expander) -> list[BeamSearchOutput]:
    """Run beam search for every prompt, expanding all live beams of all prompts together each step."""
    k = candidates_per_step(params, eos_ids)
    searches = [_Search(list(p), [([], 0.0)], [(NEG, None)] * params.beam_width) for p in prompts]
    for step in range(params.max_tokens):
        live = [s for s in searches if not s.done]
        if not live:
            break
        seqs = [s.prompt + tokens for s in live for tokens, score in s.running if score > NEG / 2]
        tops = iter(expand(seqs, k))
        for s in live:
            beams = [(tokens, score, next(tops)) for tokens, score in s.running if score > NEG / 2]
            _step(s, beams, step, k, params, eos_ids)
    return [BeamSearchOutput(s.prompt, [seq for score, seq in s.finished if seq is not None]) for s in searches]


def _step(s: _Search, beams: list[tuple[list[int], float, dict[int, float]]], step: int, k: int,
          params: BeamSearchParams, eos_ids: frozenset[int]) -> None:
    width, lp = params.beam_width, params.length_penalty
    candidates = sorted(((score + logprob, tokens, token) for tokens, score, top in beams
                         for token, logprob in top.items()), key=lambda c: -c[0])[:k]
    at_length = step + 1 >= params.max_tokens
    ends = [at_length or (not params.ignore_eos and token in eos_ids) for _, _, token in candidates]

    # The best `width` continuations that go on (ended ones only fill in, as transformers does, at -1e9).
    ranked = sorted(((acc + (NEG if end else 0.0), tokens + [token]) for (acc, tokens, token), end
                     in zip(candidates, ends)), key=lambda c: -c[0])[:width]
    s.running = [(tokens, score) for score, tokens in ranked]

    # Ended continuations among the first `width` become finished hypotheses when they beat one.
    all_full = all(seq is not None for _, seq in s.finished) and params.early_stopping is True
    new = []
    for rank, ((acc, tokens, token), end) in enumerate(zip(candidates, ends)):
        if not end or rank >= width:
            continue
        score = acc / ((step + 1) ** lp) + (NEG if all_full else 0.0) + (0.0 if s.improvable else NEG)
        reason = "length" if at_length and not (not params.ignore_eos and token in eos_ids) else "stop"
        new.append((score, BeamSequence(tokens + [token], acc, score, reason)))
    if new:
        s.finished = sorted(s.finished + new, key=lambda f: -f[0])[:width]

    s.improvable = s.improvable and _can_improve(s, step + 1, params)
    full = all(seq is not None for _, seq in s.finished) and params.early_stopping is True
    s.done = not s.improvable or full or all(ends) or at_length


def _can_improve(s: _Search, generated: int, params: BeamSearchParams) -> bool:
    """transformers' heuristic: can the best running beam still beat the worst finished hypothesis?"""
    lp = params.length_penalty
    length = params.max_tokens if params.early_stopping == "never" and lp > 0.0 else generated
    best_running = s.running[0][1] / (length ** lp)
    worst_finished = min(score for score, _ in s.finished)
    return any(best_running > (worst_finished if seq is not None else NEG) for _, seq in s.finished)


def engine_expander(engine: LLMEngine, adapter: AdapterRequest | None = None) -> Expander:
    """An Expander over a decoder-only engine: every sequence is a one-token greedy request (under `adapter`,
    if given) asking for its top-k log-probabilities, all run together; its cached blocks come from its parent
    beam's request."""
    counter = itertools.count()

    def expand(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=k, ignore_eos=True)
        ids = [f"beam-{next(counter)}" for _ in seqs]
        for rid, seq in zip(ids, seqs):
            engine.add_request(rid, seq, params, adapter=adapter)
        done: dict[str, RequestOutput] = {o.request_id: o for o in engine.run(ids) if o.finished}
        tops = []
        for rid in ids:
            out = done[rid].outputs[0]
            if out.finish_reason == "error":
                raise RuntimeError(f"beam search step failed: {out.stop_reason}")
            tops.append({t: e.logprob for t, e in out.logprobs[0].items() if e.rank <= k})
        return tops

    return expand


def run_beam_search(engine: LLMEngine, prompts: Sequence[str | list[int]], params: BeamSearchParams,
                    adapter: AdapterRequest | None = None) -> list[BeamSearchOutput]:
    """Beam search on a decoder-only engine for text or token-id prompts (under `adapter`: a LoRA, soft prompt
    or prefix), with each hypothesis detokenized."""
    if engine.loaded.kind != "decoder":
        raise ValueError("beam search runs on decoder-only models for now; this model is an encoder-decoder")
    eos_ids = frozenset(engine.tokenizer.eos_token_ids)
    width = candidates_per_step(params, eos_ids)
    if width > MAX_LOGPROBS:
        raise SamplingParamsError(f"beam_width {params.beam_width} needs the top {width} log-probabilities per "
                                  f"step; at most {MAX_LOGPROBS} are available (beam_width <= "
                                  f"{params.beam_width * MAX_LOGPROBS // width} for this model)")
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(engine.inputs.token_ids(prompt))
            engine.inputs.check_prompt(ids[-1], params.max_tokens, strict=True)
        except ValueError as exc:
            raise InvalidRequestError(f"prompt {i}: {exc}", getattr(exc, "field", None)) from exc
    outputs = beam_search(ids, params, eos_ids, engine_expander(engine, adapter))
    for out in outputs:
        for seq in out.sequences:
            seq.text = engine.tokenizer.decode(seq.token_ids)
    return outputs
