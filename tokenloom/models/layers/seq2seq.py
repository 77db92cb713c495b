"""Attention pieces shared by the encoder–decoder models (T5, BART).

The encoder runs on packed sequences with no KV cache: each sequence attends to all of itself (with an
optional additive bias, T5's relative positions). The decoder's cross-attention reads each request's
encoder keys and values, computed once when the request was first scheduled and kept by the engine's
`EncoderCache`: one tensor per request of shape [decoder_layers, 2, heads, encoder_len, head_dim].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class CrossAttentionMetadata:
    """A decoder step's requests in packed order: how many rows each has and its encoder keys/values."""

    num_rows: list[int]
    states: list[torch.Tensor]  # per request: [layers, 2, heads, encoder_len, head_dim]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function an HF config names (`dense_act_fn`, `activation_function`)."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(sorted(table))}")
    return table[name]


def encoder_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float,
                           bias: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """q, k, v [tokens, heads, dim] of sequences packed end to end → [tokens, heads * dim]; every token sees
    its whole sequence. `bias(length)` gives an additive [heads, length, length] bias."""
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        end = start + n
        mask = bias(n) if bias is not None else None
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            attn_mask=mask, scale=scale).transpose(0, 1)
        start = end
    return out.view(q.shape[0], -1)


def cross_attention(q: torch.Tensor, cross: CrossAttentionMetadata, layer: int, scale: float) -> torch.Tensor:
    """Decoder queries q [tokens, heads, dim] → [tokens, heads * dim], each request's rows attending to all
    of its encoder output (decoder layer `layer`'s keys and values)."""
    out = torch.empty_like(q)
    start = 0
    for n, state in zip(cross.num_rows, cross.states, strict=True):
        end = start + n
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), state[layer, 0], state[layer, 1], scale=scale).transpose(0, 1)
        start = end
    return out.view(q.shape[0], -1)


def stack_cross_key_values(kv_per_layer: list[torch.Tensor], num_heads: int, head_dim: int,
                           seq_lens: list[int]) -> list[torch.Tensor]:
    """Each decoder layer's k|v projection of the packed encoder output [tokens, 2 * heads * dim] → one
    contiguous [layers, 2, heads, len, dim] tensor per sequence (its own storage, freed with it)."""
    stacked = torch.stack([kv.view(-1, 2, num_heads, head_dim) for kv in kv_per_layer])  # [L, T, 2, H, D]
    return [s.permute(0, 2, 3, 1, 4).contiguous() for s in stacked.split(seq_lens, dim=1)]
