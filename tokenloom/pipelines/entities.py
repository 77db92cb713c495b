"""Group per-token BIO / IOB2 tags into entities with character offsets (the NER postprocessor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenloom.pipelines.base import RESULT, Item, ItemStep, PipelineContext, PipelineError

_OUTSIDE = ("O", "")


def split_tag(tag: str) -> tuple[str, str] | None:
    """("B" or "I", entity type) of a tag; None for outside. A bare type ("PER") counts as inside."""
    if tag in _OUTSIDE:
        return None
    if len(tag) > 2 and tag[0] in "BI" and tag[1] in "-_":
        return ("B" if tag[0] == "B" else "I"), tag[2:]
    return "I", tag


def group_entities(tokens: list[dict[str, Any]], text: str, strict: bool = False) -> list[dict[str, Any]]:
    """Entities from tagged tokens (each with `label`, `score`, `start`, `end`), in order.

    A `B-` tag starts an entity; an `I-` tag continues the open entity of its type. An `I-` tag with no
    such entity starts one (as seqeval's default mode and transformers' "simple" aggregation do) unless
    `strict`, which drops it (IOB2 proper). Each entity's `text` is `text[start:end]` and its `score`
    the mean of its tokens' scores."""
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for token in tokens:
        tag = split_tag(token["label"])
        continues = tag is not None and tag[0] == "I" and current is not None and current["entity"] == tag[1]
        if continues:
            current["end"] = token["end"]
            current["scores"].append(token["score"])
            continue
        if current is not None:
            entities.append(current)
            current = None
        if tag is not None and (tag[0] == "B" or not strict):
            current = {"entity": tag[1], "start": token["start"], "end": token["end"], "scores": [token["score"]]}
    if current is not None:
        entities.append(current)
    return [{"entity": e["entity"], "text": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"],
             "score": sum(e["scores"]) / len(e["scores"])} for e in entities]


@dataclass
class AggregateEntities(ItemStep):
    """`result["tokens"]` (per-token tags) grouped into `result["entities"]` over the item's `text`
    (see `group_entities`); the tokens are dropped unless `keep_tokens`."""

    strict: bool = False
    keep_tokens: bool = False

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Group the item's tagged tokens."""
        result = item.get(RESULT, {})
        if not isinstance(result.get("tokens"), list) or not isinstance(item.get("text"), str):
            raise PipelineError("needs per-token tags (result `tokens`, from classify_tokens) and the item's `text`")
        result["entities"] = group_entities(result["tokens"], item["text"], self.strict)
        if not self.keep_tokens:
            del result["tokens"]
