"""Postprocessors over the inference step's `result`: parse a label out of generated text, extract an
answer span, parse generated JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenloom.pipelines.base import RESULT, Item, ItemStep, PipelineContext, PipelineError


def result_text(item: Item, key: str = "text") -> str:
    """The generated text a postprocessor reads."""
    text = item.get(RESULT, {}).get(key)
    if not isinstance(text, str):
        raise PipelineError(f"the result has no text field {key!r} (does an inference step that generates text "
                            "come before this step?)")
    return text


@dataclass
class ParseLabel(ItemStep):
    """The label the generated text names first (case-insensitive unless `case_sensitive`) as
    `result["label"]`; `default` when it names none."""

    labels: list[str] = field(default_factory=list)
    default: str | None = None
    case_sensitive: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.labels, list) or not all(isinstance(x, str) and x for x in self.labels):
            raise PipelineError("must be a list of non-empty strings", "labels")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Find the first label in the text."""
        text = result_text(item)
        labels = item.get("labels") or self.labels
        if not labels:
            raise PipelineError("no labels to look for: give the step `labels` or the item a `labels` list")
        hay = text if self.case_sensitive else text.lower()
        found = [(hay.find(lab if self.case_sensitive else lab.lower()), -len(lab), lab) for lab in labels]
        found = [f for f in found if f[0] >= 0]
        item[RESULT]["label"] = min(found)[2] if found else self.default


@dataclass
class ExtractAnswer(ItemStep):
    """The answer in generated text: its first line (with `first_line`), stripped, as `result["answer"]`;
    when the item has a `context` that contains it, `start`/`end` are its character span there (else
    null)."""

    first_line: bool = True
    strip_chars: str = " \t\n\"'."

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Cut the answer out of the text."""
        text = result_text(item).strip()
        if self.first_line:
            text = text.split("\n", 1)[0]
        answer = text.strip(self.strip_chars)
        context = item.get("context")
        start = context.find(answer) if isinstance(context, str) and answer else -1
        item[RESULT].update(answer=answer, start=start if start >= 0 else None,
                            end=start + len(answer) if start >= 0 else None)


@dataclass
class ParseJson(ItemStep):
    """The first JSON object or array in the generated text as `result["json"]`; with `strict` a text
    without valid JSON (or missing one of `required_keys`) fails the item, else `json` is null. With `schema`
    (a JSON schema) and `enforce` (the default), the pipeline's generation is constrained to it, so the text is
    that JSON and always validates; without `enforce` the JSON is only checked against it (jsonschema)."""

    strict: bool = True
    required_keys: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    enforce: bool = True

    def __post_init__(self) -> None:
        if self.schema is not None and not isinstance(self.schema, dict):
            raise PipelineError("must be a JSON schema (a mapping)", "schema")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Parse the text."""
        text = result_text(item)
        try:
            value = json.loads(text) if self.schema is not None and self.enforce else first_json(text)
            if self.schema is not None and not self.enforce:
                _validate(value, self.schema)
            missing = [k for k in self.required_keys if not isinstance(value, dict) or k not in value]
            if missing:
                raise ValueError(f"the JSON lacks keys {missing}")
        except ValueError as exc:
            if self.strict:
                if item[RESULT].get("finish_reason") == "length":
                    raise PipelineError(f"generation stopped at max_tokens before the JSON was complete; raise "
                                        f"max_tokens: {text[:80]!r}") from exc
                raise PipelineError(f"no valid JSON in the generated text ({exc}): {text[:80]!r}") from exc
            value = None
        item[RESULT]["json"] = value


def _validate(value: Any, schema: dict[str, Any]) -> None:
    """ValueError when `value` breaks `schema` (needs the jsonschema package)."""
    try:
        import jsonschema
    except ImportError as exc:
        raise PipelineError("checking JSON against a schema without enforcing it needs the jsonschema "
                            "package (pip install jsonschema)", "schema") from exc
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"the JSON breaks the schema: {exc.message}") from exc


def first_json(text: str) -> Any:
    """The first JSON object or array that parses, scanning from each `{` or `[`."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object or array found")
