"""Attention over the paged KV cache.

The runner packs a step's tokens as [prefill chunks..., decode tokens...] and describes them with one
`AttentionMetadata`, shared by every layer. Each layer writes its new keys and values into its cache
at `slot_mapping`, then:
- a prefill chunk with no earlier context attends to its own fresh keys (causal);
- a chunk that continues earlier context (chunked prefill, prefix-cache hit, recompute) gathers its
  keys from the cache through its slot list;
- all decode tokens run as one call: on CPU a native kernel that reads each sequence's keys and
  values in place through its block table; elsewhere batched matmuls over keys gathered through a
  padded slot table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models import ops
from tokenloom.models.layers.linear import onednn_gemm, shape_bucket
from tokenloom.models.layers.norm import RMSNorm
from tokenloom.models.layers.rotary import RotaryEmbedding
from tokenloom.models.layers.seq2seq import CrossAttentionMetadata


@dataclass(slots=True)
class PrefillSpan:
    """One request's chunk of more than one token (or its first token) in the packed batch."""

    start: int
    length: int
    context_len: int
    kv_slots: torch.Tensor | None = None  # [context_len + length] cache slots, when context_len > 0


@dataclass(slots=True)
class VirtualKV:
    """Keys and values given rather than computed (a prefix adapter's virtual tokens): packed `rows` [R]
    take `keys[layer]` / `values[layer]` [R, kv_heads, dim] in attention layer `layer`."""

    rows: torch.Tensor
    keys: torch.Tensor  # [layers, R, kv_heads, dim]
    values: torch.Tensor

    def apply(self, layer: int, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v with the given rows swapped in (rounded through the cache's `dtype`, as it stores them)."""
        keys, values = self.keys[layer].to(dtype).to(k.dtype), self.values[layer].to(dtype).to(v.dtype)
        return k.index_put((self.rows,), keys), v.index_put((self.rows,), values)


@dataclass(slots=True)
class AttentionMetadata:
    """How this step's packed tokens map onto requests and cache slots."""

    slot_mapping: torch.Tensor
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    decode_block_table: torch.Tensor | None = None  # [num_decodes, max_blocks] int64, padded with block 0
    decode_lens: torch.Tensor | None = None  # [num_decodes] keys per decode row, the new one included
    block_size: int = 16
    cross: CrossAttentionMetadata | None = None  # encoder–decoder models: each request's encoder keys/values
    virtual_kv: VirtualKV | None = None  # prefix adapters' keys and values for their virtual tokens
    _decode_slots: torch.Tensor | None = None
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _prefill_masks: dict[tuple[int, int, int | None], torch.Tensor] = field(default_factory=dict)

    def prefill_mask(self, span: PrefillSpan, window: int | None, device: torch.device) -> torch.Tensor:
        """`chunk_mask` of a span, built once per step and window (every layer of the step shares it)."""
        key = (span.length, span.context_len, window)
        mask = self._prefill_masks.get(key)
        if mask is None:
            mask = self._prefill_masks[key] = chunk_mask(span.length, span.context_len, window, device)
        return mask

    @property
    def decode_slots(self) -> torch.Tensor:
        """[num_decodes, max_blocks * block_size] cache slot of every key position (torch-ops path)."""
        if self._decode_slots is None:
            bs, table = self.block_size, self.decode_block_table
            pos = torch.arange(table.shape[1] * bs, device=table.device)
            self._decode_slots = table[:, pos // bs] * bs + pos % bs
        return self._decode_slots

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, max_len] bool: which gathered keys each decode query may see (broadcasts
        over kv heads and the query heads of each group)."""
        mask = self._decode_masks.get(window)
        if mask is None:
            lens = self.decode_lens.unsqueeze(1)
            idx = torch.arange(self.decode_slots.shape[1], device=lens.device).unsqueeze(0)
            mask = idx < lens
            if window is not None:
                mask &= idx >= lens - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


# Prefill chunks whose float32 scores (heads x chunk x keys) fit this many values take the GEMM path on CPU.
MATMUL_PREFILL_MAX_SCORES = 16 * 2**20


def chunk_mask(length: int, context_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, context_len + length] bool: causal (and sliding-window) visibility for a chunk."""
    q_pos = torch.arange(context_len, context_len + length, device=device).unsqueeze(1)
    k_pos = torch.arange(context_len + length, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class GivenKVAttention(nn.Module):
    """An attention module whose keys and values a prefix adapter can give for its virtual rows (`VirtualKV`):
    it has `num_kv_heads`, `head_dim` and `layer_index` (which layer's given keys are its own)."""

    num_kv_heads: int
    head_dim: int
    layer_index: int = 0


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """The model's paged attention modules, in order."""
    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def prefix_layers(model: nn.Module) -> list[GivenKVAttention]:
    """The attention modules a prefix adapter gives keys and values to (a decoder's paged layers, an encoder's
    self-attention), in order."""
    return [m for m in model.modules() if isinstance(m, GivenKVAttention)]


def index_attention_layers(model: nn.Module) -> list[PagedAttention]:
    """`attention_layers`, with every `prefix_layers` module told its index (given keys and values are per
    layer)."""
    for i, layer in enumerate(prefix_layers(model)):
        layer.layer_index = i
    return attention_layers(model)


class PagedAttention(GivenKVAttention):
    """Scaled dot-product attention whose keys and values live in a paged cache.

    The runner binds `kv_cache` = (keys, values), each [num_blocks, block_size, kv_heads, head_dim].
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.layer_index = 0  # set by index_attention_layers: which layer's given keys (VirtualKV) are ours

    def project(self, qkv: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rotary: RotaryEmbedding,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """A fused q|k|v projection's output [tokens, (heads + 2 kv_heads) * dim] → q, k, v per head, with
        the optional q/k norms and RoPE applied; on CPU one kernel call that also writes k and v into the
        cache (the returned flag says so; pass it to `forward` as `kv_cached`)."""
        norms_fusable = q_norm is None or (
            k_norm is not None and (q_norm.eps, q_norm.offset) == (k_norm.eps, k_norm.offset))
        if norms_fusable and rotary.rotary_dim == self.head_dim and qkv.device.type == "cpu" and self.kv_cache:
            cos, sin = rotary.tables(qkv.device, qkv.dtype)
            eps, offset = (q_norm.eps, q_norm.offset) if q_norm is not None else (0.0, 0.0)
            out = ops.qkv_rope_cache(
                qkv, positions, cos, sin, None if q_norm is None else q_norm.weight,
                None if k_norm is None else k_norm.weight, eps, offset, self.kv_cache[0], self.kv_cache[1],
                meta.slot_mapping, self.num_heads, self.num_kv_heads)
            if out is not None:
                q, k, v = out.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
                return q, k, v, True
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rotary(positions, q, k)
        return q, k, v, False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_cached: bool = False) -> torch.Tensor:
        """q [tokens, heads, dim], k/v [tokens, kv_heads, dim] → [tokens, heads * dim]; k and v are written
        into the cache at the step's slots unless `kv_cached` says they already are. Without a bound cache
        (training: whole sequences, autograd through the torch paths) every span attends to its own keys."""
        if meta.virtual_kv is not None:
            k, v = self._given_kv(k, v, meta, kv_cached)
        if self.kv_cache is None:
            parts = [self._prefill(q[s.start:s.start + s.length], k[s.start:s.start + s.length],
                                   v[s.start:s.start + s.length], s, meta, k, v) for s in meta.prefills]
            return torch.cat(parts).view(q.shape[0], -1)
        if kv_cached and not meta.prefills:  # a decode-only step whose keys the kernels wrote: one call
            out = ops.paged_decode_attention(q, self.kv_cache[0], self.kv_cache[1], meta.decode_block_table,
                                             meta.decode_lens, self.scale, self.sliding_window)
            if out is not None:
                return out.view(q.shape[0], -1)
        k_flat = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        if not kv_cached:
            if k_flat.dtype != k.dtype:  # a narrower cache: the chunk's own keys are used as the cache holds them
                k, v = k.to(k_flat.dtype), v.to(v_flat.dtype)
                k_flat.index_copy_(0, meta.slot_mapping, k)
                v_flat.index_copy_(0, meta.slot_mapping, v)
                k, v = k.to(q.dtype), v.to(q.dtype)
            else:
                k_flat.index_copy_(0, meta.slot_mapping, k)
                v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for span in meta.prefills:
            end = span.start + span.length
            out[span.start:end] = self._prefill(q[span.start:end], k[span.start:end], v[span.start:end],
                                                span, meta, k_flat, v_flat)
        if meta.decode_block_table is not None:
            q_decode = q[meta.num_prefill_tokens:]
            decoded = ops.paged_decode_attention(q_decode, self.kv_cache[0], self.kv_cache[1],
                                                 meta.decode_block_table, meta.decode_lens, self.scale,
                                                 self.sliding_window)
            out[meta.num_prefill_tokens:] = decoded if decoded is not None else self._decode(q_decode, meta, k_flat,
                                                                                          v_flat)
        return out.view(q.shape[0], -1)

    def _given_kv(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv_cached: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v with the virtual rows' given keys and values; where the projection already wrote the cache,
        those rows are written again."""
        given = meta.virtual_kv
        k, v = given.apply(self.layer_index, k, v, self.kv_cache[0].dtype if self.kv_cache else k.dtype)
        if kv_cached:
            slots = meta.slot_mapping[given.rows]
            self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                0, slots, k[given.rows].to(self.kv_cache[0].dtype))
            self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                0, slots, v[given.rows].to(self.kv_cache[1].dtype))
        return k, v

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan, meta: AttentionMetadata,
                 k_flat: torch.Tensor, v_flat: torch.Tensor) -> torch.Tensor:
        window = self.sliding_window
        if span.context_len:
            k, v = k_flat[span.kv_slots].to(q.dtype), v_flat[span.kv_slots].to(q.dtype)
        if q.device.type == "cpu" and self.num_heads * span.length * k.shape[0] <= MATMUL_PREFILL_MAX_SCORES:
            return self._prefill_matmul(q, k, v, meta.prefill_mask(span, window, q.device))
        if span.context_len == 0 and (window is None or span.length <= window):
            mask, causal = None, True
        else:
            mask, causal = meta.prefill_mask(span, window, q.device), False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, is_causal=causal,
            scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(0, 1)

    def _prefill_matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A chunk's attention as two batched GEMMs per KV head (the group's query heads stacked as rows),
        scores and softmax in float32. On CPU this beats SDPA's flash kernel at prefill's chunk sizes
        (docs/benchmarks.md, "Kernel design notes"); it holds heads x chunk x keys float32 scores, hence the
        size cap."""
        length, keys = q.shape[0], k.shape[0]
        kv_heads, group, dim = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        rows = q.view(length, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * length, dim)
        scores = torch.bmm(rows.float(), k.permute(1, 2, 0).float()).view(kv_heads, group, length, keys)
        scores.mul_(self.scale).masked_fill_(~mask, float("-inf"))
        # bf16 on CPU is a oneDNN product, a kernel kept per shape: pad rows and keys to a few sizes (with zero
        # probabilities and values) so that a server's chunks reuse them (bucketed_linear says why)
        rows_in, keys_in = (max(16, shape_bucket(length)), max(16, shape_bucket(keys))) if onednn_gemm(v) \
            else (length, keys)
        values = v.permute(1, 0, 2)
        if (rows_in, keys_in) == (length, keys):
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
        else:
            probs = torch.zeros(kv_heads, group, rows_in, keys_in, dtype=v.dtype, device=v.device)
            probs[:, :, :length, :keys] = torch.softmax(scores, dim=-1)
            values = F.pad(values, (0, 0, 0, keys_in - keys))
        out = torch.bmm(probs.view(kv_heads, group * rows_in, keys_in), values)
        out = out.view(kv_heads, group, rows_in, dim)[:, :, :length]
        return out.permute(2, 0, 1, 3).reshape(length, self.num_heads, dim)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, k_flat: torch.Tensor,
                v_flat: torch.Tensor) -> torch.Tensor:
        # Grouped-query attention as two batched matmuls: on CPU SDPA's flash kernel is far slower for one
        # query row per sequence (docs/benchmarks.md, "Kernel design notes").
        rows, kv_heads, group = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads
        # Fold kv heads into the batch (free with one kv head) so bmm reads K transposed in place.
        k = k_flat[meta.decode_slots].to(q.dtype).transpose(1, 2).reshape(rows * kv_heads, -1, self.head_dim)
        v = v_flat[meta.decode_slots].to(q.dtype).transpose(1, 2).reshape(rows * kv_heads, -1, self.head_dim)
        scores = torch.bmm(q.reshape(rows * kv_heads, group, self.head_dim), k.transpose(1, 2)).float()
        scores = scores.view(rows, kv_heads, group, -1)
        scores.mul_(self.scale).masked_fill_(~meta.decode_mask(self.sliding_window), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows * kv_heads, group, -1)
        return torch.bmm(probs, v).view(rows, self.num_heads, self.head_dim)
