"""Structured outputs: constraints (JSON schema, regex, choice, grammar) compiled by a backend (llguidance by
default, others through `register_backend`), applied to each step's logits as a token bitmask."""

from tokenloom.structured.backend import (
    Backend,
    Matcher,
    StructuredOutputError,
    TokenizerInfo,
    register_backend,
    unregister_backend,
)
from tokenloom.structured.manager import StructuredOutputs, apply_bitmask

__all__ = ["Backend", "Matcher", "StructuredOutputError", "StructuredOutputs", "TokenizerInfo", "apply_bitmask",
           "register_backend", "unregister_backend"]
