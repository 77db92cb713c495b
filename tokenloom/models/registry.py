"""Architecture name → model class. Plugins add more with `register_model`."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "tokenloom.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tokenloom.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "tokenloom.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "tokenloom.models.llama:LlamaForCausalLM",
    "Gemma3ForCausalLM": "tokenloom.models.gemma3:Gemma3ForCausalLM",
    "GPT2LMHeadModel": "tokenloom.models.gpt2:GPT2LMHeadModel",
    "T5ForConditionalGeneration": "tokenloom.models.t5:T5ForConditionalGeneration",
    "BartForConditionalGeneration": "tokenloom.models.bart:BartForConditionalGeneration",
}
# Encoder-only families × the heads their checkpoints carry (models/encoder_heads.py), e.g. BertForMaskedLM.
_MODELS.update({f"{family}{task}": f"tokenloom.models.encoder_heads:Encoder{task}"
                for family in ("Bert", "Roberta", "XLMRoberta", "Camembert", "DistilBert")
                for task in ("Model", "ForSequenceClassification", "ForTokenClassification",
                             "ForQuestionAnswering", "ForMaskedLM")})
# For configs that name no architecture (e.g. built from GGUF metadata).
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel",
                  "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}


class UnsupportedModelError(ValueError):
    """No model class is registered for a checkpoint's architecture."""


def register_model(architecture: str, model_class: type[nn.Module] | str) -> None:
    """Make `architecture` (as in config.json's `architectures`) load with `model_class`."""
    _MODELS[architecture] = model_class


def supported_architectures() -> list[str]:
    """Every architecture name that can be loaded."""
    return sorted(_MODELS)


def model_class_for(config: Any) -> type[nn.Module]:
    """The model class for an HF config (by `architectures`, else by `model_type`; installed plugins are
    loaded first when no registered class matches)."""
    names = list(getattr(config, "architectures", None) or [])
    if not names and config.model_type in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[config.model_type]]
    if not any(name in _MODELS for name in names):
        from tokenloom.plugins import load_plugins

        load_plugins()  # an installed plugin may add the architecture
    for name in names:
        target = _MODELS.get(name)
        if target is None:
            continue
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target
    raise UnsupportedModelError(f"architecture {names or config.model_type!r} is not supported; "
                                f"supported: {', '.join(supported_architectures())}")
