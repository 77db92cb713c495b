"""T5 (original, v1.1, flan-t5): an encoder–decoder with relative position biases and RMS-style norms.

Attention is unscaled; the first block of each stack owns a bucketed relative position bias shared by
all its blocks (bidirectional in the encoder, unidirectional in the decoder, where it is computed from
the absolute positions of the paged batch). The feed-forward is `wo(act(wi(x)))`, or gated
`wo(act(wi_0(x)) * wi_1(x))` in v1.1/flan (`feed_forward_proj = "gated-gelu"`). With a tied head the
decoder output is rescaled by d_model**-0.5 first. Module names follow the HF checkpoints; q|k|v (and
the cross-attention's k|v) are fused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.linear import MergedLinear, TiedLMHead
from tokenloom.models.layers.norm import RMSNorm
from tokenloom.models.layers.seq2seq import (
    activation,
    cross_attention,
    encoder_self_attention,
    stack_cross_key_values,
)
from tokenloom.models.loading import load_named_weights


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each (key position - query position): exact below half the buckets, log-spaced up to
    `max_distance`; the bidirectional form spends half the buckets on keys after the query."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -relative.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


@dataclass(slots=True)
class DecoderBias:
    """The decoder self-attention's additive bias for one step, causal mask folded in as -inf."""

    prefills: list[torch.Tensor]  # per prefill span: [heads, length, context_len + length]
    decode: torch.Tensor | None  # [decode rows, heads, 1, max_len]


class T5Attention(nn.Module):
    """Self-attention: over whole sequences in the encoder, over the paged cache in the decoder."""

    def __init__(self, config: Any, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = self.num_heads * self.head_dim
        self.qkv = MergedLinear(config.d_model, {"q": inner, "k": inner, "v": inner})
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, self.num_heads)
        if is_decoder:
            self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, 1.0)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.reshape(-1, self.num_heads, self.head_dim) for t in self.qkv.split(self.qkv(x)))

    def encode(self, x: torch.Tensor, seq_lens: list[int], bias: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Encoder self-attention over packed sequences; `bias(length)` → [heads, length, length]."""
        q, k, v = self._split(x)
        return self.o(encoder_self_attention(q, k, v, seq_lens, 1.0, bias))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, bias: DecoderBias) -> torch.Tensor:
        """Decoder self-attention: write this step's keys and values into the paged cache, attend with bias."""
        q, k, v = self._split(x)
        k_cache, v_cache = (c.view(-1, self.num_heads, self.head_dim) for c in self.attn.kv_cache)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for span, mask in zip(meta.prefills, bias.prefills, strict=True):
            s, e = span.start, span.start + span.length
            if span.context_len:
                k_span, v_span = k_cache[span.kv_slots], v_cache[span.kv_slots]
            else:
                k_span, v_span = k[s:e], v[s:e]
            out[s:e] = _attend(q[s:e].transpose(0, 1), k_span.transpose(0, 1), v_span.transpose(0, 1),
                               mask).transpose(0, 1)
        if bias.decode is not None:
            # The CPU paged-decode kernel takes no bias: gather each row's keys through its slot table.
            n, slots = meta.num_prefill_tokens, meta.decode_slots
            out[n:] = _attend(q[n:].unsqueeze(2), k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2),
                              bias.decode).squeeze(2)
        return self.o(out.view(q.shape[0], -1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Unscaled attention with an additive bias (T5 folds the scale into its initialisation)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


class T5CrossAttention(nn.Module):
    """Decoder queries against the request's cached encoder keys and values (no bias, no scaling)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layer_idx = config.num_heads, config.d_kv, layer_idx
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.kv = MergedLinear(config.d_model, {"k": inner, "v": inner})
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, d_model] → [tokens, d_model]."""
        q = self.q(x).view(-1, self.num_heads, self.head_dim)
        return self.o(cross_attention(q, meta.cross, self.layer_idx, 1.0))


class T5DenseActDense(nn.Module):
    """The feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gated = bool(config.is_gated_act)
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, d_model] → [tokens, d_model]."""
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _Sublayer(nn.Module):
    """A pre-norm residual sub-block, named as in HF (`layer.i.layer_norm` and the block's own name)."""

    def __init__(self, config: Any, name: str, block: nn.Module) -> None:
        super().__init__()
        self.name = name
        setattr(self, name, block)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def block(self) -> nn.Module:
        """The wrapped attention or feed-forward module."""
        return getattr(self, self.name)


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only) and feed-forward, each pre-norm with a residual."""

    def __init__(self, config: Any, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        layers = [_Sublayer(config, "SelfAttention", T5Attention(config, is_decoder, layer_idx == 0))]
        if is_decoder:
            layers.append(_Sublayer(config, "EncDecAttention", T5CrossAttention(config, layer_idx)))
        layers.append(_Sublayer(config, "DenseReluDense", T5DenseActDense(config)))
        self.layer = nn.ModuleList(layers)

    def encode(self, x: torch.Tensor, seq_lens: list[int], bias: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """One encoder block over packed sequences."""
        attn, ff = self.layer
        x = x + attn.block.encode(attn.layer_norm(x), seq_lens, bias)
        return x + ff.block(ff.layer_norm(x))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, bias: DecoderBias) -> torch.Tensor:
        """One decoder block over the paged batch."""
        attn, cross, ff = self.layer
        x = x + attn.block(attn.layer_norm(x), meta, bias)
        x = x + cross.block(cross.layer_norm(x), meta)
        return x + ff.block(ff.layer_norm(x))


class T5Stack(nn.Module):
    """The encoder or decoder: blocks and a final norm (token embeddings are the model's `shared`)."""

    def __init__(self, config: Any, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, i, is_decoder) for i in range(num_layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def position_bias(self, relative: torch.Tensor) -> torch.Tensor:
        """[..., q, k] relative positions → [..., heads, q, k] bias."""
        buckets = relative_position_bucket(relative, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets).movedim(-1, -3)

    def encode(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Embedded packed sequences → final encoder hidden states."""
        biases: dict[int, torch.Tensor] = {}

        def bias(n: int) -> torch.Tensor:
            if n not in biases:
                pos = torch.arange(n, device=x.device)
                biases[n] = self.position_bias(pos[None, :] - pos[:, None])
            return biases[n]
        for block in self.block:
            x = block.encode(x, seq_lens, bias)
        return self.final_layer_norm(x)

    def decoder_bias(self, meta: AttentionMetadata, device: torch.device) -> DecoderBias:
        """The step's decoder self-attention bias, from each row's absolute position."""
        prefills = []
        for span in meta.prefills:
            q_pos = torch.arange(span.context_len, span.context_len + span.length, device=device)[:, None]
            k_pos = torch.arange(span.context_len + span.length, device=device)[None, :]
            prefills.append(self.position_bias(k_pos - q_pos).masked_fill(k_pos > q_pos, float("-inf")))
        decode = None
        if meta.decode_block_table is not None:
            q_pos = meta.decode_lens[:, None] - 1
            k_pos = torch.arange(meta.decode_slots.shape[1], device=device)[None, :]
            bias = self.position_bias((k_pos - q_pos)[:, None, :])  # [rows, heads, 1, max_len]
            decode = bias.masked_fill((k_pos > q_pos)[:, None, None, :], float("-inf"))
        return DecoderBias(prefills, decode)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Embedded decoder tokens of the packed batch → final decoder hidden states."""
        bias = self.decoder_bias(meta, x.device)
        for block in self.block:
            x = block(x, meta, bias)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nn.Module):
    """T5 with its LM head; the engine runs `encode` once per request, then the decoder step by step."""

    is_encoder_decoder = True

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.decoder_start_token_id = _decoder_start(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        # Until the checkpoint brings its own lm_head.weight (v1.1, flan-t5), the head is the embedding.
        self.lm_head: nn.Module = TiedLMHead(self.shared)
        scale = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        self.output_scale = config.d_model ** -0.5 if scale else 1.0

    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Packed encoder inputs → encoder hidden states [tokens, d_model] (positions are relative)."""
        return self.encoder.encode(self.shared(input_ids), seq_lens)

    def cross_key_values(self, encoder_hidden: torch.Tensor, seq_lens: list[int]) -> list[torch.Tensor]:
        """Every decoder layer's cross-attention keys and values, one [layers, 2, heads, len, dim] per sequence."""
        kvs = [block.layer[1].EncDecAttention.kv(encoder_hidden) for block in self.decoder.block]
        return stack_cross_key_values(kvs, self.config.num_heads, self.config.d_kv, seq_lens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed decoder batch (with `meta.cross`) → decoder hidden states [tokens, d_model]."""
        return self.decoder(self.shared(input_ids), meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the sampled positions → float32 logits."""
        if self.output_scale != 1.0:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF T5 tensors: the embedding aliases fill `shared` once; a checkpoint's own lm_head.weight
        (v1.1, flan-t5), when it differs from the embedding, unties the head."""
        head: list[torch.Tensor] = []
        seen_embedding = False

        def without_head(items: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                if name == "lm_head.weight":
                    head.append(tensor.to(self.shared.weight.dtype, copy=True))
                else:
                    yield name, tensor

        def rename(name: str) -> str | None:
            nonlocal seen_embedding
            if name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                if seen_embedding:
                    return None
                seen_embedding = True
                return "shared.weight"
            if name.endswith("EncDecAttention.relative_attention_bias.weight"):
                return None  # present in old checkpoints, never used
            return name
        load_named_weights(self, without_head(weights), rename)
        if head and not torch.equal(head[0], self.shared.weight):
            self._untie_head(head[0])

    def _untie_head(self, weight: torch.Tensor) -> None:
        emb = self.shared.weight
        linear = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.to(emb.device), requires_grad=False)
        self.lm_head = linear


def _decoder_start(config: Any) -> int:
    start = getattr(config, "decoder_start_token_id", None)
    return int(start if start is not None else config.pad_token_id)
