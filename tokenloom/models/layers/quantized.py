"""Int8 and int4 quantized linear layers and the pass that swaps them into a loaded model.

Applied from outside the model code, after the weights are loaded (`quantize_model(model, "int8")`):
- every `nn.Linear` of the decoder layers becomes an `Int8Linear`: int8 weights with one scale per
  output channel, multiplied with activations quantized to int8 per token on the fly (W8A8 dynamic).
  Integer accumulation is exact, so a row's result does not depend on the rest of the batch, and the
  int8 GEMM reads half the bytes of bf16 and runs faster on CPUs with VNNI at every batch size.
- the LM head becomes a `QuantizedLMHead`: weight-only int8 for a few rows (decode of a few sequences is
  bound by reading the vocab-sized matrix), and the dense matrix for larger batches, where torch's
  weight-only kernel is slower than a bf16 GEMM. A tied head's dense matrix is the embedding table,
  which stays for lookups anyway.
`int4` adds group-wise int4 weights (groups of 32 along the input, a scale and a zero each) used for
steps of a few rows, where decode is bound by the bytes of weights read: the layers keep their int8
copy for larger batches, and the LM head its dense matrix.
On devices without the CPU int8 kernels the layers fall back to dequantized matmuls (same results,
no speed-up).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.models.layers.linear import MergedLinear, ShardedOutput

# Up to this many rows the weight-only kernels run; they scale linearly in rows, so larger steps use
# the int8 GEMM (layers) or the dense matrix (LM head).
_WEIGHT_ONLY_MAX_ROWS = 4
INT4_GROUP_SIZE = 32
_W8A8_CHUNK_ROWS = 512


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 [N, K], float32 scales [N])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of activations: (int8 [M, K], float32 scales [M, 1])."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min_(1e-8).div_(127.0)
    return torch.round(x / scale).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along the input: (packed for torch's CPU kernel, bf16 scales and zeros
    [K / group, N, 2]); the weight is (q - 8) * scale + zero."""
    w = weight.detach().float()
    groups = w.reshape(-1, group_size)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scale = (high - low).clamp_min(1e-6) / 15
    q = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(w.shape)
    zero = low + 8 * scale
    n = w.shape[0]
    scales_zeros = torch.cat([scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)], dim=2).transpose(0, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, scales_zeros.contiguous().to(torch.bfloat16)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantized int4 weight.T → [M, N] in x's dtype."""
    group_size = x.shape[-1] // scales_zeros.shape[0]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros.to(x.dtype))


def _int4_supported(weight: torch.Tensor) -> bool:
    # torch's packing wants whole groups along the input and outputs in multiples of 16.
    return weight.device.type == "cpu" and weight.shape[1] % INT4_GROUP_SIZE == 0 and weight.shape[0] % 16 == 0


class Int8Linear(ShardedOutput, nn.Module):
    """W8A8 linear layer: int8 weights per output channel, int8 activations per token."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 shard_offsets: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        # [K, N] contiguous: the layout the int8 GEMM reads without a per-call reorder.
        self.register_buffer("qweight_t", q.t().contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.shard_offsets = dict(shard_offsets or {})
        self._int_mm = q.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] → [..., N] in x's dtype."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= _W8A8_CHUNK_ROWS:
            out = self._matmul(rows)
        else:  # chunks keep the int32 result and its epilogue in cache (3x faster at 2048 x 4096)
            out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for start in range(0, rows.shape[0], _W8A8_CHUNK_ROWS):
                out[start:start + _W8A8_CHUNK_ROWS] = self._matmul(rows[start:start + _W8A8_CHUNK_ROWS])
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self._int_mm:
            xq, x_scale = quantize_rows(rows)
            out = torch._int_mm(xq, self.qweight_t).mul(self.scale).mul_(x_scale)  # int32 * f32 -> f32
        else:
            out = rows.float() @ (self.qweight_t.float() * self.scale)
        return out.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


class Int4Linear(Int8Linear):
    """Int4 weights for steps of a few rows; the int8 GEMM (inherited) for larger ones."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 shard_offsets: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(weight, bias, shard_offsets)
        packed, scales_zeros = quantize_int4(weight)
        self.register_buffer("qweight4", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] → [..., N] in x's dtype."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > _WEIGHT_ONLY_MAX_ROWS:
            return super().forward(x)
        out = int4_matmul(rows, self.qweight4, self.scales_zeros)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (few rows) + w8a8"


class QuantizedLMHead(nn.Module):
    """Vocabulary projection: weight-only int8 or int4 for a few rows, the dense matrix for many."""

    def __init__(self, dense: nn.Module, bits: int) -> None:
        super().__init__()
        self.dense, self.bits = dense, bits
        if bits == 4:
            packed, scales_zeros = quantize_int4(dense.weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scales_zeros)
        else:
            q, scale = quantize_per_channel(dense.weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        self._kernel = dense.weight.device.type == "cpu"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, K] → logits [M, vocab] in hidden's dtype."""
        if hidden.shape[0] > _WEIGHT_ONLY_MAX_ROWS or not self._kernel:
            return self.dense(hidden)
        if self.bits == 4:
            return int4_matmul(hidden, self.qweight, self.scale)
        return torch.ops.aten._weight_int8pack_mm(hidden, self.qweight, self.scale.to(hidden.dtype))


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Swap the model's linear layers and LM head for quantized ones, in place; returns the model."""
    if method == "none":
        return model
    if method not in ("int8", "int4"):
        raise ValueError(f"unknown quantization method {method!r}")
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no lm_head to quantize")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                offsets = child.shard_offsets if isinstance(child, MergedLinear) else None
                layer = Int4Linear if method == "int4" and _int4_supported(child.weight) else Int8Linear
                setattr(parent, name, layer(child.weight, child.bias, offsets))
    bits = 4 if method == "int4" and _int4_supported(head.weight) else 8
    model.lm_head = QuantizedLMHead(head, bits)
    return model
