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


def shape_bucket(n: int) -> int:
    """`n` rows rounded up to one of a few sizes: itself up to 16, then multiples of 16 up to 128, then eight
    sizes per doubling (at most 12.5% more rows): a server's steps visit a few dozen sizes, not thousands."""
    if n <= 16:
        return n
    step = max(16, 1 << (n.bit_length() - 4))
    return -(-n // step) * step


def onednn_gemm(t: torch.Tensor) -> bool:
    """Whether torch multiplies `t` through oneDNN: bf16 and float16 on CPU (float32 goes to MKL)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of x [rows, K], its rows padded to a `shape_bucket` where torch would go through oneDNN.

    oneDNN builds a kernel per GEMM shape and torch keeps it, with its buffers, in two caches of 1,024 entries:
    with every step's token count a new shape a server's memory grew by ~0.5 MiB per new size for hours
    (docs/reliability.md). At the bucket sizes (multiples of 16) its AMX kernels are as fast or faster."""
    rows = x.shape[0]
    padded_rows = shape_bucket(rows) if onednn_gemm(x) else rows
    if padded_rows == rows:
        return F.linear(x, weight, bias)
    padded = x.new_empty(padded_rows, x.shape[1])
    padded[:rows] = x
    padded[rows:] = 0
    return F.linear(padded, weight, bias)[:rows]


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, except for a few rows on CPU (decode): a native kernel (`ops.dense_rows`: float32 sums,
    csrc/dense_rows.cpp) that streams bf16 or float32 weights at close to memory bandwidth, where torch's
    GEMM reads them at about half that rate."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = ops.dense_rows(rows, weight, bias)
    if out is None:
        out = bucketed_linear(rows, weight, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [tokens, K] @ weight [vocab, K].T: float32 logits from the native kernel for a few rows
    (torch's bf16 GEMM would also round each logit to bf16), else F.linear in the weight's dtype."""
    out = ops.dense_rows(hidden, weight, None, True)
    return out if out is not None else bucketed_linear(hidden, weight)


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
