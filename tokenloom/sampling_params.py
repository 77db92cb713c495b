"""Sampling parameters, validated on construction (names and meanings follow vLLM and OpenAI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it and the allowed range."""


_GREEDY_EPS = 1e-5
CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's shape): exactly one of `json` (a JSON schema, as a dict or its
    text), `json_object` (any JSON object), `regex`, `choice` (one of these strings) or `grammar` (Lark, or
    llama.cpp's GBNF). `backend` picks a registered constraint backend (default: the engine's, llguidance);
    `whitespace_flexible` lets a JSON output hold any whitespace (default: compact, one space after , and :)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    backend: str | None = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, dict):
            import json

            try:
                object.__setattr__(self, "json", json.dumps(self.json, sort_keys=True))  # hashable, one cache key
            except RecursionError:
                raise SamplingParamsError("structured_outputs.json is nested too deep to be a usable schema") from None
        given = self.kinds
        _check(len(given) == 1, "structured_outputs", f"must set exactly one of {', '.join(CONSTRAINT_KINDS)}",
               ", ".join(given) or "none")
        _check(self.json is None or isinstance(self.json, str), "structured_outputs.json",
               "must be a JSON schema (an object or its text)", self.json)
        _check(self.regex is None or (isinstance(self.regex, str) and self.regex), "structured_outputs.regex",
               "must be a non-empty string", self.regex)
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()),
               "structured_outputs.grammar", "must be a non-empty string", self.grammar)
        _check(self.choice is None or (self.choice and all(isinstance(c, str) and c for c in self.choice)),
               "structured_outputs.choice", "must be a non-empty list of non-empty strings", self.choice)

    @property
    def kinds(self) -> list[str]:
        """Which constraint fields are set."""
        return [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        """The constraint's kind: json, json_object, regex, choice or grammar."""
        return self.kinds[0]


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy (exact argmax). Penalties follow vLLM: presence/frequency penalties act
    on generated tokens, repetition_penalty on prompt and generated tokens. `logprobs=k` returns the
    sampled token's log-probability plus the top k, from the model's raw distribution.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: str = field(default="final")
    # Plugins' decoding strategies: names, {"name", "args"}, or (offline) callables; resolved through the
    # plugin registry when the request is added (`tokenloom.plugins.build_logits_processors`).
    logits_processors: list[Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # a JSON schema, regex, choice or grammar

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(StructuredOutputsParams.__dataclass_fields__))
            _check(not unknown, "structured_outputs", "has unknown fields", unknown)
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               "must be 0 or -1 (disabled) or a positive integer", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]",
               self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]",
               self.frequency_penalty)
        # below 0.01, dividing a positive logit by it can make float32 logits infinite (and the draw fail)
        _check(0.01 <= self.repetition_penalty <= 20.0, "repetition_penalty", "must be in [0.01, 20]",
               self.repetition_penalty)
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", "must be an integer >= 1 (or None for up to the context length)", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               "must be an integer >= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer", self.seed)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", "must be an integer in [0, 20]", self.logprobs)
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
               "prompt_logprobs", "must be an integer in [0, 20]", self.prompt_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings",
               self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative integers", self.stop_token_ids)
        for token, bias in (self.logit_bias or {}).items():
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"values must be in [-100, 100] (token {token})", bias)
        _check(self.output_kind in ("final", "delta", "cumulative"), "output_kind",
               "must be final, delta or cumulative", self.output_kind)
        _check(self.logits_processors is None or isinstance(self.logits_processors, list), "logits_processors",
               "must be a list of names or {name, args}", self.logits_processors)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "must be StructuredOutputsParams (or its fields as a dict)",
               self.structured_outputs)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax."""
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    def validate_vocab(self, vocab_size: int) -> None:
        """Check the token ids this request names against the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias or {})), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            _check(not bad, name, f"token ids must be in [0, {vocab_size})", bad)


@dataclass(slots=True)
class BeamSearchParams:
    """Beam search: keep the `beam_width` best hypotheses by length-penalised log-probability
    (sum of logprobs / generated_len ** length_penalty). `early_stopping` as in transformers: True stops
    once beam_width hypotheses are finished; False stops when the best running beam, at its current
    length, cannot beat the worst finished one; "never" judges that at max_tokens when
    length_penalty > 0."""

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width", "must be an integer >= 1",
               self.beam_width)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1",
               self.max_tokens)
        _check(self.early_stopping in (True, False, "never"), "early_stopping", "must be true, false or 'never'",
               self.early_stopping)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} {rule}; got {value!r}")
