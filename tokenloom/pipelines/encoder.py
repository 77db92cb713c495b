"""Inference steps on an encoder-only model, over the offline API (`LLM.embed`, `classify`, `score`,
`classify_tokens`, `answer`, `fill_mask`). The batch goes in one call; if that call fails, the items are
run one by one so that only the failing ones record an error."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenloom.pipelines.base import RESULT, Item, PipelineContext, PipelineError, fail


def text_of(item: Item, key: str = "text") -> str:
    """A required string field of the item."""
    value = item.get(key)
    if not isinstance(value, str):
        raise PipelineError(f"the item needs a string field {key!r}")
    return value


def run_isolated(items: list[Item], make_input: Callable[[Item], Any], call: Callable[[list[Any]], list[Any]],
                 to_result: Callable[[Item, Any], dict[str, Any]]) -> None:
    """`call` over every item's input at once; when it raises, once per item, failing only the bad ones."""
    ready, inputs = [], []
    for item in items:
        try:
            inputs.append(make_input(item))
            ready.append(item)
        except ValueError as exc:
            fail(item, exc)
    if not ready:
        return
    try:
        outputs: list[Any] = call(inputs)
    except (ValueError, RuntimeError):
        outputs = []
        for item, inp in zip(ready, inputs):
            try:
                outputs.append(call([inp])[0])
            except (ValueError, RuntimeError) as exc:
                fail(item, exc)
                outputs.append(None)
    for item, out in zip(ready, outputs):
        if out is not None:
            item[RESULT] = to_result(item, out)


def text_or_pair(item: Item) -> str | tuple[str, str]:
    """The item's text, or (text, text_pair) when it has a pair."""
    return (text_of(item), text_of(item, "text_pair")) if "text_pair" in item else text_of(item)


@dataclass
class Embed:
    """Sentence embeddings (`result["embedding"]`), pooled as the model says unless `pooling` /
    `normalize` override it."""

    pooling: str | None = None
    normalize: bool | None = None
    truncate: bool = False

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Embed the batch."""
        run_isolated(items, text_of, lambda xs: ctx.llm.embed(xs, truncate=self.truncate, pooling=self.pooling,
                                                              normalize=self.normalize),
                     lambda item, out: {"embedding": out.embedding})


@dataclass
class Classify:
    """A classifier head's labels for the item's `text` (and `text_pair`): `label`, `labels` best first
    and their `scores`."""

    truncate: bool = False

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Classify the batch."""
        def result(item: Item, out: Any) -> dict[str, Any]:
            order = sorted(range(len(out.labels)), key=lambda i: -out.probs[i])
            return {"label": out.label, "labels": [out.labels[i] for i in order],
                    "scores": [out.probs[i] for i in order]}
        run_isolated(items, text_or_pair, lambda xs: ctx.llm.classify(xs, truncate=self.truncate), result)


@dataclass
class Score:
    """How well `text` and `text_pair` match (`result["score"]`): a cross-encoder's score, else the
    cosine similarity of their embeddings."""

    truncate: bool = False

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Score the batch's pairs."""
        run_isolated(items, lambda item: (text_of(item), text_of(item, "text_pair")),
                     lambda xs: ctx.llm.score(xs, truncate=self.truncate), lambda item, out: {"score": out.score})


@dataclass
class ClassifyTokens:
    """Per-token labels of the item's `text` with character spans (`result["tokens"]`); follow with
    aggregate_entities for entities."""

    truncate: bool = False

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Tag the batch's tokens."""
        run_isolated(items, text_of, lambda xs: ctx.llm.classify_tokens(xs, truncate=self.truncate),
                     lambda item, out: {"tokens": [dataclasses.asdict(t) for t in out.tokens]})


@dataclass
class Answer:
    """Extractive QA: the best span of the item's `context` for its `question` (`answer`, `score`,
    `start`, `end` — character offsets in the context)."""

    max_answer_len: int = 15
    truncate: bool = True

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Answer the batch's questions."""
        def call(pairs: list[tuple[str, str]]) -> list[Any]:
            return ctx.llm.answer([q for q, _ in pairs], [c for _, c in pairs], max_answer_len=self.max_answer_len,
                                  truncate=self.truncate)
        run_isolated(items, lambda item: (text_of(item, "question"), text_of(item, "context")), call,
                     lambda item, out: {"answer": out.answer, "score": out.score, "start": out.start,
                                        "end": out.end})


@dataclass
class FillMask:
    """The `top_k` candidates for each mask token of the item's `text` (`result["predictions"]`, one
    list per mask, each candidate `token`, `token_id`, `score`)."""

    top_k: int = 5
    truncate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise PipelineError(f"must be an integer >= 1; got {self.top_k!r}", "top_k")

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Fill the batch's masks."""
        run_isolated(items, text_of, lambda xs: ctx.llm.fill_mask(xs, top_k=self.top_k, truncate=self.truncate),
                     lambda item, out: {"predictions": [[dataclasses.asdict(p) for p in mask]
                                                        for mask in out.predictions]})
