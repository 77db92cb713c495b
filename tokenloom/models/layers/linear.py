"""Linear layers that fuse several checkpoint matrices into one GEMM (q|k|v, gate|up)."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One linear layer holding several checkpoint projections stacked along the output dimension.

    `shards` maps each checkpoint name (e.g. "q_proj") to its output width, in order.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, width in shards.items():
            self.shard_offsets[name] = (offset, width)
            offset += width

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint projection's weight or bias into its rows."""
        offset, width = self.shard_offsets[shard]
        target = getattr(self, param_name)
        if tensor.shape[0] != width or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{shard}.{param_name}: checkpoint shape {tuple(tensor.shape)} does not fit "
                             f"rows {offset}:{offset + width} of {tuple(target.shape)}")
        with torch.no_grad():
            target[offset:offset + width].copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output back into its shards."""
        return out.split([w for _, w in self.shard_offsets.values()], dim=-1)
