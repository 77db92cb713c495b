"""Int8, int5 and int4 quantized linear layers and the pass that swaps them into a loaded model.

Applied from outside the model code, after the weights are loaded (`quantize_model(model, "int8")`):
- every `nn.Linear` of the decoder layers becomes an `Int8Linear`: int8 weights with one scale per
  output channel, multiplied with activations quantized to int8 per token on the fly (W8A8 dynamic).
  Integer accumulation is exact, so a row's result does not depend on the rest of the batch, and the
  int8 GEMM reads half the bytes of bf16 and runs faster on CPUs with VNNI at every batch size.
- the LM head becomes a `QuantizedLMHead`: weight-only int8 for a few rows (decode of a few sequences is
  bound by reading the vocab-sized matrix), and the dense matrix for larger batches, where torch's
  weight-only kernel is slower than a bf16 GEMM. A tied head's dense matrix is the embedding table,
  which stays for lookups anyway.
`int4` / `int5` add group-wise 4- or 5-bit weights (groups of 32 along the input, an fp16 scale and
minimum each: 5 or 6 bits a weight) used for steps of up to 8 rows, where decode is bound by the bytes
of weights read; they run on a native kernel (csrc/group_quant.cpp, weights x int8 activations on
AVX-512 VNNI). The layers keep their int8 copy for larger batches, and the LM head its dense matrix.
On devices without the CPU int8 kernels the layers fall back to dequantized matmuls (same results,
no speed-up).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch
from torch import nn

from tokenloom.models.layers.kernels import cpu_kernels
from tokenloom.models.layers.linear import MergedLinear, ShardedOutput

# Up to this many rows the weight-only kernels run; they scale linearly in rows, so larger steps use
# the int8 GEMM (layers) or the dense matrix (LM head).
_WEIGHT_ONLY_MAX_ROWS = 4
_GQ_MAX_ROWS = 8  # the native 4/5-bit kernel takes up to 8 rows
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


# Input index (within a chunk of 64) held by each vector position of the packed layout: 32-bit lanes
# alternate between the chunk's two groups (see csrc/group_quant.cpp).
_GQ_ORDER = torch.tensor([32 * ((b // 4) % 2) + 4 * (b // 8) + b % 4 for b in range(64)])
_GQ_INVERSE = torch.argsort(_GQ_ORDER)
GQ_CHUNK = 64
_GQ_PACK_ROWS = 8192  # rows quantized at a time (bounds the float temporaries for a 262k-row LM head)
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def _fit_groups(groups: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..levels, fp16-exact scales and minimums for float32 groups [G, 32], weight ~= code * d + m.

    Tries a few clipped ranges per group; for each, the codes fix a least-squares (d, m), and the
    candidate with the smallest squared error wins (as llama.cpp's quantizers refine min/max)."""
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    span = high - low
    best = None
    for clip_low, clip_high in ((0.0, 0.0), (0.0, 0.05), (0.05, 0.0), (0.05, 0.05), (0.1, 0.1)):
        lo, hi = low + clip_low * span, high - clip_high * span
        codes = ((groups - lo) / ((hi - lo) / levels).clamp_min(1e-10)).round_().clamp_(0, levels)
        d, m = _least_squares(codes, groups)
        d, m = d.half().float(), m.half().float()
        err = (codes * d + m - groups).square_().sum(dim=1, keepdim=True)
        if best is None:
            best = [codes, d, m, err]
        else:
            better = err < best[3]
            for i, value in enumerate((codes, d, m, err)):
                best[i] = torch.where(better, value, best[i])
    codes, d, m, _ = best
    # Recompute the codes against the rounded scale and minimum actually stored.
    codes = ((groups - m) / d.clamp_min(1e-10)).round_().clamp_(0, levels)
    return codes.to(torch.uint8), d.squeeze(1).half(), m.squeeze(1).half()


def _least_squares(codes: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (d, m) minimising sum((codes * d + m - w)^2); a constant row keeps d = 0."""
    n = codes.shape[1]
    sc, sw = codes.sum(dim=1, keepdim=True), w.sum(dim=1, keepdim=True)
    scc, scw = (codes * codes).sum(dim=1, keepdim=True), (codes * w).sum(dim=1, keepdim=True)
    det = n * scc - sc * sc
    d = torch.where(det > 0, (n * scw - sc * sw) / det.clamp_min(1e-10), torch.zeros_like(det))
    return d, (sw - d * sc) / n


class GroupQuantWeight(NamedTuple):
    """A [N, K] weight in the native kernel's 4- or 5-bit layout (K % 64 == 0; weight ~= code * d + m):
    codes uint8 [N, K / 2] (the low 4 bits; per chunk of 64 inputs, 32 bytes of nibbles in vector
    order), d float16 [N, K / 64, 2] (the scales of each chunk's two groups of 32), m float16 [N, K / 32]
    (the minimums), high uint8 [N, K / 8] (5 bits: the fifth bit of each code, 64 per chunk) or None."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    high: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        """4 or 5."""
        return 4 if self.high is None else 5


def pack_group_quant(weight: torch.Tensor, bits: int = 4) -> GroupQuantWeight:
    """Quantize a [N, K] float weight (K % 64 == 0) to `bits` (4 or 5) per weight in groups of 32, in the
    native kernel's layout (natively where the kernels are built, else with torch ops: the same fit)."""
    if bits not in (4, 5):
        raise ValueError(f"group quantization takes 4 or 5 bits, not {bits}")
    kernels = cpu_kernels()
    if kernels is not None and weight.device.type == "cpu":
        return GroupQuantWeight(*kernels.gq_pack(weight.detach(), bits))
    n, k = weight.shape
    chunks = k // GQ_CHUNK
    codes = torch.empty(n, k // 2, dtype=torch.uint8)
    d = torch.empty(n, chunks, 2, dtype=torch.float16)
    m = torch.empty(n, k // 32, dtype=torch.float16)
    high = torch.empty(n, k // 8, dtype=torch.uint8) if bits == 5 else None
    for start in range(0, n, _GQ_PACK_ROWS):
        w = weight[start:start + _GQ_PACK_ROWS].detach().float()
        rows = w.shape[0]
        q, scale, low = _fit_groups(w.reshape(-1, 32), (1 << bits) - 1)
        q = q.view(rows, chunks, GQ_CHUNK)[..., _GQ_ORDER]
        low_bits = q & 0x0F
        codes[start:start + rows] = (low_bits[..., :32] | (low_bits[..., 32:] << 4)).reshape(rows, k // 2)
        if high is not None:
            fifth = (q >> 4).view(rows, chunks, 8, 8) * _BIT_WEIGHTS
            high[start:start + rows] = fifth.sum(dim=-1, dtype=torch.uint8).reshape(rows, k // 8)
        d[start:start + rows] = scale.view(rows, chunks, 2)
        m[start:start + rows] = low.view(rows, k // 32)
    return GroupQuantWeight(codes, d, m, high)


def unpack_group_quant(weight: GroupQuantWeight) -> torch.Tensor:
    """The float32 [N, K] matrix that a `GroupQuantWeight` stands for."""
    n, chunks = weight.d.shape[0], weight.d.shape[1]
    packed = weight.codes.view(n, chunks, 32)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # vector order
    if weight.high is not None:
        fifth = (weight.high.view(n, chunks, 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        q = q | (fifth.view(n, chunks, 64) << 4)
    q = q[..., _GQ_INVERSE].float()  # natural order per chunk
    groups = q.view(n, chunks * 2, 32) * weight.d.float().view(n, -1, 1) + weight.m.float().view(n, -1, 1)
    return groups.view(n, chunks * GQ_CHUNK)


@cache
def _native_gq_linear() -> Callable[..., torch.Tensor] | None:
    """The native kernel where it is built and vectorised (looked up once: it runs ~75 times a step)."""
    kernels = cpu_kernels()
    return kernels.gq_linear if kernels is not None and kernels.gq_linear_native() else None


def group_quant_matmul(x: torch.Tensor, weight: GroupQuantWeight, bias: torch.Tensor | None = None,
                       float_out: bool = False) -> torch.Tensor:
    """x [M <= 8, K] @ the quantized weight.T (+ bias) → [M, N] in x's dtype (float32 with `float_out`):
    the native kernel (activations quantized to int8 per group of 32) where it is vectorised, else a
    dequantized matmul."""
    native = _native_gq_linear()
    if native is not None:
        return native(x, weight.codes, weight.d, weight.m, weight.high, bias, float_out)
    out = x.float() @ unpack_group_quant(weight).t()
    if bias is not None:
        out += bias.float()
    return out if float_out else out.to(x.dtype)


def _group_quant_supported(weight: torch.Tensor) -> bool:
    # The packed layout works in chunks of 64 inputs.
    return weight.device.type == "cpu" and weight.shape[1] % GQ_CHUNK == 0


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


class GroupQuantLinear(Int8Linear):
    """4- or 5-bit group-quantized weights for steps of up to 8 rows; the int8 GEMM (inherited) for larger ones."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 shard_offsets: dict[str, tuple[int, int]] | None = None, bits: int = 4) -> None:
        super().__init__(weight, bias, shard_offsets)
        packed = pack_group_quant(weight, bits)
        self.bits = bits
        self.register_buffer("codes", packed.codes)
        self.register_buffer("d", packed.d)
        self.register_buffer("m", packed.m)
        self.register_buffer("high", packed.high)
        self._packed: tuple[GroupQuantWeight, torch.Tensor | None] | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._packed = None  # buffers may be replaced (device or dtype moves)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] → [..., N] in x's dtype."""
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.shape[0] > _GQ_MAX_ROWS:
            return super().forward(x)
        if self._packed is None:  # plain attributes: a decode step makes ~300 of these lookups
            self._packed = (GroupQuantWeight(self.codes, self.d, self.m, self.high), self.bias)
        out = group_quant_matmul(rows, *self._packed)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} (few rows) + w8a8")


class QuantizedLMHead(nn.Module):
    """Vocabulary projection: weight-only int8, int5 or int4 for a few rows, the dense matrix for many."""

    def __init__(self, dense: nn.Module, bits: int) -> None:
        super().__init__()
        self.dense, self.bits = dense, bits
        if bits in (4, 5):
            packed = pack_group_quant(dense.weight, bits)
            self.register_buffer("codes", packed.codes)
            self.register_buffer("d", packed.d)
            self.register_buffer("m", packed.m)
            self.register_buffer("high", packed.high)
        else:
            q, scale = quantize_per_channel(dense.weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        self._kernel = dense.weight.device.type == "cpu"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, K] → logits [M, vocab]: float32 from the group-quantized kernel (the logits are
        wanted in float32), else hidden's dtype."""
        if self.bits != 8:
            if hidden.shape[0] <= _GQ_MAX_ROWS and self._kernel:
                weight = GroupQuantWeight(self.codes, self.d, self.m, self.high)
                return group_quant_matmul(hidden, weight, float_out=True)
            return self.dense(hidden)
        if hidden.shape[0] > _WEIGHT_ONLY_MAX_ROWS or not self._kernel:
            return self.dense(hidden)
        return torch.ops.aten._weight_int8pack_mm(hidden, self.qweight, self.scale.to(hidden.dtype))


QUANTIZATION_BITS = {"int8": 8, "int5": 5, "int4": 4}


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Swap the model's linear layers and LM head for quantized ones, in place; returns the model.

    int8: W8A8 layers and a weight-only int8 head. int5 / int4: 5- or 4-bit group-quantized layers and
    head for decode steps (layers keep an int8 copy for larger batches); a matrix whose input width is
    not a multiple of 64 stays int8."""
    if method == "none":
        return model
    if method not in QUANTIZATION_BITS:
        raise ValueError(f"unknown quantization method {method!r}")
    bits = QUANTIZATION_BITS[method]
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"quantization={method} is for generative models (it quantizes the layers and the LM "
                         f"head); {type(model).__name__} has no LM head: run it with quantization=none and "
                         f"dtype bfloat16 or float32")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                offsets = child.shard_offsets if isinstance(child, MergedLinear) else None
                if bits < 8 and _group_quant_supported(child.weight):
                    layer = GroupQuantLinear(child.weight, child.bias, offsets, bits)
                else:
                    layer = Int8Linear(child.weight, child.bias, offsets)
                setattr(parent, name, layer)
    model.lm_head = QuantizedLMHead(head, bits if _group_quant_supported(head.weight) else 8)
    return model
