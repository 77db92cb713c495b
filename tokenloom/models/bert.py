"""BERT, RoBERTa (and XLM-RoBERTa) and DistilBERT encoders: one post-LayerNorm transformer body.

The three families differ only in small ways, read from the config into an `EncoderSpec`: RoBERTa
offsets positions by `pad_token_id + 1` and has one token type, DistilBERT has no token types and
other parameter names (mapped onto BERT's at load, see `hf_body_name`). The task heads that sit on
this body live in models/encoder_heads.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models.layers.attention import GivenKVAttention
from tokenloom.models.layers.encoder_attention import EncoderMetadata, encoder_attention
from tokenloom.models.layers.linear import MergedLinear

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
ENCODER_TYPES = ("bert", "distilbert", *ROBERTA_TYPES)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function an HF config names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """The shape of an encoder, normalised over the families' config field names."""

    family: str  # "bert", "roberta" or "distilbert"
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    act: str
    eps: float
    type_vocab_size: int  # 0: no token type embeddings
    max_positions: int  # rows of the position table
    position_offset: int  # added to 0-based positions (RoBERTa: pad_token_id + 1)
    pad_token_id: int | None

    @classmethod
    def from_config(cls, config: Any) -> EncoderSpec:
        """Read the spec from an HF BERT / RoBERTa / XLM-RoBERTa / DistilBERT config."""
        kind = config.model_type
        if kind not in ENCODER_TYPES:
            raise ValueError(f"model_type {kind!r} is not an encoder we support ({', '.join(ENCODER_TYPES)})")
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        if kind == "distilbert":
            return cls("distilbert", config.vocab_size, config.dim, config.n_heads, config.n_layers,
                       config.hidden_dim, config.activation, 1e-12, 0, config.max_position_embeddings, 0,
                       config.pad_token_id)
        family = "roberta" if kind in ROBERTA_TYPES else "bert"
        offset = config.pad_token_id + 1 if family == "roberta" else 0
        return cls(family, config.vocab_size, config.hidden_size, config.num_attention_heads,
                   config.num_hidden_layers, config.intermediate_size, config.hidden_act, config.layer_norm_eps,
                   config.type_vocab_size, config.max_position_embeddings, offset, config.pad_token_id)

    @property
    def max_input_len(self) -> int:
        """The longest sequence the position table can hold."""
        return self.max_positions - self.position_offset


class EncoderEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings, then LayerNorm."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.position_embeddings = nn.Embedding(spec.max_positions, spec.hidden_size)
        if spec.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, spec.hidden_size)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.eps)
        self.position_offset = spec.position_offset
        self.has_token_types = bool(spec.type_vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """[tokens] ids and 0-based positions → [tokens, hidden]."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if self.has_token_types:
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class EncoderSelfAttention(GivenKVAttention):
    """Fused q|k|v projection (checkpoint names query/key/value) and bidirectional attention; a prefix
    adapter's virtual rows take its keys and values (`meta.virtual_kv`)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.head_dim = spec.num_heads, h // spec.num_heads
        self.num_kv_heads = self.num_heads
        self.qkv = MergedLinear(h, {"query": h, "key": h, "value": h}, bias=True)

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """x [tokens, hidden] → attention output [tokens, hidden] (before the output projection)."""
        qkv = self.qkv(x)
        if meta.virtual_kv is not None:
            q, k, v = qkv.view(qkv.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
            k, v = meta.virtual_kv.apply(self.layer_index, k, v, qkv.dtype)
            qkv = torch.stack((q, k, v), 1).view_as(qkv)
        return encoder_attention(qkv, meta, self.num_heads, self.head_dim ** -0.5)


class DenseNorm(nn.Module):
    """`LayerNorm(dense(x) + residual)`: the output step of both sublayers."""

    def __init__(self, in_features: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Project, add the residual, normalise."""
        return self.LayerNorm(self.dense(x) + residual)


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer, named as in BERT checkpoints."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = EncoderSelfAttention(spec)
        self.attention.output = DenseNorm(spec.hidden_size, spec.hidden_size, spec.eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.output = DenseNorm(spec.intermediate_size, spec.hidden_size, spec.eps)
        self.act = activation(spec.act)

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """One layer: attention block, then feed-forward block, each with residual and LayerNorm."""
        x = self.attention.output(self.attention.self(x, meta), x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class EncoderBody(nn.Module):
    """Embeddings and layers: packed token ids → last hidden states."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.embeddings = EncoderEmbeddings(spec)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.num_layers))
        for i, layer in enumerate(self.encoder.layer):
            layer.attention.self.layer_index = i  # which layer's keys a prefix adapter gives

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: EncoderMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[tokens] → [tokens, hidden]."""
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x


_QKV = {"q": "query", "k": "key", "v": "value"}
# DistilBERT parameter names → the BERT layout of EncoderBody (after the `distilbert.` prefix is removed).
_DISTILBERT_NAMES = [
    (re.compile(r"^transformer\.layer\.(\d+)\.attention\.(q|k|v)_lin\."),
     lambda m: f"encoder.layer.{m[1]}.attention.self.{_QKV[m[2]]}."),
    (re.compile(r"^transformer\.layer\.(\d+)\.attention\.out_lin\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^transformer\.layer\.(\d+)\.sa_layer_norm\."), r"encoder.layer.\1.attention.output.LayerNorm."),
    (re.compile(r"^transformer\.layer\.(\d+)\.ffn\.lin1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^transformer\.layer\.(\d+)\.ffn\.lin2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^transformer\.layer\.(\d+)\.output_layer_norm\."), r"encoder.layer.\1.output.LayerNorm."),
]
_LEGACY_NORM = re.compile(r"(LayerNorm|layer_norm)\.(gamma|beta)$")


def modern_norm_name(name: str) -> str:
    """Older BERT files call LayerNorm parameters gamma and beta."""
    return _LEGACY_NORM.sub(lambda m: f"{m[1]}.{'weight' if m[2] == 'gamma' else 'bias'}", name)


def hf_body_name(name: str, family: str) -> str:
    """A body parameter's checkpoint name (prefix already removed) → its EncoderBody name."""
    if family == "distilbert":
        for pattern, repl in _DISTILBERT_NAMES:
            name, n = pattern.subn(repl, name)
            if n:
                break
    return name
