"""Linear layers: several checkpoint matrices fused into one GEMM (q|k|v, gate|up), and LM heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShardedOutput:
    """Mixin for layers whose output stacks several projections; `shard_offsets` maps each
    checkpoint name to (offset, width) along the output dimension."""

    shard_offsets: dict[str, tuple[int, int]]

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output back into its shards."""
        return out.split([w for _, w in self.shard_offsets.values()], dim=-1)


class MergedLinear(ShardedOutput, nn.Linear):
    """One linear layer holding several checkpoint projections stacked along the output dimension.

    `shards` maps each checkpoint name (e.g. "q_proj") to its output width, in order.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets = {}
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


class TiedLMHead(nn.Module):
    """The vocabulary projection of a model whose head shares the token embedding matrix."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding  # registered twice in the tree; parameters() lists it once

    @property
    def weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix (the embedding table)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, hidden] → logits [tokens, vocab]."""
        return F.linear(hidden, self.embedding.weight)
