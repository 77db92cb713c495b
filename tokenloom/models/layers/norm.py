"""RMSNorm in the two conventions checkpoints use: a native one-pass kernel (ops) on CPU, torch ops elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models import ops


class RMSNorm(nn.Module):
    """RMSNorm normalised in float32, as transformers does.

    `offset=0` (Llama): `weight * normalised.to(dtype)`, the product in the activation dtype.
    `offset=1` (Gemma): `normalised * (1 + weight)` in float32, then cast.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset
        self._scale: tuple[int, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        out = ops.rms_norm(x, self.weight, self.eps, self.offset)
        return out if out is not None else self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch-ops computation (any device); the kernel matches it."""
        if self.offset:
            return F.rms_norm(x.float(), x.shape[-1:], self._float_scale(), self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)

    def _float_scale(self) -> torch.Tensor:
        """`offset + weight` in float32, rebuilt only when the weight changes (e.g. on load)."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._scale is None or self._scale[:2] != key:
            self._scale = (*key, self.offset + w.detach().float())
        return self._scale[2]


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, update_norm: RMSNorm | None,
                 norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + update_norm(update)` (or `+ update`) and `norm` of that sum: the residual step between
    two blocks, one kernel call on CPU where both norms share eps and convention."""
    if update_norm is None or (update_norm.eps, update_norm.offset) == (norm.eps, norm.offset):
        weight = None if update_norm is None else update_norm.weight
        out = ops.add_rms_norm(residual, update, weight, norm.weight, norm.eps, norm.offset)
        if out is not None:
            return out
    residual = residual + (update if update_norm is None else update_norm(update))
    return residual, norm(residual)
