"""Classification heads (PEFT's SEQ_CLS adapters), with the label names `tokenloom train` records beside them
(LABEL_i for an adapter trained elsewhere): on an encoder, `classifier` [labels, hidden] on the pooled first
token (BERT's pooler from the base checkpoint, as BertForSequenceClassification); on a decoder, `score`
[labels, hidden] on the last token's final hidden state (as LlamaForSequenceClassification)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

HEAD_MODULES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
# a LoRA adapter's head keys, then a prompt-learning adapter's (PEFT wraps the base model one level less)
_KEYS = ("base_model.model.classifier.", "base_model.model.score.", "base_model.classifier.", "base_model.score.")


@dataclass(slots=True)
class SequenceHead:
    """A trained head: logits = classifier(pooler(first token)) on an encoder, score(last token) on a decoder."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor | None
    labels: list[str]
    pooler_updates: list[Any] = field(default_factory=list)  # LoRA updates (LoRAUpdate) of the pooler's dense

    def logits(self, model: nn.Module, first_rows: torch.Tensor) -> torch.Tensor:
        """The rows a head reads (an encoder's first tokens, a decoder's last) [seqs, hidden] → float32 logits."""
        pooled = (model.pooled(first_rows, [(u.a, u.b, u.scaling) for u in self.pooler_updates])
                  if hasattr(model, "pooled") else first_rows)
        bias = None if self.bias is None else self.bias.to(pooled.dtype)
        return torch.nn.functional.linear(pooled, self.weight.to(pooled.dtype), bias).float()

    def label_config(self) -> Any:
        """The label fields pooling outputs read (num_labels, id2label, problem_type), as an HF config has them."""
        return SimpleNamespace(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                               problem_type="single_label_classification")

    def memory_bytes(self) -> int:
        """Bytes of its tensors."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


def read_head(tensors: dict[str, torch.Tensor], folder: Path, hidden: int, device: torch.device,
              where: str, pooler_updates: list[Any]) -> SequenceHead:
    """The head of a SEQ_CLS adapter's tensors; ValueError (naming `where`) when it is missing or misshapen."""
    key = next((k for k in _KEYS if k + "weight" in tensors), None)
    if key is None:
        raise ValueError(f"{where}: a SEQ_CLS adapter needs a head ({' or '.join(k + 'weight' for k in _KEYS)})")
    weight, bias = tensors[key + "weight"], tensors.get(key + "bias")
    if weight.dim() != 2 or weight.shape[1] != hidden or (bias is not None and bias.shape != weight.shape[:1]):
        head = key.removeprefix("base_model.").removeprefix("model.")
        raise ValueError(f"{where}: {head}weight is {tuple(weight.shape)}; this model needs (num_labels, {hidden}) "
                         f"(an adapter of another base model?)")
    return SequenceHead(weight.to(device, torch.float32), None if bias is None else bias.to(device, torch.float32),
                        label_names(folder, weight.shape[0]), pooler_updates)


def label_names(folder: Path, count: int) -> list[str]:
    """The label names `tokenloom train` saved with the adapter, else LABEL_0..LABEL_{count-1}."""
    try:
        saved = json.loads((folder / "tokenloom_train.json").read_text()).get("labels") or ""
    except (OSError, ValueError, AttributeError):
        saved = ""
    names = [w.strip() for w in saved.split(",") if w.strip()]
    return names if len(names) == count else [f"LABEL_{i}" for i in range(count)]
