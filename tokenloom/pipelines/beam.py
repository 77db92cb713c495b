"""The beam_search inference step: generation by `LLM.beam_search` (all the batch's prompts in one call)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.pipelines.base import RESULT, Item, PipelineContext, PipelineError
from tokenloom.pipelines.generate import batch_prompts
from tokenloom.sampling_params import BeamSearchParams


@dataclass
class BeamSearch:
    """The `beam_width` best continuations of every prompt by length-penalised log-probability.
    `result`: `text` (the best; chunk outputs joined with `join`), and for one prompt per item `texts` and
    `scores` of all the hypotheses, best first."""

    beam_width: int = 4
    max_tokens: int = 32
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    join: str = "\n"

    def __post_init__(self) -> None:
        try:
            self.params = BeamSearchParams(self.beam_width, self.max_tokens, self.length_penalty, self.early_stopping)
        except (TypeError, ValueError) as exc:
            raise PipelineError(str(exc), str(exc).split(" ", 1)[0]) from exc

    def run(self, items: list[Item], ctx: PipelineContext) -> None:
        """One beam search over every item's prompt(s)."""
        flat, owners = batch_prompts(items, ctx, self.max_tokens)
        outputs = iter(ctx.llm.beam_search(flat, self.params) if flat else [])
        for item, count in owners:
            mine = [next(outputs) for _ in range(count)]
            item[RESULT] = {"text": self.join.join(out.sequences[0].text for out in mine)}
            if count == 1:
                item[RESULT].update(texts=[s.text for s in mine[0].sequences],
                                    scores=[s.score for s in mine[0].sequences])
