"""GPT-2: learned positions, LayerNorm, GELU-tanh MLP, fused qkv stored in Conv1D ([in, out]) layout."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.linear import TiedLMHead
from tokenloom.models.loading import load_named_weights

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    """Multi-head self-attention; no rotary embeddings."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, h // config.num_attention_heads
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden] → [tokens, hidden]."""
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2Block(nn.Module):
    """Pre-LayerNorm attention and MLP blocks."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        inner = config.n_inner or 4 * h
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(h, inner)
        self.mlp.c_proj = nn.Linear(inner, h)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One transformer block."""
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model with the head tied to the token embeddings."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.transformer.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_hidden_layers))
        self.transformer.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = TiedLMHead(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed batch → hidden states [tokens, hidden]."""
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block in t.h:
            x = block(x, meta)
        return t.ln_f(x)

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter as HF's checkpoint stores it (Conv1D weights transposed back)."""
        return tensor.t() if name.endswith(_CONV1D) else tensor

    def input_embeddings(self) -> nn.Module:
        """The token embeddings (HF's `get_input_embeddings()`); position embeddings are added after."""
        return self.transformer.wte

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampled positions → float32 logits."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF GPT-2 tensors (with or without the `transformer.` prefix), transposing Conv1D."""
        def rename(name: str) -> str | None:
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                return None
            return name if name.startswith("transformer.") else f"transformer.{name}"

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.t() if name.endswith(_CONV1D) else tensor
        load_named_weights(self, weights, rename, transform)
