"""The constraint-backend interface: a backend turns a constraint into a compiled grammar (once per distinct
constraint; the engine caches it) and a compiled grammar into a matcher per request, which fills the request's
row of the step's token bitmask, advances on every accepted token and rolls back.

Backends register by name (`register_backend`); llguidance is built in and the default, a plugin can add
another (xgrammar, outlines-core) through `tokenloom.plugins`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tokenloom.engine.request import InvalidRequestError
from tokenloom.sampling_params import StructuredOutputsParams


class StructuredOutputError(InvalidRequestError):
    """A constraint that cannot be used: an invalid schema, an unsupported schema feature, a bad regex or
    grammar, an unknown backend. The message names what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "structured_outputs")


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """What a backend needs of the model's tokenizer: the HF tokenizer, the logits' width (the bitmask's
    size; ids past the tokenizer's own are never allowed) and the ids that end a sequence."""

    hf_tokenizer: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class Matcher(Protocol):
    """One request's position in its grammar."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 words, bit i of word w = token 32w + i)."""

    def accept(self, token: int) -> bool:
        """Advance over `token`; False when the grammar does not allow it (the matcher is then in error)."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""

    def is_terminated(self) -> bool:
        """True when the grammar is complete and allows nothing more (the request can stop)."""

    def is_accepting(self) -> bool:
        """True when the text so far is complete (the grammar could end here)."""

    def error(self) -> str | None:
        """Why the matcher failed, or None."""

    # Optional, for speculative decoding (a backend without it decodes its requests without guesses):
    # def validate(self, tokens: list[int]) -> int: how many of `tokens`, in order, the grammar allows from
    # here, without advancing.


class Backend(Protocol):
    """Compiles constraints for one tokenizer and makes matchers."""

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of `params`; StructuredOutputError naming what is wrong."""

    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of `compiled`."""


BackendFactory = Callable[[TokenizerInfo], Backend]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make a backend available by name (`StructuredOutputsParams.backend`, `--structured-outputs-backend`)."""
    if not name or not callable(factory):
        raise ValueError(f"a constraint backend needs a name and a factory; got {name!r}, {factory!r}")
    _BACKENDS[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a registered backend (plugins' tests)."""
    _BACKENDS.pop(name, None)


def backend_factory(name: str) -> BackendFactory:
    """The factory registered under `name`; StructuredOutputError lists the known ones."""
    if name == "llguidance" and name not in _BACKENDS:
        from tokenloom.structured.llguidance_backend import LLGuidanceBackend

        register_backend("llguidance", LLGuidanceBackend)
    if name not in _BACKENDS:
        raise StructuredOutputError(f"structured_outputs backend {name!r} is not registered; known: "
                                    f"{', '.join(sorted({'llguidance', *_BACKENDS}))}")
    return _BACKENDS[name]
