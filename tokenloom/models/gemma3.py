"""Gemma 3 (text): interleaved sliding-window and global layers, each type with its own RoPE base;
(1 + weight) RMSNorms around both blocks; q/k norms; scaled embeddings; GELU-tanh MLP."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.fused_decode import DecodeParts, FusedDecodeLayer
from tokenloom.models.layers.linear import Linear, MergedLinear, TiedLMHead
from tokenloom.models.layers.norm import RMSNorm, add_rms_norm
from tokenloom.models.layers.rotary import RotaryEmbedding, rope_parameters
from tokenloom.models.llama import GatedMLP, head_dim_of, run_decoder_layers
from tokenloom.models.loading import load_named_weights


def _layer_type(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx]
    pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
    return "full_attention" if (layer_idx + 1) % pattern == 0 else "sliding_attention"


class Gemma3Attention(nn.Module):
    """Self-attention with q/k RMSNorm and a per-layer-type RoPE and window."""

    def __init__(self, config: Any, layer_idx: int, rotary: dict[str, RotaryEmbedding]) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedLinear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size,
                                                          "v_proj": kv_size}, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        layer_type = _layer_type(config, layer_idx)
        self.rotary = rotary[layer_type]
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   config.query_pre_attn_scalar ** -0.5, window)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden] → [tokens, hidden]."""
        q, k, v, cached = self.attn.project(self.qkv_proj(x), positions, meta, self.rotary, self.q_norm, self.k_norm)
        return self.o_proj(self.attn(q, k, v, meta, kv_cached=cached))


def _gemma_rope(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        return rope_parameters(config, layer_type)
    # Older configs: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq for local.
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return rope_parameters(config)


class Gemma3DecoderLayer(FusedDecodeLayer):
    """Attention and MLP blocks, each normalised before and after (sandwich norms)."""

    def __init__(self, config: Any, layer_idx: int, rotary: dict[str, RotaryEmbedding]) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx, rotary)
        self.mlp = GatedMLP(h, config.intermediate_size, act="gelu_tanh")
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer block: residual stream x and its normalised input h → the new residual stream
        and `next_norm` of it (the next block's input)."""
        x, h = add_rms_norm(x, self.self_attn(h, positions, meta), self.post_attention_layernorm,
                            self.pre_feedforward_layernorm)
        return add_rms_norm(x, self.mlp(h), self.post_feedforward_layernorm, next_norm)

    def decode_parts(self) -> DecodeParts:
        """This layer's modules in its forward's order (sandwich norms around both blocks)."""
        attn, mlp = self.self_attn, self.mlp
        return DecodeParts(self.input_layernorm, attn.qkv_proj, attn.q_norm, attn.k_norm, attn.rotary, attn.attn,
                           attn.o_proj, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                           mlp.gate_up_proj, mlp.act, mlp.down_proj, self.post_feedforward_layernorm)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden), as HF's Gemma3TextScaledWordEmbedding: its output is the
    model's input embeddings (where a soft prompt's vectors go, unscaled)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids → scaled embeddings."""
        x = super().forward(input_ids)
        # HF rounds the scale to the activation dtype before multiplying; so do we, for parity.
        return x * torch.tensor(self.embedding_dim ** 0.5, dtype=x.dtype)


class Gemma3ForCausalLM(nn.Module):
    """Gemma 3 text decoder with tied embeddings."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size)
        rotary = {kind: RotaryEmbedding(head_dim_of(config), max_positions, _gemma_rope(config, kind))
                  for kind in ("sliding_attention", "full_attention")}
        self.model.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, rotary)
                                          for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.lm_head = TiedLMHead(self.model.embed_tokens)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed batch → hidden states [tokens, hidden]."""
        return run_decoder_layers(self.model.layers, self.model.norm, self.model.embed_tokens(input_ids), positions,
                                  meta)

    def input_embeddings(self) -> nn.Module:
        """The module whose output is the layers' input (HF's `get_input_embeddings()`)."""
        return self.model.embed_tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampled positions → float32 logits."""
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (also the `language_model.` names of multimodal checkpoints)."""
        def rename(name: str) -> str | None:
            name = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
            if name == "lm_head.weight" or name.startswith(("vision_tower", "multi_modal_projector")):
                return None
            return name
        load_named_weights(self, weights, rename)
