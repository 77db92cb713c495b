"""What the engine hands back to callers (shapes follow vLLM's RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenloom.structured.tool_parsers import ToolCall


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position's logprobs: token id -> Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    tool_calls: list[ToolCall] | None = None  # LLM.chat with tools: the calls parsed from `text`

    @property
    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt and each of its `n` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class EmbeddingOutput:
    """One input's sentence embedding (float32 values; unit length when the model normalizes)."""

    embedding: list[float]
    num_prompt_tokens: int
    truncated: bool = False


@dataclass(slots=True)
class ClassificationOutput:
    """One input's label scores: `probs[i]` belongs to `labels[i]`.

    `probs` is a softmax over the labels (single-label models), a sigmoid per label (multi-label), or
    the raw value (regression); `label` is the highest-scoring label."""

    label: str
    labels: list[str]
    probs: list[float]
    logits: list[float]
    num_prompt_tokens: int
    truncated: bool = False

    @property
    def scores(self) -> dict[str, float]:
        """label → probability."""
        return dict(zip(self.labels, self.probs))


@dataclass(slots=True)
class ScoreOutput:
    """The similarity of a text pair: cosine of the two embeddings (embedding models), or a
    cross-encoder's relevance score (sequence-classification models with one label)."""

    score: float
    num_prompt_tokens: int


@dataclass(slots=True)
class TokenLabel:
    """One token's best label; `start`/`end` are its character span in the input text."""

    token: str
    token_id: int
    label: str
    score: float
    start: int
    end: int


@dataclass(slots=True)
class TokenClassificationOutput:
    """Per-token labels of one input (special tokens left out)."""

    tokens: list[TokenLabel]
    num_prompt_tokens: int
    truncated: bool = False


@dataclass(slots=True)
class AnswerOutput:
    """The best answer span of extractive QA: `context[start:end] == answer`; `score` is
    p(start) * p(end); the token indices are positions in the model's input."""

    answer: str
    score: float
    start: int
    end: int
    start_token: int
    end_token: int
    num_prompt_tokens: int
    truncated: bool = False


@dataclass(slots=True)
class MaskPrediction:
    """One candidate for a [MASK] position and its probability."""

    token_id: int
    token: str
    score: float


@dataclass(slots=True)
class FillMaskOutput:
    """The top candidates for every mask token of one input, in input order."""

    predictions: list[list[MaskPrediction]]
    num_prompt_tokens: int
