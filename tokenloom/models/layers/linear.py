"""Linear layers: several checkpoint matrices fused into one GEMM (q|k|v, gate|up), and LM heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models import ops


class ShardedOutput:
    """Mixin for layers whose output stacks several projections; `shard_offsets` maps each
    checkpoint name to (offset, width) along the output dimension."""

    shard_offsets: dict[str, tuple[int, int]]

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output back into its shards."""
        return out.split([w for _, w in self.shard_offsets.values()], dim=-1)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, except for a few rows on CPU (decode): a native kernel (`ops.dense_rows`: float32 sums,
    csrc/dense_rows.cpp) that streams bf16 or float32 weights at close to memory bandwidth, where torch's
    GEMM reads them at about half that rate."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = ops.dense_rows(rows, weight, bias)
    if out is not None:
        return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [tokens, K] @ weight [vocab, K].T: float32 logits from the native kernel for a few rows
    (torch's bf16 GEMM would also round each logit to bf16), else F.linear in the weight's dtype."""
    out = ops.dense_rows(hidden, weight, None, True)
    return out if out is not None else F.linear(hidden, weight)


class Linear(nn.Linear):
    """nn.Linear computed as `dense_linear` (the decoder layers' projections)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out]."""
        return dense_linear(x, self.weight, self.bias)


class MergedLinear(ShardedOutput, Linear):
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


class LMHead(nn.Linear):
    """An untied vocabulary projection (no bias), computed as `vocab_projection`."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__(hidden, vocab, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, hidden] → logits [tokens, vocab]."""
        return vocab_projection(hidden, self.weight)


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
        """hidden [tokens, hidden] → logits [tokens, vocab] (float32 from the few-rows kernel)."""
        return vocab_projection(hidden, self.embedding.weight)
