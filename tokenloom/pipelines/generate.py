"""Inference steps on a generative model: `generate` (text) and `score_labels` (zero-shot classification
by each label's log-likelihood). Each sends its whole batch to the engine in one `LLM.generate` call and
lets continuous batching do the rest; a prompt the engine would refuse fails its own item first."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tokenloom.pipelines.base import RESULT, Item, PipelineContext, PipelineError, fail
from tokenloom.sampling_params import SamplingParams

PromptLike = str | list[int]


def item_prompts(item: Item) -> tuple[list[PromptLike], bool]:
    """The item's prompt(s) — token ids, else prompt text, else its chunks, else its text — and whether it
    had several (one per chunk)."""
    for key in ("prompt_token_ids", "prompt", "chunks", "text"):
        value = item.get(key)
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
            return [value], False
        if isinstance(value, list) and value:
            return list(value), True
    raise PipelineError("the item has no prompt, prompt_token_ids or text")


def checked_ids(ctx: PipelineContext, prompt: PromptLike, max_tokens: int | None) -> list[int]:
    """The prompt's token ids, checked by the engine's input processor (vocabulary, context length)."""
    inputs = ctx.llm.engine.inputs
    ids = inputs.token_ids(prompt)
    inputs.check_prompt(ids, max_tokens)
    return ids


def batch_prompts(items: list[Item], ctx: PipelineContext, max_tokens: int | None
                  ) -> tuple[list[list[int]], list[tuple[Item, int]]]:
    """Every item's checked prompt ids in one flat list, and each item with its number of prompts; an
    item whose prompt is bad fails alone and is left out."""
    flat: list[list[int]] = []
    owners: list[tuple[Item, int]] = []
    for item in items:
        try:
            prompts, _ = item_prompts(item)
            ids = [checked_ids(ctx, p, max_tokens) for p in prompts]
        except ValueError as exc:
            fail(item, exc)
            continue
        owners.append((item, len(ids)))
        flat += ids
    return flat, owners


def sampling_overrides(options: dict[str, Any] | None) -> dict[str, Any]:
    """Check a step's own sampling overrides by building SamplingParams from them."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise PipelineError("must be a mapping of sampling parameters", "sampling")
    try:
        SamplingParams(**options)
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc), "sampling") from exc
    return dict(options)


@dataclass
class Generate:
    """Generate text for every item's prompt(s) with the pipeline's sampling parameters (overridden by
    `sampling`); `result` gets `text` (chunk outputs joined with `join`), `finish_reason` (stop, or length when
    max_tokens cut it) and `texts` when n > 1."""

    sampling: dict[str, Any] | None = None
    join: str = "\n"

    def __post_init__(self) -> None:
        self.overrides = sampling_overrides(self.sampling)

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """One generate call for the batch."""
        params = dataclasses.replace(ctx.sampling, **self.overrides, output_kind="final")
        params.validate_vocab(ctx.llm.engine.vocab_size)
        flat, owners = batch_prompts(items, ctx, params.max_tokens)
        outputs = iter(ctx.llm.generate(flat, params, use_tqdm=False) if flat else [])
        for item, count in owners:
            self.collect(item, [next(outputs) for _ in range(count)])

    def collect(self, item: Item, outputs: list[Any]) -> None:
        """The item's result from its requests' outputs (one per chunk)."""
        errors = [c.stop_reason for out in outputs for c in out.outputs if c.finish_reason == "error"]
        if errors:
            fail(item, str(errors[0]))
            return
        per_choice = list(zip(*[out.outputs for out in outputs]))
        texts = [self.join.join(c.text for c in choice) for choice in per_choice]
        first = per_choice[0]  # the first choice's chunks: a chunk cut at max_tokens marks the whole
        reason = "length" if any(c.finish_reason == "length" for c in first) else first[-1].finish_reason
        item[RESULT] = {"text": texts[0], "finish_reason": reason, **({"texts": texts} if len(texts) > 1 else {})}


@dataclass
class ScoreLabels:
    """Zero-shot classification with a generative model: the log-likelihood of `label_prefix + label`
    after the item's prompt, for every label (the item's own `labels`, else the step's), summed over the
    label's tokens (or averaged with `length_normalize`). All (item, label) pairs go in one call.
    `result`: `label` (the most likely), `labels` best first, `scores` (softmax over labels) and
    `logprobs` (the label log-likelihoods, same order)."""

    labels: list[str] = field(default_factory=list)
    label_prefix: str = " "
    length_normalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.labels, list) or not all(isinstance(x, str) and x for x in self.labels):
            raise PipelineError("must be a list of non-empty strings", "labels")

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Score every (item, label) pair in one generate call."""
        tok = ctx.llm.get_tokenizer()
        flat: list[list[int]] = []
        owners: list[tuple[Item, list[str], list[tuple[int, int]]]] = []
        for item in items:
            try:
                labels = self.item_labels(item)
                prompt, several = item_prompts(item)
                if several:
                    raise PipelineError("zero-shot classification takes one prompt per item, not chunks")
                prompt_ids = checked_ids(ctx, prompt[0], 1)
                spans = []
                for label in labels:
                    full = prompt_ids + tok.encode(self.label_prefix + label, add_special_tokens=False)
                    checked_ids(ctx, full, 1)
                    spans.append((len(prompt_ids), len(full)))
                    flat.append(full)
            except ValueError as exc:
                fail(item, exc)
                continue
            owners.append((item, labels, spans))
        params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
        outputs = iter(ctx.llm.generate(flat, params, use_tqdm=False) if flat else [])
        for item, labels, spans in owners:
            outs = [next(outputs) for _ in spans]
            try:
                scores = [self.label_logprob(out, start, end) for out, (start, end) in zip(outs, spans)]
            except RuntimeError as exc:
                fail(item, exc)
                continue
            item[RESULT] = ranked(labels, scores)

    def item_labels(self, item: Item) -> list[str]:
        """The item's own labels, else the step's."""
        labels = item.get("labels") or self.labels
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise PipelineError("no labels to score: give the step `labels` or the item a `labels` list")
        return list(labels)

    def label_logprob(self, out: Any, start: int, end: int) -> float:
        """Sum (or mean) of the label tokens' log-probabilities."""
        if out.outputs[0].finish_reason == "error":
            raise RuntimeError(out.outputs[0].stop_reason)
        ids, plp = out.prompt_token_ids, out.prompt_logprobs
        total = sum(plp[j][ids[j]].logprob for j in range(start, end))
        return total / (end - start) if self.length_normalize else total


def ranked(labels: list[str], logprobs: list[float]) -> dict[str, Any]:
    """Labels best first with softmax scores and their log-likelihoods."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    order = sorted(range(len(labels)), key=lambda i: -logprobs[i])
    return {"label": labels[order[0]], "labels": [labels[i] for i in order],
            "scores": [weights[i] / total for i in order], "logprobs": [logprobs[i] for i in order]}
