"""The llguidance backend (guidance-ai's Rust constraint engine): JSON schemas, regexes, choices, Lark and GBNF
grammars. A compiled constraint is a matcher at its start state (building it compiles the grammar, with the
GIL released); each request's matcher is a copy of it, so a constraint compiles once however many requests use
it. Masks for a batch are filled in parallel by llguidance's own thread pool.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured.backend import StructuredOutputError, TokenizerInfo
from tokenloom.structured.json_schema import disjoint_one_of, drop_format, expand_dependencies
from tokenloom.structured.tool_parsers import COMPACT_JSON

_COMPACT = COMPACT_JSON  # compact JSON unless asked otherwise
_FLEXIBLE = {"whitespace_flexible": True}
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_MAX_FORMAT_RETRIES = 8
_EXECUTOR = None  # llguidance.LLExecutor: its thread pool fills a batch's masks in parallel


@dataclass(slots=True)
class LLGuidanceMatcher:
    """A request's llguidance matcher."""

    inner: object  # llguidance.LLMatcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]`."""
        view = bitmask[row]
        self.inner.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def accept(self, token: int) -> bool:
        """Advance over `token`; False when the grammar does not allow it."""
        return self.inner.consume_token(token)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` tokens."""
        if num_tokens and not self.inner.rollback(num_tokens):
            raise StructuredOutputError(f"cannot roll the matcher back {num_tokens} tokens: {self.error()}")

    def validate(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar allows from here (the matcher does not advance)."""
        return self.inner.validate_tokens(tokens)

    def is_terminated(self) -> bool:
        """True when the grammar allows nothing more."""
        return self.inner.is_stopped()

    def is_accepting(self) -> bool:
        """True when the text so far is complete."""
        return self.inner.is_accepting()

    def error(self) -> str | None:
        """The matcher's error, or None."""
        return self.inner.get_error() if self.inner.is_error() else None

    @staticmethod
    def fill_many(rows: list[tuple[LLGuidanceMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill the rows of several matchers at once, in parallel on llguidance's thread pool."""
        global _EXECUTOR
        if _EXECUTOR is None:
            from llguidance import LLExecutor

            _EXECUTOR = LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr([(m.inner, row) for m, row in rows], bitmask.data_ptr(),
                                          bitmask.shape[1] * 4, bitmask.shape[0])


class LLGuidanceBackend:
    """Compiles constraints with llguidance for one tokenizer (converting the tokenizer takes about a second
    for a 262k vocabulary: done once, on first use, off the engine's thread when the server compiles)."""

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        self._tokenizer = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the tokenizer view now (the engine's warm-up)."""
        self.tokenizer()

    def tokenizer(self):  # noqa: ANN201 - llguidance.LLTokenizer, imported lazily
        """The llguidance view of the model's tokenizer, built once."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self.info.hf_tokenizer, n_vocab=self.info.vocab_size, eos_token=list(self.info.eos_token_ids))
                except ValueError as exc:
                    raise StructuredOutputError(f"structured outputs need a fast (Rust) tokenizer: {exc}") from exc
            return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> object:
        """A matcher at the start of `params`' grammar (the compiled form); StructuredOutputError when the
        schema, regex or grammar is invalid or uses what llguidance does not support."""
        from llguidance import LLMatcher

        schema = _schema(params) if params.kind == "json" else None
        for _ in range(_MAX_FORMAT_RETRIES):
            matcher = LLMatcher(self.tokenizer(), _grammar(params, schema), log_level=0)
            if not matcher.is_error():
                return matcher
            unknown = _UNKNOWN_FORMAT.search(matcher.get_error()) if schema is not None else None
            if unknown is None:
                break
            schema = drop_format(schema, unknown[1])  # an annotation only, as validators treat it
        raise StructuredOutputError(f"structured_outputs.{params.kind}: {_short(matcher.get_error())}")

    def matcher(self, compiled: object) -> LLGuidanceMatcher:
        """A fresh matcher (a copy of the compiled start state)."""
        return LLGuidanceMatcher(compiled.deep_copy())


def _schema(params: StructuredOutputsParams) -> Any:
    """The constraint's JSON schema, parsed, with dependencies and disjoint oneOfs rewritten (json_schema.py)."""
    try:
        return disjoint_one_of(expand_dependencies(json.loads(params.json)))
    except ValueError as exc:  # json.JSONDecodeError is one
        raise StructuredOutputError(f"structured_outputs.json: {_short(str(exc))}") from exc
    except RecursionError as exc:
        raise StructuredOutputError("structured_outputs.json: the schema is nested too deep") from exc


def _grammar(params: StructuredOutputsParams, schema: Any = None) -> str:
    """llguidance's grammar text for a constraint (`schema`: a json constraint's rewritten schema)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    kind = params.kind
    options = _FLEXIBLE if params.whitespace_flexible else _COMPACT
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=options)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        return LLMatcher.grammar_from_lark(any_to_lark(params.grammar))
    except (ValueError, TypeError) as exc:
        raise StructuredOutputError(f"structured_outputs.{kind}: {_short(str(exc))}") from exc
    except Exception as exc:  # noqa: BLE001 - the GBNF converter raises bare Exceptions on bad input
        raise StructuredOutputError(f"structured_outputs.{kind}: {_short(str(exc))}") from exc


def _short(message: str, limit: int = 500) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + " ..."
