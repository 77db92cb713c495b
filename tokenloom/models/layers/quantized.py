"""Group-quantized linear layers: `GroupQuantLinear` in place of an `nn.Linear` and `QuantizedLMHead` in
place of the LM head, over weights in the format of `group_quant` (`tokenloom.models.quantize` swaps them
into a loaded model).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.models import ops
from tokenloom.models.layers.group_quant import (
    GroupQuantWeight,
    TiledWeight,
    group_quant_matmul,
    tile_group_quant,
    untile_group_quant,
)
from tokenloom.models.layers.linear import ShardedOutput


def _register_weight(module: nn.Module, weight: GroupQuantWeight, tiled: bool) -> None:
    """The weight's tensors as buffers of `module`: tiles, d, m, high in row tiles, else codes, d, m, high."""
    fields = tile_group_quant(weight) if tiled else weight
    for name, value in zip(fields._fields, fields):
        module.register_buffer(name, value)


def _general_layout(module: nn.Module, tiled: bool, rows: int) -> GroupQuantWeight:
    """The weight of a module filled by `_register_weight`, in the general layout."""
    if tiled:
        return untile_group_quant(TiledWeight(module.tiles, module.d, module.m, module.high), rows)
    return GroupQuantWeight(module.codes, module.d, module.m, module.high)


class GroupQuantLinear(ShardedOutput, nn.Module):
    """A linear layer over group-quantized weights (see `group_quant` for the two regimes). Where the level
    keeps layers in row tiles (`ops.tiled_layers`: avx2), 4- and 5-bit weights are stored tiled and every step
    runs the tiles kernel; elsewhere the general layout's few-rows kernel or a GEMM over the dequantized
    matrix."""

    def __init__(self, weight: GroupQuantWeight, bias: torch.Tensor | None,
                 shard_offsets: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features, self.bits = weight.codes.shape[0], weight.in_features, weight.bits
        self.tiled = weight.bits in (4, 5) and weight.codes.device.type == "cpu" and ops.tiled_layers()
        _register_weight(self, weight, self.tiled)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.shard_offsets = dict(shard_offsets or {})
        self._packed: GroupQuantWeight | None = None
        self._tiled_args: tuple[torch.Tensor | None, ...] | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._packed = self._tiled_args = None  # buffers may be replaced (device or dtype moves)
        return super()._apply(fn, recurse)

    @property
    def packed(self) -> GroupQuantWeight:
        """The weight in the general layout (the few-rows kernel's, and what the dequantization reads)."""
        if self._packed is None:  # a plain attribute afterwards: a decode step makes ~300 of these lookups
            self._packed = _general_layout(self, self.tiled, self.out_features)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] → [..., N] in x's dtype."""
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = self._tiled_product(rows) if self.tiled else None
        if out is None:
            out = group_quant_matmul(rows, self.packed, self.bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def _tiled_product(self, rows: torch.Tensor) -> torch.Tensor | None:
        args = self._tiled_args
        if args is None:  # plain attributes: buffer lookups cost ~1 us each, ~400 a decode step
            args = self._tiled_args = (self.tiles, self.d, self.m, self.high, self.bias)
        tiles, d, m, high, bias = args
        out = ops.group_quant_tiles(rows, tiles, d, m, high)
        if out is None:
            return None
        if out.shape[1] != self.out_features:
            out = out[:, :self.out_features]
        if bias is not None:
            out = out + bias
        return out if out.dtype == rows.dtype else out.to(rows.dtype)

    def extra_repr(self) -> str:
        layout = ", row tiles" if self.tiled else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} groups of 32"
                f"{layout}")


class QuantizedLMHead(nn.Module):
    """Vocabulary projection: the group-quantized matrix for the steps its kernel takes (decode reads the
    whole vocabulary-sized matrix per step; `ops.group_quant_max_rows`), the dense one for more (bound by
    arithmetic, where a native bf16 GEMM wins). A tied head's dense matrix is the embedding table, kept for
    lookups anyway. 4-bit codes are kept in row tiles of 16 where the native kernel runs (csrc/gq_tiles.cpp: about half
    the instructions per weight of the general layout, which single-stream decode is bound by)."""

    def __init__(self, dense: nn.Module, weight: GroupQuantWeight) -> None:
        super().__init__()
        self.dense, self.bits, self.out_features = dense, weight.bits, weight.codes.shape[0]
        self.tiled = weight.bits == 4 and weight.codes.device.type == "cpu" and ops.vectorised_group_quant()
        _register_weight(self, weight, self.tiled)

    @property
    def packed(self) -> GroupQuantWeight:
        """The quantized matrix in the general layout."""
        return _general_layout(self, self.tiled, self.out_features)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, K] → logits [M, vocab]: float32 from the quantized kernel (the logits are wanted in
        float32), else hidden's dtype."""
        if self.tiled:
            logits = ops.group_quant_tiles(hidden, self.tiles, self.d, self.m)
            if logits is not None:
                return logits if logits.shape[1] == self.out_features else logits[:, :self.out_features]
        else:
            logits = ops.group_quant_rows(hidden, self.codes, self.d, self.m, self.high, None, True)
            if logits is not None:
                return logits
        return self.dense(hidden)


def has_tiled_layers(model: nn.Module) -> bool:
    """Whether any of the model's group-quantized layers runs in row tiles (`GroupQuantLinear.tiled`)."""
    return any(isinstance(m, GroupQuantLinear) and m.tiled for m in model.modules())
