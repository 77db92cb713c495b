"""The step protocol and the pipeline that runs steps over a batch of items.

An item is a plain dict: the input's fields (`text`, `question`, `context`, `messages`, ...), to which
preprocessors add `prompt` / `prompt_token_ids`, the inference step adds `result`, and postprocessors
refine `result`. An item that fails gets an `error` string and is skipped by the later steps, so one bad
row never stops its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.llm import LLM

Item = dict[str, Any]
RESULT = "result"
ERROR = "error"
KINDS = ("preprocess", "inference", "postprocess")


class PipelineError(ValueError):
    """A pipeline that cannot be built as asked; `field` names the option at fault (when one is)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


@dataclass(slots=True)
class PipelineContext:
    """What every step may use: the model, the pipeline's sampling parameters and its task name."""

    llm: LLM
    sampling: SamplingParams = field(default_factory=SamplingParams)
    task: str = ""


@runtime_checkable
class Step(Protocol):
    """One stage of a pipeline. `run` gets the batch's live items (those without an `error`) and changes
    them in place; it records a single item's failure as `item["error"]` and raises only when the whole
    batch failed (the pipeline then records that error in every item)."""

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Process the items in place."""


class ItemStep:
    """Base for steps that handle one item at a time: subclasses implement `apply`, and an exception
    there fails that item alone."""

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Process one item in place."""
        raise NotImplementedError

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """Apply the step to each item; a failure is recorded in its item."""
        for item in items:
            try:
                self.apply(item, ctx)
            except Exception as exc:  # noqa: BLE001 - any failure belongs to its row
                fail(item, exc)


def fail(item: Item, exc: BaseException | str) -> None:
    """Record why `item` failed (the pipeline prefixes the step's name)."""
    item[ERROR] = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"


def as_item(value: Any) -> Item:
    """An input as an item: a dict is copied, a string is `{"text": ...}`, a pair is text + text_pair."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, tuple) and len(value) == 2:
        return {"text": value[0], "text_pair": value[1]}
    raise PipelineError(f"an input must be a string, a (text, text_pair) tuple or a dict; got {type(value).__name__}")


@dataclass
class Pipeline:
    """Ordered steps (preprocessors, one inference step, postprocessors) over batches of items.

    `pipe(inputs)` returns one dict per input, in order: the task's result fields, or `{"error": ...}`
    naming the step that failed. Each batch of `batch_size` items goes to the engine in one call."""

    task: str
    llm: LLM
    steps: list[tuple[str, Step]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch_size: int = 32

    @property
    def context(self) -> PipelineContext:
        """The context handed to every step."""
        return PipelineContext(self.llm, self.sampling, self.task)

    def __call__(self, inputs: Any | Sequence[Any]) -> list[dict[str, Any]]:
        """Run every input (one string or dict, or a list of them) through the steps, in batches."""
        rows = [inputs] if isinstance(inputs, (str, dict, tuple)) else list(inputs)
        out: list[dict[str, Any]] = []
        for start in range(0, len(rows), self.batch_size):
            out += self.run_batch(rows[start:start + self.batch_size])
        return out

    def run_batches(self, batches: list[list[Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(k, results of batches[k]) for every batch, as each finishes (here: in order, one at a time; a
        sharded run's batches finish in any order: distributed/batch.py)."""
        for k, rows in enumerate(batches):
            yield k, self.run_batch(rows)

    def run_batch(self, rows: Iterable[Any]) -> list[dict[str, Any]]:
        """One batch through every step; a row that cannot become an item fails alone."""
        items = []
        for row in rows:
            try:
                items.append(as_item(row))
            except PipelineError as exc:
                items.append({ERROR: f"input: {exc}"})
        ctx = self.context
        for name, step in self.steps:
            live = [item for item in items if ERROR not in item]
            if not live:
                break
            try:
                step.run(live, ctx)
            except Exception as exc:  # noqa: BLE001 - a batch-wide failure is every live row's failure
                for item in live:
                    fail(item, exc)
            for item in live:
                if ERROR in item:
                    item[ERROR] = f"{name}: {item[ERROR]}"
        return [{ERROR: item[ERROR]} if ERROR in item else dict(item.get(RESULT, {})) for item in items]
