"""Architecture name → model class, and what kind of model a class is. Plugins add architectures through
`register_model` / `unregister_model` (the plugin registry calls them; this module imports no plugin)."""

from __future__ import annotations

import importlib
from typing import Any, Literal

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


# What a model is, for everything that branches on it (engine paths, tasks, memory, routes):
# decoder-only, encoder–decoder (T5, BART), or encoder-only (BERT family: pooling and heads, no KV cache).
ModelKind = Literal["decoder", "encoder-decoder", "encoder"]


class UnsupportedModelError(ValueError):
    """No model class is registered for a checkpoint's architecture."""


def register_model(architecture: str, model_class: type[nn.Module] | str) -> type[nn.Module] | str | None:
    """Make `architecture` (as in config.json's `architectures`) load with `model_class` (a class or
    "module:attribute"); returns what it replaced, for `unregister_model`."""
    previous = _MODELS.get(architecture)
    _MODELS[architecture] = model_class
    return previous


def unregister_model(architecture: str, previous: type[nn.Module] | str | None = None) -> None:
    """Undo `register_model`: restore `previous`, or forget the architecture."""
    if previous is None:
        _MODELS.pop(architecture, None)
    else:
        _MODELS[architecture] = previous


def model_kind(model: nn.Module | type[nn.Module]) -> ModelKind:
    """decoder, encoder-decoder or encoder, for a model or its class."""
    from tokenloom.models.encoder_heads import EncoderModel

    cls = model if isinstance(model, type) else type(model)
    if getattr(cls, "is_encoder_decoder", False):
        return "encoder-decoder"
    return "encoder" if issubclass(cls, EncoderModel) else "decoder"


def supported_architectures() -> list[str]:
    """Every architecture name that can be loaded."""
    return sorted(_MODELS)


def model_class_for(config: Any) -> type[nn.Module]:
    """The model class for an HF config (by `architectures`, else by `model_type`)."""
    names = list(getattr(config, "architectures", None) or [])
    if not names and config.model_type in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[config.model_type]]
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
