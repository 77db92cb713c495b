"""Sampler on synthetic logits: processing order and numbers, seeds, masking, logprobs."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenloom.engine.request import Request
from tokenloom.engine.sampler import Sampler, SamplerOutput, _apply_top_p, apply_penalties, prompt_logprobs
from tokenloom.sampling_params import SamplingParams

VOCAB = 32
_ids = itertools.count()


def make_request(prompt: list[int] | None = None, output: list[int] | None = None, seed: int | None = None,
                 eos: frozenset[int] = frozenset({0}), **kwargs) -> Request:
    """A request with the given sampling params; `seed` gives it its own generator."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return Request(request_id=str(next(_ids)), prompt_token_ids=list(prompt or [1, 2, 3]),
                   sampling_params=SamplingParams(**kwargs), eos_token_ids=eos,
                   output_token_ids=list(output or []), generator=gen)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Reproducible logits of both signs."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_of_raw_logits_any_dtype() -> None:
    logits = random_logits(64)
    reqs = [make_request(temperature=0.0) for _ in range(64)]
    out = Sampler()(logits, reqs)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 64
    bf16 = logits.bfloat16()
    assert Sampler()(bf16, reqs).token_ids == bf16.float().argmax(-1).tolist()


def test_top_k_one_equals_greedy_and_logits_untouched() -> None:
    logits = random_logits(8)
    before = logits.clone()
    reqs = [make_request(temperature=1.3, top_k=1, repetition_penalty=1.5, presence_penalty=0.5,
                         output=[int(logits[i].argmax())], seed=i) for i in range(8)]
    greedy = [make_request(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5,
                           output=list(r.output_token_ids)) for r in reqs]
    assert Sampler()(logits, reqs).token_ids == Sampler()(logits, greedy).token_ids
    assert torch.equal(logits, before)


def _sample_sequence(sampler: Sampler, logits: torch.Tensor, req: Request, others: list[Request],
                     position: int) -> list[int]:
    """Sample 20 steps for `req` placed at `position` among `others`; returns its tokens."""
    tokens = []
    for _ in range(20):
        batch = others[:position] + [req] + others[position:]
        rows = torch.cat([logits[:1]] * len(batch))
        tokens.append(sampler(rows, batch).token_ids[position])
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    sampler = Sampler()
    logits = random_logits(1, seed=3) / 3  # flat-ish distribution: many distinct tokens
    alone = _sample_sequence(sampler, logits, make_request(seed=42, top_p=0.9), [], 0)
    others = [make_request(seed=7), make_request(), make_request(temperature=0.0), make_request(min_p=0.1)]
    batched = _sample_sequence(sampler, logits, make_request(seed=42, top_p=0.9), others, 2)
    batched2 = _sample_sequence(sampler, logits, make_request(seed=42, top_p=0.9), others[::-1], 4)
    assert alone == batched == batched2
    assert len(set(alone)) > 3
    other_seed = _sample_sequence(sampler, logits, make_request(seed=43, top_p=0.9), [], 0)
    assert other_seed != alone


def _frequencies(logits: torch.Tensor, n: int, seeded: bool, **kwargs) -> torch.Tensor:
    """Empirical token frequencies of n draws from one row (batched as n rows)."""
    if seeded:
        reqs = [make_request(seed=i, **kwargs) for i in range(n)]
    else:
        torch.manual_seed(0)
        reqs = [make_request(**kwargs)] * n  # rows are independent: one request object can fill them
    tokens = torch.tensor(Sampler()(logits.expand(n, -1), reqs).token_ids)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def _expected(logits: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    probs = (logits / temperature).softmax(-1) * keep
    return probs / probs.sum()


@pytest.mark.parametrize("seeded", [False, True])
def test_masking_and_frequencies(seeded: bool) -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    probs = logits.softmax(-1)[0]
    n = 4000 if seeded else 20000
    cases = {
        "plain": ({}, torch.ones(8)),
        "top_k": ({"top_k": 3}, torch.arange(8) < 3),
        # probs .403 .244 .148 .090 ...: top_p=0.7 needs the first 3 tokens
        "top_p": ({"top_p": 0.7}, torch.arange(8) < 3),
        "min_p": ({"min_p": 0.2}, probs >= 0.2 * probs.max()),
        "combined": ({"top_k": 5, "top_p": 0.9, "min_p": 0.1}, torch.arange(8) < 4),
    }
    for name, (kwargs, keep) in cases.items():
        freq = _frequencies(logits, n, seeded, **kwargs)
        assert freq[~keep.bool()].sum() == 0, name
        tol = 4 * (0.25 / n) ** 0.5
        assert torch.allclose(freq, _expected(logits[0], keep.float()), atol=tol), name


def test_temperature_scaling_frequencies() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    for temperature in (0.5, 2.0):
        freq = _frequencies(logits, 20000, False, temperature=temperature)
        assert torch.allclose(freq, _expected(logits[0], torch.ones(4), temperature), atol=0.015)


def test_penalties_exact_numbers() -> None:
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]]).repeat(3, 1)
    req = make_request(prompt=[0, 1, 0], output=[2, 2, 3], repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)
    only_freq = make_request(prompt=[4], output=[5, 5, 5], frequency_penalty=-1.0)
    apply_penalties(x, [req, only_freq], [0, 2])
    # repetition on tokens 0-3 (prompt+output): >0 divided, <=0 multiplied; then 0.5*count + 0.25*present
    want = torch.tensor([[1.0, -4.0, 0.5 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 0.5, 3.0],
                         [2.0, -2.0, 1.0, -1.0, 0.5, 3.0],
                         [2.0, -2.0, 1.0, -1.0, 0.5, 6.0]])
    assert torch.allclose(x, want)


def test_penalties_match_dense_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    x = random_logits(6, vocab=50)
    reqs, rows = [], [0, 2, 3, 5]

    def ids(low: int) -> list[int]:
        n = int(torch.randint(low, 30, (1,), generator=gen))
        return torch.randint(0, 50, (n,), generator=gen).tolist()

    for _ in rows:
        rep = float(torch.rand(1, generator=gen)) + 0.5
        reqs.append(make_request(prompt=ids(1), output=ids(0), repetition_penalty=rep, frequency_penalty=0.3,
                                 presence_penalty=-0.7))
    want = x.clone()
    for row, req in zip(rows, reqs, strict=True):
        p = req.sampling_params
        counts = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.long), minlength=50).float()
        seen = torch.zeros(50, dtype=torch.bool)
        seen[req.prompt_token_ids + req.output_token_ids] = True
        scale = torch.where(seen, p.repetition_penalty, 1.0)
        v = want[row]
        v = torch.where(v > 0, v / scale, v * scale)
        want[row] = v - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    apply_penalties(x, reqs, rows)
    assert torch.allclose(x, want, atol=1e-6)


def test_top_p_candidate_tiers_match_full_sort() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=gen) * torch.tensor([0.1, 0.5, 1, 2, 4, 8, 0.3, 3])[:, None]
    ps = [0.5, 0.9, 0.95, 0.7, 0.99, 0.3, 1.0, 0.8]
    probs = logits.softmax(-1)
    got = probs.clone()
    _apply_top_p(got, ps, tiers=(8, 64))  # small tiers: rows take every path (8, 64, full sort)
    for row, p in enumerate(ps):
        vals, order = probs[row].sort(descending=True)
        n_keep = int(((vals.cumsum(0) - vals) < p).sum()) if p < 1.0 else 300
        assert set(got[row].nonzero()[:, 0].tolist()) == set(order[:n_keep].tolist()), row
        assert torch.equal(got[row][got[row] > 0], probs[row][got[row] > 0])


def test_penalties_and_logit_bias_through_sampler() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0], [3.0, 2.9, 0.0, 0.0]])
    reqs = [make_request(prompt=[5], output=[0], temperature=0.0, presence_penalty=0.2),
            make_request(temperature=0.0, logit_bias={2: 3.5}),
            make_request(temperature=0.0)]
    assert Sampler()(logits, reqs).token_ids == [1, 2, 0]
    # greedy on penalised logits with a repetition penalty from the prompt alone
    rep = make_request(prompt=[0], temperature=0.0, repetition_penalty=1.1)
    assert Sampler()(logits[:1], [rep]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    def run(output: list[int], **kw) -> int:
        req = make_request(output=output, temperature=0.0, min_tokens=2, stop_token_ids=[1], eos={0}, **kw)
        return Sampler()(logits, [req]).token_ids[0]
    assert run([]) == 2
    assert run([3]) == 2
    assert run([3, 3]) == 0  # min_tokens reached
    assert run([], ignore_eos=True) == 0  # eos allowed, stop token still masked
    assert Sampler()(logits, [make_request(temperature=0.0, eos={0})]).token_ids == [0]


def test_logprobs_from_raw_distribution_with_ranks() -> None:
    logits = random_logits(3)
    reqs = [make_request(temperature=0.0, logprobs=3, repetition_penalty=2.0, output=[5]),
            make_request(seed=1, logprobs=0, temperature=0.7),
            make_request(temperature=0.0)]
    out = Sampler()(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    for row in range(2):
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert next(iter(entry)) == token
        assert entry[token].logprob == pytest.approx(raw[row, token].item(), abs=1e-5)
        assert entry[token].rank == int((raw[row] > raw[row, token]).sum()) + 1
    top = raw[0].topk(3)
    entry = out.logprobs[0]
    assert set(entry) == {out.token_ids[0], *top.indices.tolist()}
    for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1):
        assert entry[t].rank == rank and entry[t].logprob == pytest.approx(v, abs=1e-5)
    assert len(out.logprobs[1]) == 1
    assert out.logprobs[2] is None


def test_prompt_logprobs() -> None:
    logits = random_logits(5)
    targets = torch.tensor([3, 1, 4, 1, 5])
    entries = prompt_logprobs(logits, targets, k=2)
    raw = torch.log_softmax(logits, -1)
    assert len(entries) == 5
    for j, entry in enumerate(entries):
        t = int(targets[j])
        assert entry[t].logprob == pytest.approx(raw[j, t].item(), abs=1e-5)
        assert entry[t].rank == int((raw[j] > raw[j, t]).sum()) + 1
        top = raw[j].topk(2).indices.tolist()
        assert set(entry) == {t, *top}
        assert entry[top[0]].rank == 1 and entry[top[1]].rank == 2
    assert all(len(e) == 1 for e in prompt_logprobs(logits, targets, k=0))


@pytest.mark.parametrize("width", [1, 17, 64, 100, 50257, 262144])
def test_greedy_argmax_is_torchs_on_ties_infinities_and_nan(width) -> None:
    from tokenloom.engine.sampler import greedy_argmax

    torch.manual_seed(width)
    x = torch.randn(6, width)
    x[1] = 0.0  # all tied: the first index
    x[2] = float("-inf")
    if width > 3:
        x[3, [width // 3, width - 1]] = 50.0  # a tie between two maxima
        x[4, width - 2] = float("nan")  # a NaN wins, as in torch
        x[4, 1] = float("inf")
    x[5, width - 1] = float("inf")
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1))


def test_constrained_rows_equal_masking_first_whatever_else_they_ask() -> None:
    """A greedy constrained row with nothing else to do takes the argmax under its mask (not written); rows
    with logit bias, penalties, min_tokens or sampling are masked first, then processed: every row's token is
    the one masking the logits first gives, and logprobs still describe the raw logits."""
    rows, vocab = 6, 100
    logits = random_logits(rows, vocab, seed=3)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(4))
    kinds = [dict(temperature=0.0), dict(temperature=0.0, logprobs=2), dict(temperature=0.0, logit_bias={5: 9.0}),
             dict(temperature=0.0, presence_penalty=1.5), dict(temperature=0.0, min_tokens=4), dict(temperature=0.0)]
    reqs = [make_request(output=[5, 7], **k) for k in kinds]
    for r in reqs[:-1]:
        r.matcher = object()  # constrained (the sampler only asks whether there is one)
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(rows, -1)[:, :vocab].bool()
    masked = logits.masked_fill(~bits, float("-inf"))
    masked[-1] = logits[-1]  # the free row
    plain = [make_request(output=[5, 7], **k) for k in kinds]
    want = Sampler()(masked.clone(), plain)
    raw = logits.clone()
    got = Sampler()(raw, reqs, bitmask)
    assert got.token_ids == want.token_ids
    chosen = got.token_ids[1]
    assert got.logprobs[1][chosen].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[chosen].item())
    assert torch.equal(raw[0], logits[0])  # the mask-free argmax row was not written
