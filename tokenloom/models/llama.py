"""Llama 2/3, Mistral, Qwen2 and Qwen3: one decoder that differs by config flags.

Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k RMSNorm, Mistral may use a sliding window, Llama 3
scales its RoPE frequencies. Parameter names follow the HF checkpoints, except that q|k|v and
gate|up are fused into one matrix each (filled shard by shard at load).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.fused_decode import DecodeParts, FusedDecodeLayer, run_fused_decode
from tokenloom.models.layers.linear import Linear, LMHead, MergedLinear, TiedLMHead
from tokenloom.models.layers.norm import RMSNorm, add_rms_norm
from tokenloom.models.layers.rotary import RotaryEmbedding, rope_parameters
from tokenloom.models.loading import load_named_weights


def head_dim_of(config: Any) -> int:
    """The attention head width (explicit in newer configs)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def run_decoder_layers(layers: nn.ModuleList, final_norm: RMSNorm, x: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
    """Pre-norm layers that hand each other (residual, normalised input), so that every residual add
    fuses with the next norm: the last layer's output comes back through `final_norm`. A decode step whose
    layers qualify runs each layer in one native call (`fused_decode`), with the same result."""
    fused = run_fused_decode(layers, final_norm, x, positions, meta)
    if fused is not None:
        return fused
    h = layers[0].input_layernorm(x)
    for i, layer in enumerate(layers):
        next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm
        x, h = layer(x, h, positions, meta, next_norm)
    return h


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's sliding window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    """Self-attention with fused qkv projection, RoPE and optional per-head q/k norms."""

    def __init__(self, config: Any, layer_idx: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = MergedLinear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size,
                                                          "v_proj": kv_size}, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                                   sliding_window_of(config, layer_idx))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden] → [tokens, hidden]."""
        q_norm, k_norm = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        q, k, v, cached = self.attn.project(self.qkv_proj(x), positions, meta, self.rotary, q_norm, k_norm)
        return self.o_proj(self.attn(q, k, v, meta, kv_cached=cached))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate|up fused."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, {"gate_proj": intermediate, "up_proj": intermediate}, bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] → [tokens, hidden]."""
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * up)


class LlamaDecoderLayer(FusedDecodeLayer):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, config: Any, layer_idx: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary, qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size,
                            bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer block: residual stream x and its normalised input h → the new residual stream
        and `next_norm` of it (the next block's input)."""
        x, h = add_rms_norm(x, self.self_attn(h, positions, meta), None, self.post_attention_layernorm)
        return add_rms_norm(x, self.mlp(h), None, next_norm)

    def decode_parts(self) -> DecodeParts:
        """This layer's modules in its forward's order (no sandwich norms)."""
        attn, mlp = self.self_attn, self.mlp
        q_norm, k_norm = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)
        return DecodeParts(self.input_layernorm, attn.qkv_proj, q_norm, k_norm, attn.rotary, attn.attn, attn.o_proj,
                           None, self.post_attention_layernorm, mlp.gate_up_proj, mlp.act, mlp.down_proj, None)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        qk_norm = config.model_type == "qwen3"
        rotary = RotaryEmbedding(head_dim_of(config), max_positions, rope_parameters(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, rotary, qk_norm)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed token ids → final hidden states."""
        return run_decoder_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta)


class LlamaForCausalLM(nn.Module):
    """A decoder-only language model of the Llama family."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (TiedLMHead(self.model.embed_tokens) if self.tie_word_embeddings
                        else LMHead(config.hidden_size, config.vocab_size))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed batch → hidden states [tokens, hidden]."""
        return self.model(input_ids, positions, meta)

    def input_embeddings(self) -> nn.Module:
        """The module whose output is the layers' input (HF's `get_input_embeddings()`)."""
        return self.model.embed_tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampled positions → float32 logits."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (rotary caches and a tied head's copy are skipped)."""
        def rename(name: str) -> str | None:
            if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                return None
            return name
        load_named_weights(self, weights, rename)
