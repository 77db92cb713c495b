"""The pass that swaps group-quantized layers into a loaded model, and which width each matrix gets.

Applied from outside the model code, after the weights are loaded (`quantize_model(model, "int4")`):
every `nn.Linear` whose input width is a multiple of 64 becomes a `GroupQuantLinear` and the LM head a
`QuantizedLMHead` (`tokenloom.models.layers.quantized`, over the format of
`tokenloom.models.layers.group_quant`).

A loader that passes a file's raw quantized blocks (`ExactWeights`: a GGUF file's block types of up to 8
bits with one scale per 32 weights, which the group format holds exactly) gets them repacked rather than
re-fitted, since a second rounding onto a coarser grid is what costs accuracy. A tensor already stored at
5 bits or fewer keeps its own width (int4 keeps a Q5_0 tensor at 5 bits: re-fitting it to 4 costs +24%
perplexity on Gemma 3 270M); wider or non-block tensors (Q6_K, Q8_0 under int4/int5, floats) are fitted
at the method's width.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from tokenloom.models.layers.group_quant import (
    GQ_CHUNK,
    GroupQuantWeight,
    concat_group_quant,
    pack_group_quant,
)
from tokenloom.models.layers.linear import MergedLinear
from tokenloom.models.layers.quantized import GroupQuantLinear, QuantizedLMHead

QUANTIZATION_BITS = {"int8": 8, "int5": 5, "int4": 4}
# The widest stored width a method keeps exactly instead of fitting at its own width: int4 and int5
# keep 5-bit tensors (a second rounding onto 4 bits is the costly one), int8 keeps every block format.
_KEEP_UP_TO = {"int8": 8, "int5": 5, "int4": 5}


class ExactWeights(Protocol):
    """Weights whose stored quantized form the group format holds exactly (a GGUF file's blocks), by
    checkpoint parameter name (`model.layers.0.self_attn.q_proj.weight`; `lm_head.weight` for the head,
    tied or not)."""

    def native_bits(self, name: str) -> int | None:
        """The fewest of 4, 5, 8 bits that hold the stored tensor exactly, or None (not stored as such)."""

    def pack(self, name: str, bits: int) -> GroupQuantWeight:
        """The stored tensor repacked at `bits` (at least `native_bits(name)`), in the model's row order."""


def _pack_layer(weight: torch.Tensor, names: list[tuple[str, int, int]], method: str,
                exact: ExactWeights | None) -> GroupQuantWeight:
    """Pack a matrix made of `names` (checkpoint name, first row, rows): stored blocks are repacked where
    the method keeps them, the rest fitted; the shards of one layer share the widest width among them."""
    keep, fitted = _KEEP_UP_TO[method], QUANTIZATION_BITS[method]
    native = [exact.native_bits(name) if exact is not None else None for name, _, _ in names]
    widths = [max(b, fitted) if b is not None and b <= keep else fitted for b in native]
    bits = max(widths)
    parts = []
    for (name, start, rows), stored in zip(names, native):
        if stored is not None and stored <= bits:  # read from the file on the CPU; the layer lives with its weight
            parts.append(GroupQuantWeight(*(f if f is None else f.to(weight.device) for f in exact.pack(name, bits))))
        else:
            parts.append(pack_group_quant(weight[start:start + rows], bits))
    return concat_group_quant(parts)


def _group_quant_supported(weight: torch.Tensor) -> bool:
    # The packed layout works in chunks of 64 inputs.
    return weight.shape[1] % GQ_CHUNK == 0


def _quantizable(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear, list[tuple[str, int, int]]]]:
    """The linear layers a quantization pass swaps (not the LM head): (parent, attribute, layer, the
    checkpoint matrices it holds as (name, first row, rows))."""
    head = getattr(model, "lm_head", None)
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head or not _group_quant_supported(child.weight):
                continue
            prefix = f"{path}.{name}" if path else name
            if isinstance(child, MergedLinear):
                stem = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
                names = [(f"{stem}{shard}.weight", start, rows) for shard, (start, rows) in child.shard_offsets.items()]
            else:
                names = [(f"{prefix}.weight", 0, child.weight.shape[0])]
            yield parent, name, child, names


def default_quantization(model: nn.Module, exact: ExactWeights | None) -> str:
    """What `quantization=auto` means for this model: a generative model whose file stores block-quantized
    matrices (a GGUF) keeps them quantized, repacked exactly (`int4` where any is stored at 4 or 5 bits,
    `int8` where they are 8-bit), as llama.cpp runs the file; everything else runs unquantized, and so does
    every model on a GPU (the few-rows kernels are CPU ones: there, every step would dequantize)."""
    if exact is None or getattr(model, "lm_head", None) is None or model.lm_head.weight.device.type != "cpu":
        return "none"
    stored = [bits for *_, names in _quantizable(model) for name, _, _ in names
              if (bits := exact.native_bits(name)) is not None]
    if not stored:
        return "none"
    return "int4" if min(stored) <= 5 else "int8"


def quantize_model(model: nn.Module, method: str, exact: ExactWeights | None = None) -> nn.Module:
    """Swap the model's linear layers and LM head for group-quantized ones, in place; returns the model.

    `method` int4 / int5 / int8 is the width fitted weights get; `exact` gives stored quantized tensors
    to repack instead (see the module docstring). A matrix whose input width is not a multiple of 64
    stays dense."""
    if method == "none":
        return model
    if method not in QUANTIZATION_BITS:
        raise ValueError(f"unknown quantization method {method!r}")
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"quantization={method} is for generative models (it quantizes the layers and the LM "
                         f"head); {type(model).__name__} has no LM head: run it with quantization=none and "
                         f"dtype bfloat16 or float32")
    for parent, name, child, names in _quantizable(model):
        packed = _pack_layer(child.weight, names, method, exact)
        offsets = child.shard_offsets if isinstance(child, MergedLinear) else None
        setattr(parent, name, GroupQuantLinear(packed, child.bias, offsets))
    if _group_quant_supported(head.weight):
        packed = _pack_layer(head.weight, [("lm_head.weight", 0, head.weight.shape[0])], method, exact)
        model.lm_head = QuantizedLMHead(head, packed)
    return model
