"""An example tokenloom plugin: one of each kind of extension, registered by `register(registry)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.models.llama import LlamaForCausalLM
from tokenloom.pipelines import StepSpec, TaskPlan
from tokenloom.pipelines.base import ItemStep, PipelineContext


class BanTokens:
    """Logits processor: the given token ids are never generated."""

    def __init__(self, token_ids: list[int]) -> None:
        if not token_ids or not all(isinstance(t, int) and t >= 0 for t in token_ids):
            raise ValueError(f"ban_tokens: token_ids must be a non-empty list of token ids; got {token_ids!r}")
        self.token_ids = list(token_ids)

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.token_ids] = float("-inf")
        return logits


@dataclass
class Uppercase(ItemStep):
    """Preprocessor: upper-case the item's text field."""

    field: str = "text"

    def apply(self, item: dict[str, Any], ctx: PipelineContext) -> None:
        item[self.field] = str(item[self.field]).upper()


@dataclass
class WordCount(ItemStep):
    """Postprocessor: count the words of the generated text."""

    def apply(self, item: dict[str, Any], ctx: PipelineContext) -> None:
        result = item["result"]
        result["num_words"] = len(str(result.get("text", "")).split())


class ScaledLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose logits are multiplied by `logit_scale` (config.json): a model architecture from outside."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.logit_scale = float(getattr(config, "logit_scale", 1.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.logit_scale


def shouting_task(llm: Any, max_tokens: int = 16) -> TaskPlan:
    """Task: upper-case the input, generate a continuation, count its words."""
    return TaskPlan([StepSpec("uppercase"), StepSpec("generate"), StepSpec("word_count")],
                    {"max_tokens": max_tokens, "temperature": 0.0})


def register(registry: Any) -> None:
    """Called by tokenloom with its PluginRegistry."""
    registry.add_logits_processor("ban_tokens", BanTokens)
    registry.add_step("preprocessor", "uppercase", Uppercase)
    registry.add_step("postprocessor", "word_count", WordCount)
    registry.add_model("ScaledLlamaForCausalLM", ScaledLlamaForCausalLM)
    registry.add_task("shouting", shouting_task)
