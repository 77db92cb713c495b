"""LoRA adapters in PEFT's format, applied to a batch that mixes adapters and the base model.

A PEFT LoRA folder holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight`
[out, r] per target module. A module of the checkpoint may be a shard of one of our fused layers (q_proj of
qkv_proj, gate_proj of gate_up_proj): its update then lands on that shard's output columns.

Applying: every targeted linear layer is wrapped once in a `LoRALinear` that holds each loaded adapter's
matrices by slot. Before a step the runner tells the shared `LoRABatch` which slot each packed token uses.
For serving, a wrapped layer keeps every loaded adapter's A stacked into one [K, in] matrix and every B
(scaled, placed at its shard's output rows) into one [out, K] matrix, with the slot of each of the K rank
columns: a step with adapters costs two GEMMs per layer whatever the mix (x @ A_all.T, masked to each
token's own slot's columns, then @ B_all.T), where a loop over adapters would cost a pair of small products
and their Python overhead per adapter present. A step with no adapter's tokens skips it all. Training runs
the same update through a loop over the adapters present (autograd reaches the trainable A and B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenloom.adapters import AdapterError, AdapterRequest
from tokenloom.adapters.heads import HEAD_MODULES, SequenceHead, read_head
from tokenloom.models import ops

_PREFIX = "base_model.model."


@dataclass(slots=True)
class LoRAUpdate:
    """One target module's low-rank update: output columns [offset, offset + B.shape[0]) gain
    `scaling * (x @ A.T) @ B.T`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    offset: int
    scaling: float
    dropout: float = 0.0  # on the update's input, while training (PEFT's lora_dropout)


@dataclass(slots=True)
class LoRABatch:
    """The step's packed tokens by adapter slot (set by the runner before the forward pass): `groups` lists
    (slot, token rows) per adapter present, `token_slots` is each token's slot (-1: the base model)."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    token_slots: torch.Tensor | None = None
    _masks: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = field(default_factory=dict)

    def set(self, groups: list[tuple[int, torch.Tensor]], token_slots: torch.Tensor | None) -> None:
        """This step's tokens by slot (empty and None after the step)."""
        self.groups, self.token_slots, self._masks = groups, token_slots, {}

    def mask(self, layout: tuple[int, ...], col_slot: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, K] 1 where column k belongs to the token's own adapter, for a layout of K columns' slots;
        computed once per step and layout (every layer the same adapters adapt alike shares it)."""
        key = (layout, dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = (col_slot.unsqueeze(0) == self.token_slots.unsqueeze(1)).to(dtype)
        return mask


class LoRALinear(nn.Module):
    """A linear layer (dense, fused or quantized) plus the low-rank updates of the loaded adapters."""

    def __init__(self, base: nn.Module, batch: LoRABatch, max_adapters: int) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.updates: list[list[LoRAUpdate]] = [[] for _ in range(max_adapters)]
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None
        self._native: tuple[torch.Tensor, ...] | None = None

    def set_updates(self, slot: int, updates: list[LoRAUpdate]) -> None:
        """Install (or, with [], remove) an adapter's updates in `slot`."""
        self.updates[slot] = updates
        self._stacked = self._native = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the wrapped layer's own attributes (shard_offsets, split, ...)
            return getattr(self._modules["base"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, plus each adapter's update on its own tokens."""
        out = self.base(x)
        if not self.batch.groups:
            return out
        if self.batch.token_slots is not None and not torch.is_grad_enabled():
            a, b_flat, cols, ranges = self._native_stacks(x.dtype, x.device)
            if not a.shape[0] or ops.lora_add(out, x, a, b_flat, cols, self.batch.token_slots, ranges):
                return out
            a_all, b_all, col_slot, layout = self._stacks(x.dtype, x.device)
            if a_all.shape[0]:
                xa = torch.nn.functional.linear(x, a_all).mul_(self.batch.mask(layout, col_slot, x.dtype))
                if out.dim() == 2 and out.dtype == xa.dtype:
                    out.addmm_(xa, b_all.t())
                else:
                    out.add_(torch.nn.functional.linear(xa, b_all).to(out.dtype))
            return out
        for slot, rows in self.batch.groups:
            updates = self.updates[slot]
            if not updates:
                continue
            xs = x[rows]
            for u in updates:
                xd = torch.nn.functional.dropout(xs, u.dropout) if u.dropout and torch.is_grad_enabled() else xs
                delta = (xd @ u.a.t().to(xs.dtype)) @ u.b.t().to(xs.dtype)
                out[:, u.offset:u.offset + u.b.shape[0]].index_add_(0, rows, (delta * u.scaling).to(out.dtype))
        return out


    def _native_stacks(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """For the native kernel, in `dtype`: A_all [K, in]; each column's row of B (scaled) over its shard's
        outputs only, concatenated, with (start, output offset, width) per column [K, 3]; each slot's column
        range [slots, 2]."""
        if self._native is None or self._native[0].dtype != dtype:
            a_rows, b_parts, cols, ranges = [], [], [], []
            start = 0
            for updates in self.updates:
                first = len(cols)
                for u in updates:
                    a_rows.append(u.a)
                    for k in range(u.a.shape[0]):
                        b_parts.append(u.b[:, k] * u.scaling)
                        cols.append((start, u.offset, u.b.shape[0]))
                        start += u.b.shape[0]
                ranges.append((first, len(cols)))
            in_features = int(self.base.in_features)
            a = torch.cat(a_rows) if a_rows else torch.zeros(0, in_features)
            b_flat = torch.cat(b_parts) if b_parts else torch.zeros(0)
            self._native = (a.to(device, dtype).contiguous(), b_flat.to(device, dtype).contiguous(),
                            torch.tensor(cols, dtype=torch.long).view(-1, 3).to(device),
                            torch.tensor(ranges, dtype=torch.long).view(-1, 2).to(device))
        return self._native

    def _stacks(self, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(A_all [K, in], B_all [out, K] with the scaling folded in, in the activations' `dtype`; the slot of
        each column [K] as a tensor and as a tuple)."""
        if self._stacked is None or self._stacked[0].dtype != dtype:
            cols = [(slot, u) for slot, updates in enumerate(self.updates) for u in updates]
            rank = sum(u.a.shape[0] for _, u in cols)
            a_all = torch.zeros(rank, int(self.base.in_features), dtype=dtype, device=device)
            b_all = torch.zeros(int(self.base.out_features), rank, dtype=dtype, device=device)
            col_slot = torch.empty(rank, dtype=torch.long, device=device)
            k = 0
            for slot, u in cols:
                r = u.a.shape[0]
                a_all[k:k + r] = u.a
                b_all[u.offset:u.offset + u.b.shape[0], k:k + r] = u.b * u.scaling
                col_slot[k:k + r] = slot
                k += r
            self._stacked = (a_all, b_all, col_slot, tuple(col_slot.tolist()))
        return self._stacked


def linear_targets(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Checkpoint module name → (our module name, output offset, width): every linear layer by its own
    name, and every shard of a fused layer by the checkpoint name it stands for."""
    out = {}
    for name, module in model.named_modules():
        base = module.base if isinstance(module, LoRALinear) else module
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) and not hasattr(base, "codes"):
            continue
        width = getattr(base, "out_features", None)
        if width is None:
            continue
        out[name] = (name, 0, width)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        for shard, (offset, size) in (getattr(base, "shard_offsets", None) or {}).items():
            out[f"{parent}.{shard}" if parent else shard] = (name, offset, size)
    return out


@dataclass(slots=True)
class LoRAAdapter:
    """A loaded adapter: its updates by our module name."""

    name: str
    path: Path
    rank: int
    updates: dict[str, list[LoRAUpdate]]
    head: SequenceHead | None = None  # a SEQ_CLS adapter's classification head (encoders)

    def memory_bytes(self) -> int:
        """Bytes of its matrices."""
        head = self.head.memory_bytes() if self.head is not None else 0
        return head + sum(u.a.numel() * u.a.element_size() + u.b.numel() * u.b.element_size()
                          for updates in self.updates.values() for u in updates)


def read_lora(request: AdapterRequest, config_file: Path, config: dict[str, Any], weights_file: Path,
              model: nn.Module, device: torch.device, max_rank: int) -> LoRAAdapter:
    """A PEFT LoRA folder's config and weights mapped onto `model`; AdapterError names what does not fit."""
    seq_cls = _check_config(request.name, config_file, config, max_rank)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the caller
        raise AdapterError(f"adapter {request.name!r}: {weights_file} cannot be read: {exc}") from exc
    rank = int(config["r"])
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    targets = linear_targets(model)
    updates: dict[str, list[LoRAUpdate]] = {}
    rename = getattr(model, "module_name", None)  # encoders: checkpoint module names differ from ours
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        module = (rename(module) or module) if rename is not None else module
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if module not in targets or b_key not in tensors:
            raise AdapterError(f"adapter {request.name!r}: {weights_file}: module {module!r} "
                               f"{'has no lora_B' if module in targets else 'is not a linear layer of this model'}")
        if module.rsplit(".", 1)[-1] == "lm_head":
            raise AdapterError(f"adapter {request.name!r}: {weights_file}: LoRA on lm_head is not supported")
        ours, offset, width = targets[module]
        a, b = tensors[key], tensors[b_key]
        in_features = _in_features(model.get_submodule(ours))
        if a.shape != (rank, in_features) or b.shape != (width, rank):
            raise AdapterError(f"adapter {request.name!r}: {weights_file}: {module} has lora_A {tuple(a.shape)} "
                               f"and lora_B {tuple(b.shape)}; this model needs ({rank}, {in_features}) and "
                               f"({width}, {rank}) (an adapter of another base model?)")
        updates.setdefault(ours, []).append(
            LoRAUpdate(a.to(device, torch.float32), b.to(device, torch.float32), offset, scaling))
    head = None
    pooler_updates = updates.pop("pooler", [])  # the head's own: it runs on the pooled rows alone
    if seq_cls:
        try:
            hidden = int(model.spec.hidden_size) if hasattr(model, "spec") else int(model.config.hidden_size)
            head = read_head(tensors, Path(request.path), hidden, device, str(weights_file), pooler_updates)
        except ValueError as exc:
            raise AdapterError(f"adapter {request.name!r}: {exc}") from exc
    if not updates and head is None:
        raise AdapterError(f"adapter {request.name!r}: {weights_file} holds no lora_A/lora_B weights")
    return LoRAAdapter(request.name, Path(request.path), rank, updates, head)


def _check_config(name: str, file: Path, config: dict[str, Any], max_rank: int) -> bool:
    """Refuse what we do not serve; True for a sequence-classification adapter (a head to read)."""
    def fail(what: str) -> None:
        raise AdapterError(f"adapter {name!r}: {file}: {what}")

    seq_cls = config.get("task_type") == "SEQ_CLS"

    if config.get("peft_type") != "LORA":
        fail(f"peft_type {config.get('peft_type')!r} is not supported here (LORA is)")
    r = config.get("r")
    if not isinstance(r, int) or not 1 <= r <= max_rank:
        fail(f"r must be an integer in [1, {max_rank}] (max_adapter_rank); got {r!r}")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        fail(f"lora_alpha must be a number; got {config.get('lora_alpha')!r}")
    if config.get("use_dora"):
        fail("DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        fail(f"bias {config.get('bias')!r} is not supported (none is)")
    extra = set(config.get("modules_to_save") or ()) - (set(HEAD_MODULES) if seq_cls else set())
    if extra:
        fail(f"modules_to_save {sorted(extra)!r} is not supported (a SEQ_CLS adapter's classifier is)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        fail("per-module rank_pattern / alpha_pattern is not supported")
    return seq_cls


def _in_features(module: nn.Module) -> int:
    base = module.base if isinstance(module, LoRALinear) else module
    return int(base.in_features)
