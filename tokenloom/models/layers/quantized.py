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


class GroupQuantLinear(ShardedOutput, nn.Module):
    """A linear layer over group-quantized weights (see `group_quant` for the two regimes)."""

    def __init__(self, weight: GroupQuantWeight, bias: torch.Tensor | None,
                 shard_offsets: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features, self.bits = weight.codes.shape[0], weight.in_features, weight.bits
        self.register_buffer("codes", weight.codes)
        self.register_buffer("d", weight.d)
        self.register_buffer("m", weight.m)
        self.register_buffer("high", weight.high)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.shard_offsets = dict(shard_offsets or {})
        self._packed: GroupQuantWeight | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._packed = None  # buffers may be replaced (device or dtype moves)
        return super()._apply(fn, recurse)

    @property
    def packed(self) -> GroupQuantWeight:
        """The weight as the kernels take it."""
        if self._packed is None:  # a plain attribute afterwards: a decode step makes ~300 of these lookups
            self._packed = GroupQuantWeight(self.codes, self.d, self.m, self.high)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] → [..., N] in x's dtype."""
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = group_quant_matmul(rows, self.packed, self.bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} groups of 32"


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
        fields = tile_group_quant(weight) if self.tiled else weight
        for name, value in zip(fields._fields, fields):
            self.register_buffer(name, value)
        if not self.tiled:
            self.register_buffer("high", weight.high)

    @property
    def packed(self) -> GroupQuantWeight:
        """The quantized matrix in the general layout."""
        if self.tiled:
            return untile_group_quant(TiledWeight(self.tiles, self.d, self.m), self.out_features)
        return GroupQuantWeight(self.codes, self.d, self.m, self.high)

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
