"""Copy named checkpoint tensors into a model's parameters, fusing stacked shards."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tokenloom.models.layers.linear import MergedLinear


class WeightLoadError(ValueError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape."""


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       rename: Callable[[str], str | None] = lambda n: n,
                       transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Load `weights` by name into `model`.

    `rename` maps a checkpoint name to the model's (None skips the tensor). A name whose module part
    is a shard of a `MergedLinear` (e.g. `...self_attn.q_proj.weight` into `...self_attn.qkv_proj`)
    fills that shard. Every parameter must be written exactly once.
    """
    params = dict(model.named_parameters())
    merged = {name: m for name, m in model.named_modules() if isinstance(m, MergedLinear)}
    shard_owner = {f"{name.rsplit('.', 1)[0]}.{shard}" if "." in name else shard: (name, shard)
                   for name, m in merged.items() for shard in m.shard_offsets}
    expected = {n: _shard_count(n, merged) for n in params}
    for raw_name, tensor in weights:
        name = rename(raw_name)
        if name is None:
            continue
        if transform is not None:
            tensor = transform(name, tensor)
        module_name, _, leaf = name.rpartition(".")
        if module_name in shard_owner:
            owner, shard = shard_owner[module_name]
            merged[owner].load_shard(shard, leaf, tensor.to(merged[owner].weight.dtype))
            _count(expected, f"{owner}.{leaf}", raw_name)
            continue
        if name not in params:
            raise WeightLoadError(f"checkpoint tensor {raw_name!r} has no matching parameter ({name!r})")
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise WeightLoadError(f"checkpoint tensor {raw_name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        _count(expected, name, raw_name)
    missing = [n for n, left in expected.items() if left > 0]
    if missing:
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _shard_count(param_name: str, merged: dict[str, MergedLinear]) -> int:
    module_name = param_name.rpartition(".")[0]
    return len(merged[module_name].shard_offsets) if module_name in merged else 1


def _count(expected: dict[str, int], name: str, raw_name: str) -> None:
    if expected.get(name, 0) <= 0:
        raise WeightLoadError(f"checkpoint tensor {raw_name!r} writes {name!r} more than once")
    expected[name] -= 1


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under its checkpoint's names, the inverse of `load_named_weights`: a fused
    layer's shards split back (`qkv_proj` → `q_proj`, `k_proj`, `v_proj`), a tied matrix once, and the model's
    own `checkpoint_transform(name, tensor)` applied where it has one (GPT-2's Conv1D layout)."""
    merged = {name: m for name, m in model.named_modules() if isinstance(m, MergedLinear)}
    transform = getattr(model, "checkpoint_transform", None)
    out = {}
    for name, param in model.named_parameters():  # a tied parameter is listed once
        module_name, _, leaf = name.rpartition(".")
        parts = [(name, param.detach())]
        if module_name in merged:
            parent = module_name.rpartition(".")[0]
            prefix = f"{parent}." if parent else ""
            parts = [(f"{prefix}{shard}.{leaf}", param.detach()[offset:offset + width])
                     for shard, (offset, width) in merged[module_name].shard_offsets.items()]
        for key, tensor in parts:
            out[key] = (transform(key, tensor) if transform is not None else tensor).contiguous()
    return out
