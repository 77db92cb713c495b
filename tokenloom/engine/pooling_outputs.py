"""Pooling results (an encoder-only model's raw head outputs) → the output dataclasses callers get (labels,
spans, mask candidates).

Small pure functions over one input's float32 logits (see `PoolingResult.data` for the shapes).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenloom.engine.pooling import EncoderInput
from tokenloom.outputs import (
    AnswerOutput,
    ClassificationOutput,
    FillMaskOutput,
    MaskPrediction,
    TokenClassificationOutput,
    TokenLabel,
)


def problem_type(config: Any) -> str:
    """single_label_classification, multi_label_classification or regression, as transformers infers
    it when the config does not say (one label: regression)."""
    if getattr(config, "problem_type", None):
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


def label_names(config: Any) -> list[str]:
    """Label names in logit order, from `id2label` (LABEL_i where it has none)."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def label_probs(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """Logits [..., num_labels] → probabilities as the problem type defines them."""
    kind = problem_type(config)
    if kind == "multi_label_classification":
        return torch.sigmoid(logits)
    if kind == "regression":
        return logits
    return torch.softmax(logits, dim=-1)


def classification(logits: torch.Tensor, config: Any, inp: EncoderInput) -> ClassificationOutput:
    """One input's [num_labels] logits → its labels with probabilities."""
    probs = label_probs(logits, config)
    labels = label_names(config)
    return ClassificationOutput(labels[int(probs.argmax())], labels, probs.tolist(), logits.tolist(),
                                len(inp.token_ids), inp.truncated)


def cross_encoder_score(logits: torch.Tensor, config: Any) -> float:
    """A one-label cross-encoder's relevance score: sigmoid of its logit, as sentence-transformers'
    CrossEncoder does, unless the checkpoint asks for the raw logit (activation_fn Identity)."""
    st = getattr(config, "sentence_transformers", None) or {}
    raw = str(st.get("activation_fn", "")).endswith("Identity")
    return float(logits[0]) if raw else float(torch.sigmoid(logits[0]))


def token_labels(logits: torch.Tensor, config: Any, inp: EncoderInput, tokenizer: Any) -> TokenClassificationOutput:
    """[tokens, num_labels] logits → each non-special token's best label, with its character span."""
    probs = label_probs(logits, config)
    scores, best = probs.max(dim=-1)
    labels = label_names(config)
    tokens = tokenizer.convert_ids_to_tokens(inp.token_ids)
    out = [TokenLabel(tokens[i], inp.token_ids[i], labels[int(best[i])], float(scores[i]), *inp.offsets[i])
           for i in range(len(inp.token_ids)) if inp.sequence_ids[i] is not None]
    return TokenClassificationOutput(out, len(inp.token_ids), inp.truncated)


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor,
              max_answer_len: int) -> tuple[int, int, float]:
    """The (start, end, score) maximising p(start) * p(end) over allowed tokens with start <= end <
    start + max_answer_len; the probabilities are softmaxes over the allowed tokens."""
    if not bool(allowed.any()):
        raise ValueError("no context token is left to answer from")
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1; got {max_answer_len}")
    p_start = torch.softmax(start_logits.masked_fill(~allowed, float("-inf")), dim=-1)
    p_end = torch.softmax(end_logits.masked_fill(~allowed, float("-inf")), dim=-1)
    n = start_logits.shape[0]
    scores = torch.triu(torch.tril(p_start[:, None] * p_end[None, :], max_answer_len - 1))
    flat = int(scores.argmax())
    start, end = divmod(flat, n)
    return start, end, float(scores[start, end])


def answer(logits: torch.Tensor, inp: EncoderInput, context: str, max_answer_len: int) -> AnswerOutput:
    """[tokens, 2] start/end logits of a (question, context) input → the best span of the context."""
    allowed = torch.tensor([s == 1 for s in inp.sequence_ids])
    start, end, score = best_span(logits[:, 0], logits[:, 1], allowed, max_answer_len)
    char_start, char_end = inp.offsets[start][0], inp.offsets[end][1]
    return AnswerOutput(context[char_start:char_end], score, char_start, char_end, start, end,
                        len(inp.token_ids), inp.truncated)


def fill_mask(logits: torch.Tensor, inp: EncoderInput, tokenizer: Any, top_k: int) -> FillMaskOutput:
    """[num_masks, vocab] logits → the top_k candidates per mask token."""
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    predictions = []
    for values, ids in zip(top.values.tolist(), top.indices.tolist()):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        predictions.append([MaskPrediction(i, t, v) for i, t, v in zip(ids, tokens, values)])
    return FillMaskOutput(predictions, len(inp.token_ids))
