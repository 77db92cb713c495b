"""Turn the logits of one step into next tokens: constraints, logit bias, min_tokens, penalties, top-k/p, min-p,
seeds.

Order and meaning follow vLLM v1. Constrained rows (structured outputs) first lose every token their grammar
does not allow (the step's bitmask; a greedy row with no other processing takes its argmax under the mask
instead, without writing it). Non-argmax-invariant processing (logit bias, min_tokens masking,
repetition/frequency/presence penalties, then the request's logits processors from plugins) applies to
every row, so greedy rows take the exact argmax of the processed logits. Sampled rows then get
temperature, min-p, top-k and top-p (vLLM's order), and draw one uniform number each, inverted through
the row's cumulative distribution (one cumsum and a searchsorted: an exponential race would need a
random number per vocabulary entry, ten times the cost on CPU). A row with a seeded `request.generator`
draws from it alone, so a seed gives the same tokens whatever else shares the batch. Logprobs always
describe the raw model distribution (log_softmax of the unprocessed logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.engine.request import Request
from tokenloom.models import ops
from tokenloom.outputs import Logprob, PositionLogprobs
from tokenloom.structured.manager import apply_bitmask


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per row, and per row the logprobs it asked for (else None)."""

    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]


class Sampler:
    """Sample the next token of each row of a logits batch; row i belongs to requests[i]."""

    def __call__(self, logits: torch.Tensor, requests: list[Request], bitmask: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """Process `logits` [num_rows, vocab] (any float dtype) and return the sampled ids and logprobs;
        `bitmask` [num_rows, words] holds the allowed tokens of constrained rows."""
        params = [r.sampling_params for r in requests]
        masked_rows = [i for i, r in enumerate(requests) if r.matcher is not None] if bitmask is not None else []
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        min_rows = [i for i, (r, p) in enumerate(zip(requests, params, strict=True))
                    if p.min_tokens and len(r.output_token_ids) < p.min_tokens]
        pen_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0
                    or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        proc_rows = [i for i, r in enumerate(requests) if r.logits_processors]
        # Copy only when we modify rows whose raw logits are still needed (logprobs describe the raw
        # distribution): an all-greedy plain batch is one argmax of the raw logits, and a greedy constrained
        # row is not written at all (its argmax reads the mask).
        masked_logprobs = any(params[i].logprobs is not None for i in masked_rows)
        x = logits.to(torch.float32, copy=bool(masked_logprobs or bias_rows or min_rows or pen_rows or random_rows
                                               or proc_rows), memory_format=torch.contiguous_format)
        # a greedy constrained row that nothing else processes takes the argmax under its mask directly
        processed = set(bias_rows) | set(min_rows) | set(pen_rows) | set(random_rows) | set(proc_rows)
        masked_argmax = [i for i in masked_rows if i not in processed]
        if len(masked_argmax) < len(masked_rows):
            apply_bitmask(x, bitmask, [i for i in masked_rows if i in processed])
        if bias_rows:
            _apply_logit_bias(x, [requests[i] for i in bias_rows], bias_rows)
        if min_rows:
            _mask_stop_tokens(x, [requests[i] for i in min_rows], min_rows)
        if pen_rows:
            apply_penalties(x, [requests[i] for i in pen_rows], pen_rows)
        for i in proc_rows:
            _apply_processors(x, i, requests[i])

        # greedy rows (and top_k=1) take the exact argmax of the processed logits
        token_ids = greedy_argmax(x, bitmask, masked_argmax).tolist() if len(random_rows) < len(params) \
            else [0] * len(params)
        if random_rows:
            sampled = _sample(x, [requests[i] for i in random_rows], random_rows).tolist()
            for i, t in zip(random_rows, sampled, strict=True):
                token_ids[i] = t

        logprobs: list[PositionLogprobs | None] = [None] * len(params)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            rows = torch.tensor(lp_rows, device=logits.device)
            ids = torch.tensor([token_ids[i] for i in lp_rows], device=logits.device)
            entries = _token_logprobs(logits[rows], ids, [params[i].logprobs or 0 for i in lp_rows])
            for i, entry in zip(lp_rows, entries, strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)


def takes_forced_token(request: Request) -> bool:
    """Whether a request whose grammar allows exactly one next token can take it without computing its logits:
    whatever the sampler did, that token would win (every other logit is -inf), and nothing reads the row; not
    so with logprobs (they describe the raw logits), logits processors (a plugin could forbid the token) or
    below min_tokens (the token could be a stop token the sampler forbids)."""
    p = request.sampling_params
    return (p.logprobs is None and not request.logits_processors
            and not (p.min_tokens and len(request.output_token_ids) < p.min_tokens))


def greedy_argmax(x: torch.Tensor, bitmask: torch.Tensor | None = None, masked: list[int] | None = None
                  ) -> torch.Tensor:
    """Row-wise argmax of float32 logits [rows, vocab] (torch.argmax's answer: the first maximal index):
    the native kernel on CPU, 10 us against torch's 145 us a row for a 262k vocabulary. Rows in `masked`
    count only the tokens their row of `bitmask` allows (in place of masking them first, where no kernel)."""
    ids = ops.argmax_rows(x, bitmask, masked)
    if ids is None:
        apply_bitmask(x, bitmask, masked)
        ids = ops.argmax_rows(x)
    return ids


def _apply_processors(x: torch.Tensor, row: int, request: Request) -> None:
    """Run a request's logits processors (plugins' decoding strategies) on its row, in order."""
    view = out = x[row]
    for processor in request.logits_processors:
        out = processor(request.prompt_token_ids, request.output_token_ids, out)
        if not isinstance(out, torch.Tensor) or out.shape != view.shape:
            raise TypeError(f"logits processor {processor!r} must return a tensor of shape {tuple(view.shape)}")
    if out.data_ptr() != view.data_ptr():  # a processor that returned a new tensor rather than editing in place
        view.copy_(out)


def apply_penalties(x: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    """Penalise rows `rows` of the float32 logits `x` in place (vLLM's rules, in this order).

    repetition_penalty r on every token of prompt+output: a positive logit is divided by r, another one
    multiplied; then frequency_penalty x (count in output) and presence_penalty x (count > 0) are
    subtracted. Only the logits of tokens that occur are touched: the work is O(tokens), not O(vocab).
    """
    vocab, dev = x.shape[1], x.device
    flat = x.view(-1)
    params = [r.sampling_params for r in requests]
    row_t = torch.tensor(rows, device=dev)
    if any(p.repetition_penalty != 1.0 for p in params):
        seqs = [r.prompt_token_ids + r.output_token_ids for r in requests]
        idx = _flat_index(seqs, row_t, vocab)
        scale = _per_token([p.repetition_penalty for p in params], seqs, dev)
        vals = flat[idx]  # repeated tokens write the same value
        flat[idx] = torch.where(vals > 0, vals / scale, vals * scale)
    outs = [r.output_token_ids for r in requests]
    if any(p.frequency_penalty != 0.0 for p in params):
        flat.index_add_(0, _flat_index(outs, row_t, vocab),
                        -_per_token([p.frequency_penalty for p in params], outs, dev))
    if any(p.presence_penalty != 0.0 for p in params):
        present = torch.unique(_flat_index(outs, row_t, vocab))
        by_row = torch.zeros(x.shape[0], device=dev)
        by_row[row_t] = torch.tensor([p.presence_penalty for p in params], device=dev)
        flat.index_add_(0, present, -by_row[present // vocab])


def _flat_index(seqs: list[list[int]], rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """Indices into the flattened logits of every token of seqs[j] in row rows[j]."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=rows.device)
    lengths = torch.tensor([len(s) for s in seqs], device=rows.device)
    return torch.repeat_interleave(rows * vocab, lengths) + ids


def _per_token(values: list[float], seqs: list[list[int]], dev: torch.device) -> torch.Tensor:
    """values[j] repeated once per token of seqs[j]."""
    lengths = torch.tensor([len(s) for s in seqs], device=dev)
    return torch.repeat_interleave(torch.tensor(values, device=dev), lengths)


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> list[PositionLogprobs]:
    """Logprobs of each prompt target (logits[j] predicts target_ids[j]) plus the top k at each position."""
    return _token_logprobs(logits, target_ids.to(logits.device), [k] * logits.shape[0])


def _apply_logit_bias(x: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    """Add each request's logit_bias to its row in place."""
    r_idx, t_idx, vals = [], [], []
    for row, req in zip(rows, requests, strict=True):
        for token, bias in (req.sampling_params.logit_bias or {}).items():
            r_idx.append(row)
            t_idx.append(token)
            vals.append(bias)
    dev = x.device
    x.index_put_((torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)),
                 torch.tensor(vals, device=dev), accumulate=True)


def _mask_stop_tokens(x: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    """Below min_tokens, forbid eos (unless ignore_eos) and the stop_token_ids, in place."""
    r_idx, t_idx = [], []
    for row, req in zip(rows, requests, strict=True):
        p = req.sampling_params
        tokens = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            tokens |= set(req.eos_token_ids)
        tokens = {t for t in tokens if 0 <= t < x.shape[1]}
        r_idx += [row] * len(tokens)
        t_idx += sorted(tokens)
    if r_idx:
        dev = x.device
        x[torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)] = float("-inf")


def _sample(x: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p, then one draw per row; returns the token ids [len(rows)].

    `x` is the sampler's own float32 copy and may be overwritten.
    """
    dev, vocab = x.device, x.shape[1]
    params = [r.sampling_params for r in requests]
    x = x[torch.tensor(rows, device=dev)] if len(rows) < x.shape[0] else x
    x.div_(torch.tensor([p.temperature for p in params], device=dev)[:, None])
    if any(p.min_p > 0.0 for p in params):
        # p < min_p * p_max  <=>  logit < logit_max + log(min_p)
        log_min_p = torch.tensor([p.min_p for p in params], device=dev).log()[:, None]
        x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = torch.tensor(ks, device=dev)
        kth = x.topk(max(ks), dim=-1).values.gather(1, (k - 1).clamp_min(0)[:, None])
        x.masked_fill_(x < kth.masked_fill(k[:, None] == 0, float("-inf")), float("-inf"))
    probs = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()  # unnormalised probabilities, in place
    if any(p.top_p < 1.0 for p in params):
        _apply_top_p(probs, [p.top_p for p in params])
    # Inverse CDF: the first index whose cumulative mass exceeds u * total; its own mass is > 0.
    u = torch.rand(len(rows), device=dev)  # default generator; seeded rows are overwritten below
    seeded = [(j, r.generator) for j, r in enumerate(requests) if r.generator is not None]
    if seeded:
        draws = [torch.rand(1, generator=g, device=g.device).item() for _, g in seeded]
        u[torch.tensor([j for j, _ in seeded], device=dev)] = torch.tensor(draws, device=dev)
    cdf = probs.cumsum_(dim=-1)
    total = cdf[:, -1:].contiguous()
    ids = torch.searchsorted(cdf, u[:, None] * total, right=True)
    # u * total can round up to total; then take the first index that reaches it
    return torch.where(ids < vocab, ids, torch.searchsorted(cdf, total)).squeeze(1)


def _apply_top_p(probs: torch.Tensor, ps: list[float], tiers: tuple[int, ...] = (1024, 16384)) -> None:
    """Zero, in place, all but the smallest set of most likely tokens holding mass p (at least one).

    Sorting a large vocabulary is slow on CPU, so a row first looks at its top 1024 tokens, then 16384,
    and is sorted fully only when those hold less than p of its mass (each row's path depends on that
    row alone, so seeded rows stay reproducible whatever shares the batch).
    """
    vocab, dev = probs.shape[1], probs.device
    pending = [i for i, p in enumerate(ps) if p < 1.0]
    for m in (*[t for t in tiers if t < vocab], vocab):
        idx = torch.tensor(pending, device=dev)
        sub = probs[idx]
        target = torch.tensor([ps[i] for i in pending], device=dev)[:, None] * sub.sum(dim=-1, keepdim=True)
        if m < vocab:
            vals, order = sub.topk(m, dim=-1)
            done = (vals.sum(dim=-1, keepdim=True) >= target)[:, 0]
        else:
            vals, order = sub.sort(dim=-1, descending=True)
            done = torch.ones(len(pending), dtype=torch.bool, device=dev)
        drop = (vals.cumsum(dim=-1) - vals) >= target
        drop[:, 0] = False
        kept = vals[done].masked_fill_(drop[done], 0.0)
        probs[idx[done]] = torch.zeros_like(sub[done]).scatter_(1, order[done], kept)
        pending = [i for i, d in zip(pending, done.tolist(), strict=True) if not d]
        if not pending:
            return


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, ks: list[int]) -> list[PositionLogprobs]:
    """Per row: the logprob and rank of ids[row] plus the top ks[row], from log_softmax(logits).

    Ranks are 1 + the number of tokens with a strictly higher logprob.
    """
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, ids.long()[:, None])
    k = min(max(max(ks, default=0), 1), lp.shape[1])
    top_vals, top_ids = lp.topk(k, dim=-1)
    # The top-k values are sorted and hold every larger value: ranks inside them need no pass over the
    # vocabulary; only a chosen token below the k-th value (a sampled, unlikely one) is counted in full.
    ranks_t = (top_vals > chosen).sum(dim=-1) + 1
    outside = (chosen[:, 0] < top_vals[:, -1]).nonzero()[:, 0]
    if outside.numel():
        ranks_t[outside] = (lp[outside] > chosen[outside]).sum(dim=-1) + 1
    ranks = ranks_t.tolist()
    chosen_list, id_list = chosen[:, 0].tolist(), ids.tolist()
    top_ranks = ((top_vals[:, None, :] > top_vals[:, :, None]).sum(dim=-1) + 1).tolist()
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    out: list[PositionLogprobs] = []
    for row, token in enumerate(id_list):
        entry = {token: Logprob(chosen_list[row], ranks[row])}
        for j in range(min(ks[row], k)):
            entry.setdefault(top_ids_l[row][j], Logprob(top_vals_l[row][j], top_ranks[row][j]))
        out.append(entry)
    return out
