"""Encoder models with the heads HF checkpoints carry: base (embeddings), sequence classification,
token classification, extractive question answering and masked LM, for every family in models/bert.py.

Each class runs the shared body (`forward` → hidden states of a packed batch) and maps its head onto
rows the pooling engine picks (`compute_head`): first tokens for sequence classification, all tokens
for tagging and QA, [MASK] tokens for fill-mask. Head parameters are renamed at load onto one layout
per task, whatever the family called them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tokenloom.models.bert import EncoderBody, EncoderSpec, activation, hf_body_name, modern_norm_name
from tokenloom.models.layers.encoder_attention import EncoderMetadata
from tokenloom.models.layers.linear import TiedLMHead
from tokenloom.models.loading import load_named_weights

_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
_BODY_ROOTS = ("embeddings.", "encoder.", "transformer.")
_IGNORED = ("pooler.", "cls.seq_relationship.")  # BERT's pooler and next-sentence head, unless a head uses them


class EncoderModel(nn.Module):
    """A bare encoder (`BertModel`, `RobertaModel`, …): hidden states for embeddings."""

    supported_tasks: ClassVar[tuple[str, ...]] = ("embed",)
    # checkpoint head prefix → ours, per family; the first match wins
    head_names: ClassVar[dict[str, list[tuple[str, str]]]] = {}

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.spec = EncoderSpec.from_config(config)
        self.model = EncoderBody(self.spec)
        # A bare BERT's pooler (dense + tanh on [CLS]), kept when its checkpoint has one: a classification
        # head trained on the encoder (PEFT's SEQ_CLS adapters) sits on it, as BertForSequenceClassification's.
        self.pooler: nn.Linear | None = None

    def module_name(self, checkpoint_name: str) -> str | None:
        """A checkpoint module name (`bert.encoder.layer.0.attention.self.query`) → ours (None: not a body
        module); the inverse of `checkpoint_module_name`."""
        name = checkpoint_name.removeprefix(_PREFIX[self.spec.family])
        if name == "pooler.dense" and self.pooler is not None:
            return "pooler"
        return "model." + hf_body_name(name, self.spec.family) if name.startswith(_BODY_ROOTS) else None

    def checkpoint_module_name(self, name: str) -> str:
        """Our body module name → the checkpoint's (BERT and RoBERTa: the same path under the family prefix)."""
        if self.spec.family == "distilbert":
            raise ValueError("adapters on DistilBERT checkpoints are not supported (its module names differ)")
        return _PREFIX[self.spec.family] + name.removeprefix("model.")

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Every parameter under its checkpoint name (fused q|k|v split back; the body under the family
        prefix, a head under the family's names), what `load_weights` reads back."""
        from tokenloom.models.loading import checkpoint_tensors

        inverse = [(dst, src) for src, dst in self.head_names.get(self.spec.family, [])]
        out = {}
        for name, tensor in checkpoint_tensors(self).items():
            if name.startswith("model."):
                out[self.checkpoint_module_name(name)] = tensor
                continue
            mapped = next((src + name[len(dst):] for dst, src in inverse if name.startswith(dst)), None)
            if mapped is None:
                raise ValueError(f"{type(self).__name__}: no checkpoint name for {name!r}")
            out[mapped] = tensor
        return out

    def pooled(self, rows: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]] = ()
               ) -> torch.Tensor:
        """First-token hidden states → the pooler's output (tanh of its dense layer, plus low-rank `updates`
        (A, B, scaling) to it: an adapter's LoRA on the pooler)."""
        if self.pooler is None:
            raise ValueError(f"{type(self).__name__}: the checkpoint has no pooler (pooler.dense) for a "
                             f"classification head to sit on")
        out = self.pooler(rows)
        for a, b, scaling in updates:
            out = out + (rows @ a.t().to(rows.dtype)) @ b.t().to(rows.dtype) * scaling
        return torch.tanh(out)

    def input_embeddings(self) -> nn.Module:
        """The word embeddings (HF's `get_input_embeddings()`): a soft prompt's rows replace their output,
        before positions and token types are added, as PEFT's `inputs_embeds` are."""
        return self.model.embeddings.word_embeddings

    @property
    def max_input_len(self) -> int:
        """The longest sequence the model can encode."""
        return self.spec.max_input_len

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: EncoderMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Packed batch → last hidden states [tokens, hidden]."""
        return self.model(input_ids, positions, meta, token_type_ids)

    def compute_head(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden states of the rows the task reads → float32 head outputs."""
        raise ValueError(f"{type(self).__name__} has no task head; it supports {', '.join(self.supported_tasks)}")

    def head_name(self, name: str, names: set[str]) -> str | None:
        """A non-body checkpoint name → our parameter name (None: skip it)."""
        for src, dst in self.head_names.get(self.spec.family, []):
            if name.startswith(src):
                return dst + name[len(src):]
        if name.startswith(_IGNORED) or not self.head_names:
            return None  # a bare encoder ignores whatever heads its checkpoint carries
        return name  # unknown: load_named_weights names it in its error

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load an HF checkpoint of this family (with or without the family prefix, e.g. `bert.`)."""
        weights = list(weights)  # tensors are mmap'ed; a list lets heads see which names exist
        names = {n for n, _ in weights}
        prefix = _PREFIX[self.spec.family]

        def rename(name: str) -> str | None:
            if name.endswith(("position_ids", "token_type_ids")):  # buffers, not weights
                return None
            name = modern_norm_name(name.removeprefix(prefix))
            if name.startswith(_BODY_ROOTS):
                return "model." + hf_body_name(name, self.spec.family)
            return self.head_name(name, names)
        load_named_weights(self, weights, rename)
        if not self.head_names:
            self._keep_pooler({n.removeprefix(prefix): t for n, t in weights})

    def _keep_pooler(self, tensors: dict[str, torch.Tensor]) -> None:
        weight, bias = tensors.get("pooler.dense.weight"), tensors.get("pooler.dense.bias")
        if weight is None or bias is None:
            return
        ref = self.model.embeddings.word_embeddings.weight
        self.pooler = nn.Linear(weight.shape[1], weight.shape[0], device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.pooler.weight.copy_(weight)
            self.pooler.bias.copy_(bias)
        self.pooler.requires_grad_(False)


class EncoderForSequenceClassification(EncoderModel):
    """dense → tanh (ReLU for DistilBERT) → out_proj on the first token; labels from `id2label`."""

    supported_tasks = ("classify", "score")
    head_names = {
        "bert": [("pooler.dense.", "classifier.dense."), ("classifier.", "classifier.out_proj.")],
        "roberta": [("classifier.", "classifier.")],
        "distilbert": [("pre_classifier.", "classifier.dense."), ("classifier.", "classifier.out_proj.")],
    }

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        super().__init__(config, max_positions)
        h = self.spec.hidden_size
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(h, h)
        self.classifier.out_proj = nn.Linear(h, config.num_labels)
        self.act = torch.relu if self.spec.family == "distilbert" else torch.tanh

    def compute_head(self, rows: torch.Tensor) -> torch.Tensor:
        """First-token hidden states [seqs, hidden] → logits [seqs, num_labels]."""
        return self.classifier.out_proj(self.act(self.classifier.dense(rows))).float()


class EncoderForTokenClassification(EncoderModel):
    """A linear classifier on every token (NER, POS tagging)."""

    supported_tasks = ("token_classify",)
    head_names = {f: [("classifier.", "classifier.")] for f in _PREFIX}

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        super().__init__(config, max_positions)
        self.classifier = nn.Linear(self.spec.hidden_size, config.num_labels)

    def compute_head(self, rows: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden] → logits [tokens, num_labels]."""
        return self.classifier(rows).float()


class EncoderForQuestionAnswering(EncoderModel):
    """Start and end logits per token for extractive QA."""

    supported_tasks = ("qa",)
    head_names = {f: [("qa_outputs.", "qa_outputs.")] for f in _PREFIX}

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        super().__init__(config, max_positions)
        if config.num_labels != 2:
            raise ValueError(f"a question-answering head needs num_labels=2 (start, end); got {config.num_labels}")
        self.qa_outputs = nn.Linear(self.spec.hidden_size, 2)

    def compute_head(self, rows: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden] → [tokens, 2] (start, end) logits."""
        return self.qa_outputs(rows).float()


class EncoderForMaskedLM(EncoderModel):
    """dense → act → LayerNorm → vocabulary projection (tied to the word embeddings) + bias."""

    supported_tasks = ("fill_mask", "embed")
    head_names = {
        "bert": [("cls.predictions.transform.dense.", "lm_head.dense."),
                 ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
                 ("cls.predictions.bias", "lm_head.bias"), ("cls.predictions.decoder.", "lm_head.decoder.")],
        "roberta": [("lm_head.", "lm_head.")],
        "distilbert": [("vocab_transform.", "lm_head.dense."), ("vocab_layer_norm.", "lm_head.layer_norm."),
                       ("vocab_projector.bias", "lm_head.bias"), ("vocab_projector.", "lm_head.decoder.")],
    }

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        super().__init__(config, max_positions)
        s = self.spec
        self.lm_head = nn.Module()
        self.lm_head.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.lm_head.layer_norm = nn.LayerNorm(s.hidden_size, eps=s.eps)
        self.lm_head.bias = nn.Parameter(torch.zeros(s.vocab_size))
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head.decoder = (TiedLMHead(self.model.embeddings.word_embeddings) if self.tied
                                else nn.Linear(s.hidden_size, s.vocab_size, bias=False))
        self.act = activation("gelu" if s.family == "roberta" else s.act)

    def compute_head(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden states of the masked positions [rows, hidden] → vocabulary logits [rows, vocab]."""
        h = self.lm_head.layer_norm(self.act(self.lm_head.dense(rows)))
        return (self.lm_head.decoder(h) + self.lm_head.bias).float()

    def head_name(self, name: str, names: set[str]) -> str | None:
        """Skip the decoder's tied copies: its weight (when tied) and its bias (an alias of `bias`)."""
        target = super().head_name(name, names)
        if target == "lm_head.decoder.weight" and self.tied:
            return None
        if target == "lm_head.decoder.bias":
            has_own_bias = any(n.endswith(("predictions.bias", "lm_head.bias")) for n in names)
            return None if has_own_bias else "lm_head.bias"
        return target

