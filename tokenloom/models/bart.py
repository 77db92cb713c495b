"""BART: an encoder–decoder with learned positions (offset by 2), post-LayerNorm blocks and biases.

Token embeddings (shared by both stacks and the head) are scaled by sqrt(d_model) when
`scale_embedding`; positions index a learned table at `position + 2`; a LayerNorm follows the embedding
sum (`layernorm_embedding`). Each block adds then normalises (post-LN). The logits get
`final_logits_bias`. Module names follow the HF checkpoints; q|k|v (and the cross-attention's k|v) are fused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.linear import MergedLinear, TiedLMHead
from tokenloom.models.layers.seq2seq import (
    activation,
    cross_attention,
    encoder_self_attention,
    stack_cross_key_values,
)
from tokenloom.models.loading import load_named_weights

POSITION_OFFSET = 2  # BART's learned position table starts two rows in


class BartSelfAttention(nn.Module):
    """Self-attention: whole sequences in the encoder, the paged cache (causal) in the decoder."""

    def __init__(self, d_model: int, num_heads: int, is_decoder: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = MergedLinear(d_model, {"q_proj": d_model, "k_proj": d_model, "v_proj": d_model}, bias=True)
        self.out_proj = nn.Linear(d_model, d_model)
        if is_decoder:
            self.attn = PagedAttention(num_heads, num_heads, self.head_dim, self.scale)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.reshape(-1, self.num_heads, self.head_dim) for t in self.qkv_proj.split(self.qkv_proj(x)))

    def encode(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Encoder self-attention over packed sequences."""
        q, k, v = self._split(x)
        return self.out_proj(encoder_self_attention(q, k, v, seq_lens, self.scale))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decoder self-attention over the paged KV cache."""
        q, k, v = self._split(x)
        return self.out_proj(self.attn(q, k, v, meta))


class BartCrossAttention(nn.Module):
    """Decoder queries against the request's cached encoder keys and values."""

    def __init__(self, d_model: int, num_heads: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layer_idx = num_heads, d_model // num_heads, layer_idx
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = MergedLinear(d_model, {"k_proj": d_model, "v_proj": d_model}, bias=True)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, d_model] → [tokens, d_model]."""
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        return self.out_proj(cross_attention(q, meta.cross, self.layer_idx, self.head_dim ** -0.5))


class BartLayer(nn.Module):
    """Self-attention, cross-attention (decoder only) and the feed-forward, each added then normalised."""

    def __init__(self, config: Any, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        d = config.d_model
        heads = config.decoder_attention_heads if is_decoder else config.encoder_attention_heads
        ffn = config.decoder_ffn_dim if is_decoder else config.encoder_ffn_dim
        self.self_attn = BartSelfAttention(d, heads, is_decoder)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        if is_decoder:
            self.encoder_attn = BartCrossAttention(d, heads, layer_idx)
            self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(config.activation_function)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))

    def encode(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """One encoder layer over packed sequences."""
        x = self.self_attn_layer_norm(x + self.self_attn.encode(x, seq_lens))
        return self._feed_forward(x)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One decoder layer over the paged batch."""
        x = self.self_attn_layer_norm(x + self.self_attn(x, meta))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, meta))
        return self._feed_forward(x)


class BartStack(nn.Module):
    """Encoder or decoder: learned positions, the embedding LayerNorm and the layers."""

    def __init__(self, config: Any, shared: nn.Embedding, is_decoder: bool) -> None:
        super().__init__()
        self.embed_tokens = shared  # the model's `shared`, registered here too as in HF
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        num_layers = config.decoder_layers if is_decoder else config.encoder_layers
        self.layers = nn.ModuleList(BartLayer(config, i, is_decoder) for i in range(num_layers))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings plus positions, normalised."""
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions + POSITION_OFFSET)
        return self.layernorm_embedding(x)


class BartModel(nn.Module):
    """The shared embedding and the two stacks."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = BartStack(config, self.shared, is_decoder=False)
        self.decoder = BartStack(config, self.shared, is_decoder=True)


class BartForConditionalGeneration(nn.Module):
    """BART with its LM head; the engine runs `encode` once per request, then the decoder step by step."""

    is_encoder_decoder = True

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        start = getattr(config, "decoder_start_token_id", None)
        self.decoder_start_token_id = int(start if start is not None else config.eos_token_id)
        self.model = BartModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = (TiedLMHead(self.model.shared) if self.tie_word_embeddings
                        else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))

    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Packed encoder inputs (positions from 0 per sequence) → encoder hidden states [tokens, d_model]."""
        encoder = self.model.encoder
        x = encoder.embed(input_ids, positions)
        for layer in encoder.layers:
            x = layer.encode(x, seq_lens)
        return x

    def cross_key_values(self, encoder_hidden: torch.Tensor, seq_lens: list[int]) -> list[torch.Tensor]:
        """Every decoder layer's cross-attention keys and values, one [layers, 2, heads, len, dim] per sequence."""
        layers = self.model.decoder.layers
        kvs = [layer.encoder_attn.kv_proj(encoder_hidden) for layer in layers]
        attn = layers[0].encoder_attn
        return stack_cross_key_values(kvs, attn.num_heads, attn.head_dim, seq_lens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed decoder batch (with `meta.cross`) → decoder hidden states [tokens, d_model]."""
        decoder = self.model.decoder
        x = decoder.embed(input_ids, positions)
        for layer in decoder.layers:
            x = layer(x, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampled positions → float32 logits."""
        return (self.lm_head(hidden) + self.final_logits_bias).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF BART tensors (with or without the `model.` prefix); a missing final_logits_bias stays zero."""
        self.final_logits_bias.zero_()
        seen_embedding = False

        def without_logits_bias(items: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                if name == "final_logits_bias":  # a buffer, not a parameter
                    self.final_logits_bias.copy_(tensor)
                else:
                    yield name, tensor

        def rename(name: str) -> str | None:
            nonlocal seen_embedding
            if name == "lm_head.weight":
                return None if self.tie_word_embeddings else name
            name = name if name.startswith("model.") else f"model.{name}"
            if name.endswith(("shared.weight", "embed_tokens.weight")):
                if seen_embedding:
                    return None
                seen_embedding = True
                return "model.shared.weight"
            return name
        with torch.no_grad():
            load_named_weights(self, without_logits_bias(weights), rename)
