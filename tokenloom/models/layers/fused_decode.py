"""Decode steps through whole decoder layers, one native call a layer (csrc/decode_layer.cpp).

A decode step's layer is ~10 kernel calls on a few kilobytes of activations; from Python each costs a module
call, its wrapper and a binding, ~200 us a layer: about a quarter of a gemma-3-270m step at 4 bits on AVX2. The native
call runs the same kernels, in the same order, on the same tensors, so its outputs are bit-identical to the
module path. It is taken for a step when:
- the step is decode only (one new token per sequence) on CPU, without autograd, soft-prompt keys or
  cross-attention;
- every layer offers its `DecodeParts` (pre-norm, fused q|k|v, gated MLP) and each projection is one the
  kernels take at this size (row tiles, the general group-quantized layout, or dense rows): a LoRA wrapper,
  partial rotary or mixed norm conventions send the step through the modules, as does a step with more
  rows than a projection's kernel takes.
The plans (each layer's weights as the native code holds them) are built once and kept on the layer; a
layer rebuilds its own when one of its modules is swapped or the activations' dtype changes, and drops it
when it is moved (`_apply`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from tokenloom.models import ops
from tokenloom.models.layers.attention import AttentionMetadata, PagedAttention
from tokenloom.models.layers.linear import Linear, MergedLinear
from tokenloom.models.layers.norm import RMSNorm
from tokenloom.models.layers.quantized import GroupQuantLinear
from tokenloom.models.layers.rotary import RotaryEmbedding


@dataclass(slots=True)
class DecodeParts:
    """The modules a pre-norm decoder layer runs, in its forward's order: input norm, q|k|v projection,
    optional q/k norms and RoPE, paged attention, o projection, the attention output's own norm (Gemma) or
    none, the MLP's input norm, gate|up projection, `act` (silu or gelu_tanh) of gate times up, down
    projection, the MLP output's own norm (Gemma) or none."""

    input_norm: RMSNorm
    qkv: nn.Module
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    rotary: RotaryEmbedding
    attention: PagedAttention
    o: nn.Module
    attn_out_norm: RMSNorm | None
    mlp_in_norm: RMSNorm
    gate_up: nn.Module
    act: str
    down: nn.Module
    mlp_out_norm: RMSNorm | None

    def modules(self) -> tuple[nn.Module, ...]:
        """The projections, whose identity a plan is built for."""
        return self.qkv, self.o, self.gate_up, self.down


class FusedDecodeLayer(nn.Module):
    """A decoder layer that the fused decode path can run: it names its `DecodeParts` and keeps its plan."""

    _fused_plan: _LayerPlan | None = None

    def decode_parts(self) -> DecodeParts | None:
        """The layer's parts, or None where it is not a plain pre-norm layer."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._fused_plan = None  # its tensors may be replaced (device or dtype moves)
        return super()._apply(fn, recurse)


class _LayerPlan(NamedTuple):
    modules: tuple[nn.Module, ...]
    dtype: torch.dtype
    plan: object | None  # None: this layer cannot be fused (remembered until its modules change)
    max_rows: int
    attention: PagedAttention | None
    norm: tuple[float, float]  # the layer norms' (eps, offset)


def run_fused_decode(layers: nn.ModuleList, final_norm: RMSNorm, x: torch.Tensor, positions: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor | None:
    """`run_decoder_layers` of a decode step through the native layer calls: the final normalised hidden
    states, or None where the step or a layer does not qualify (the caller runs the modules)."""
    if (x.device.type != "cpu" or x.dim() != 2 or meta.prefills or meta.decode_block_table is None
            or meta.virtual_kv is not None or meta.cross is not None or torch.is_grad_enabled()):
        return None
    plans = []
    for layer in layers:
        plan = _layer_plan(layer, x.dtype)
        if plan is None or plan.plan is None or x.shape[0] > plan.max_rows or plan.attention.kv_cache is None:
            return None
        plans.append(plan)
    next_norms = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
    if any((n.eps, n.offset) != p.norm for n, p in zip(next_norms, plans)):
        return None
    h = layers[0].input_layernorm(x)
    slots, table, lens = meta.slot_mapping, meta.decode_block_table, meta.decode_lens
    for plan, next_norm in zip(plans, next_norms):
        k_cache, v_cache = plan.attention.kv_cache
        x, h = ops.decode_layer(plan.plan, x, h, positions, slots, table, lens, k_cache, v_cache, next_norm.weight)
    return h


def _layer_plan(layer: nn.Module, dtype: torch.dtype) -> _LayerPlan | None:
    """The layer's plan for activations of `dtype`, rebuilt when its projections were swapped."""
    if not isinstance(layer, FusedDecodeLayer):
        return None
    parts = layer.decode_parts()
    if parts is None:
        return None
    cached = layer._fused_plan
    modules = parts.modules()
    if cached is not None and cached.dtype == dtype and all(a is b for a, b in zip(cached.modules, modules)):
        return cached
    layer._fused_plan = _build_plan(parts, modules, dtype)
    return layer._fused_plan


def _build_plan(parts: DecodeParts, modules: tuple[nn.Module, ...], dtype: torch.dtype) -> _LayerPlan:
    unfused = _LayerPlan(modules, dtype, None, 0, None, (0.0, 0.0))
    attention = parts.attention
    norms = [n for n in (parts.input_norm, parts.attn_out_norm, parts.mlp_in_norm, parts.mlp_out_norm) if n]
    conventions = {(n.eps, n.offset) for n in norms}
    qk = (parts.q_norm, parts.k_norm)
    if (len(conventions) != 1 or parts.act not in ("silu", "gelu_tanh")
            or parts.rotary.rotary_dim != attention.head_dim
            or (qk[0] is None) != (qk[1] is None)
            or (qk[0] is not None and (qk[0].eps, qk[0].offset) != (qk[1].eps, qk[1].offset))):
        return unfused
    projections = [_projection(m, dtype) for m in modules]
    if any(p is None for p in projections):
        return unfused
    plan = ops.decode_layer_plan()
    if plan is None:
        return unfused
    plan.qkv, plan.o, plan.gate_up, plan.down = (p[0] for p in projections)
    if qk[0] is not None:
        plan.q_norm, plan.k_norm = qk[0].weight.detach(), qk[1].weight.detach()
        plan.qk_eps, plan.qk_offset = qk[0].eps, qk[0].offset
    plan.cos, plan.sin = parts.rotary.tables(torch.device("cpu"), dtype)
    plan.attn_out_norm = None if parts.attn_out_norm is None else parts.attn_out_norm.weight.detach()
    plan.mlp_in_norm = parts.mlp_in_norm.weight.detach()
    plan.mlp_out_norm = None if parts.mlp_out_norm is None else parts.mlp_out_norm.weight.detach()
    (plan.eps, plan.offset), = conventions
    plan.heads, plan.kv_heads = attention.num_heads, attention.num_kv_heads
    plan.window, plan.scale = attention.sliding_window or 0, attention.scale
    plan.gelu_tanh = parts.act == "gelu_tanh"
    return _LayerPlan(modules, dtype, plan, min(p[1] for p in projections), attention, (plan.eps, plan.offset))


def _projection(module: nn.Module, dtype: torch.dtype) -> tuple[object, int] | None:
    """(the native projection, the most rows its kernel takes) of a layer the kernels take, else None."""
    if type(module) is GroupQuantLinear:
        if module.tiled:
            if module.high is not None and not ops.group_quant_tiles_high():
                return None
            native = ops.decode_projection("tiles", module.tiles, module.d, module.m, module.high, module.bias,
                                           module.out_features)
            return (native, ops.group_quant_max_rows(tiled=True)) if native is not None else None
        rows = ops.group_quant_max_rows()
        if not rows:
            return None
        packed = module.packed
        native = ops.decode_projection("rows", packed.codes, packed.d, packed.m, packed.high, module.bias,
                                       module.out_features)
        return (native, rows) if native is not None else None
    if type(module) in (Linear, MergedLinear):
        weight = module.weight.detach()
        if weight.shape[1] % 32 or not ops.dense_rows_supported(dtype, weight.dtype):
            return None
        bias = None if module.bias is None else module.bias.detach()
        native = ops.decode_projection("dense", weight, bias=bias, out_features=weight.shape[0])
        return (native, ops.MAX_ROWS) if native is not None else None
    return None
