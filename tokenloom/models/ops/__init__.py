"""Operations with native CPU kernels: one entry per operation, the only place that picks a kernel.

Each entry returns its result when a native kernel takes the call (a CPU tensor, a shape and dtype the
kernel handles, at the instruction-set level in use) and None otherwise; the caller then runs its own
torch path, which is also the reference the kernels are tested against. The kernel module is the one
built for the CPU's best level (`isa.requested_level()`, lowered with `TOKENLOOM_ISA`), resolved once
on first use; `use_level` swaps it for tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

from tokenloom.models.ops import isa
from tokenloom.models.ops.native import kernels_enabled, load_level

__all__ = ["isa", "kernels", "level_in_use", "describe", "use_level", "bf16_is_fast", "rms_norm", "add_rms_norm",
           "qkv_rope_cache", "paged_decode_attention", "dense_rows", "dense_rows_supported", "group_quant_rows",
           "group_quant_tiles", "group_quant_tiles_high", "group_quant_pack", "group_quant_dequant",
           "vectorised_group_quant", "group_quant_max_rows", "tiled_layers", "argmax_rows", "bind_threads",
           "decode_projection", "decode_layer_plan", "decode_layer"]

MAX_ROWS = 8  # the dense few-rows product (decode) takes up to 8 rows; larger steps use a GEMM
# The largest step the group-quantized kernels take (passes of 8 rows, each weight row read once per step)
# before a GEMM over the dequantized matrix is faster, per level, for the layers and for the 4-bit row-tiled
# vocabulary projection. AVX-512 multiplies bf16 natively (AMX) once a step has a few dozen rows. At avx2 the
# layers are in row tiles too (`tiled_layers`), whose many-rows kernel runs at about twice torch's fp32 GEMM
# on the same product (vpmaddubsw: 32 multiply-adds an instruction), so every step size takes the tiles
# (the limit only bounds a step's activations buffer).
# NEON has no fast bf16 GEMM either; its tiles have no many-rows kernel yet (not measured on an ARM machine).
# Measured in docs/benchmarks.md (2026-12-02, second run: "steps of 9–64 rows"; 2026-12-03: AMD EPYC Zen 3).
_GROUP_QUANT_ROWS = {"avx512": (8, 32), "avx2": (64, 1 << 16), "neon": (64, 256)}
_TILED_LAYERS = {"avx2"}  # levels whose group-quantized layers are kept in row tiles


class _Active:
    """A kernel module and what it supports (plain attributes: ops run ~300 times a step)."""

    def __init__(self, module: ModuleType | None) -> None:
        self.kernels = module
        self.level = module.isa_level() if module is not None else "torch"
        self.vectorised_gq = module is not None and module.gq_linear_native()
        self.gq_rows, self.tile_rows = _GROUP_QUANT_ROWS.get(self.level, (0, 0)) if self.vectorised_gq else (0, 0)
        self.tiled_layers = self.vectorised_gq and self.level in _TILED_LAYERS
        self.tiles_high = module is not None and module.gq_tiles_high_supported()
        self.dense_pairs: dict[tuple[torch.dtype, torch.dtype], bool] = {}


_active: _Active | None = None  # resolved on first use


def kernels() -> ModuleType | None:
    """The kernel module in use (built on first call), or None."""
    global _active
    if _active is None:
        _active = _Active(load_level(isa.requested_level()))
    return _active.kernels


def level_in_use() -> str:
    """The level the kernels run at (`portable`, `avx2`, `avx512`, `neon`), or `torch` without kernels."""
    kernels()
    return _active.level


def describe() -> dict[str, object]:
    """The CPU's best level, the level in use and whether kernels are on: for logs, /version, benchmarks."""
    return {**isa.describe(), "isa_in_use": level_in_use(), "kernels": kernels_enabled()}


@contextmanager
def use_level(level: str) -> Iterator[ModuleType | None]:
    """Run the ops at `level` (or on their torch paths with `torch`) inside the block: tests run each
    level this machine supports against the torch reference."""
    global _active
    module = None if level == "torch" else load_level(level)
    if level != "torch" and module is None:
        raise RuntimeError(f"no {level} kernels on this machine (supported: {isa.supported_levels()})")
    saved, _active = _active, _Active(module)
    try:
        yield module
    finally:
        _active = saved


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA with bf16 support, a CPU at the avx512 level
    (AVX512_BF16). Elsewhere bf16 is emulated and float32 is the faster dtype."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return isa.native_bf16() if device.type == "cpu" else True


def _cpu(t: torch.Tensor) -> ModuleType | None:
    return kernels() if t.device.type == "cpu" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor | None:
    """RMSNorm of the last dimension in one pass (models/layers/norm.py has the conventions)."""
    k = _cpu(x)
    return k.rms_norm(x, weight, eps, offset) if k is not None else None


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, update_weight: torch.Tensor | None,
                 next_weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(residual + norm(update) or + update, the next norm of that sum) in one call."""
    k = _cpu(residual)
    return tuple(k.add_rms_norm(residual, update, update_weight, next_weight, eps, offset)) if k is not None else None


def qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, offset: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, heads: int,
                   kv_heads: int) -> torch.Tensor | None:
    """Split a fused q|k|v projection, q/k norms, RoPE and the KV cache write: [tokens, heads + 2 kv, dim]."""
    k = _cpu(qkv)
    if k is None:
        return None
    return k.qkv_rope_cache(qkv, positions, cos, sin, q_weight, k_weight, eps, offset, k_cache, v_cache, slots,
                            heads, kv_heads)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor | None:
    """One query token per sequence against its keys and values read in place through its block table."""
    k = _cpu(q)
    if k is None:
        return None
    return k.paged_decode_attention(q, k_cache, v_cache, block_table, lens, scale, window or 0)


def dense_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               float_out: bool = False) -> torch.Tensor | None:
    """x [rows <= 8, K] @ weight [N, K].T (+ bias), float32 sums, for decode steps: bf16 or float32 weights
    streamed at close to memory bandwidth, where the level has a vectorised path for the dtypes."""
    k = _cpu(x)
    if k is None or x.dim() != 2 or x.shape[0] > MAX_ROWS or weight.shape[1] % 32:
        return None
    return k.dense_rows_linear(x, weight, bias, float_out) if dense_rows_supported(x.dtype, weight.dtype) else None


def dense_rows_supported(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether `dense_rows` has a vectorised kernel for the dtypes at the level in use."""
    k = kernels()
    pair = (x_dtype, weight_dtype)
    supported = _active.dense_pairs.get(pair)
    if supported is None:
        supported = _active.dense_pairs[pair] = k is not None and k.dense_rows_supported(*pair)
    return supported


def lora_add(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_flat: torch.Tensor, cols: torch.Tensor,
             token_slots: torch.Tensor, ranges: torch.Tensor) -> bool:
    """In place, for each token t: out[t] += LoRA update of its adapter slot's columns only (`ranges` [slots, 2]:
    each slot's [begin, end) of the stacked a [K, in]; column k's row of B, scaled, is b_flat[cols[k, 0]:][:len]
    for outputs [cols[k, 1], + cols[k, 2]); slot -1: none). Weights in x's dtype. False where no kernel runs
    (the caller takes the torch path)."""
    k = _cpu(x)
    if k is None or x.dim() != 2 or out.dim() != 2 or x.dtype != out.dtype or x.stride(1) != 1 or out.stride(1) != 1:
        return False
    k.lora_add(out, x, a, b_flat, cols, token_slots, ranges)
    return True


def vectorised_group_quant() -> bool:
    """Whether the group-quantized few-rows kernels are vectorised at the level in use (the portable
    level's scalar loop is slower than a GEMM over the dequantized matrix)."""
    kernels()
    return _active.vectorised_gq


def group_quant_max_rows(tiled: bool = False) -> int:
    """The most rows a step may have for the group-quantized kernels at the level in use (0: none)."""
    kernels()
    return _active.tile_rows if tiled else _active.gq_rows


def group_quant_rows(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                     high: torch.Tensor | None, bias: torch.Tensor | None = None,
                     float_out: bool = False) -> torch.Tensor | None:
    """x [rows, K] @ a group-quantized weight.T (activations quantized to int8 per group of 32), for steps of
    up to `group_quant_max_rows()` rows."""
    k = _cpu(x)
    if k is None or x.shape[0] > _active.gq_rows:
        return None
    return k.gq_linear(x, codes, d, m, high, bias, float_out)


def tiled_layers() -> bool:
    """Whether group-quantized layers are kept in row tiles at the level in use (`group_quant_tiles` takes
    steps of any size there)."""
    kernels()
    return _active.tiled_layers


def group_quant_tiles_high() -> bool:
    """Whether `group_quant_tiles` takes 5-bit tiles (their fifth-bit planes) at the level in use."""
    kernels()
    return _active.tiles_high


def group_quant_tiles(x: torch.Tensor, tiles: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                      high: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [rows, K] @ a 4- or 5-bit weight in row tiles of 16 → float32 [rows, padded N], for steps of up to
    `group_quant_max_rows(tiled=True)` rows."""
    k = _cpu(x)
    if k is None or x.shape[0] > _active.tile_rows or (high is not None and not _active.tiles_high):
        return None
    return k.gq_tiles_linear(x, tiles, d, m, high)


def group_quant_pack(weight: torch.Tensor, bits: int) -> list[torch.Tensor] | None:
    """The native group fit of a float weight (codes, d, m[, high])."""
    k = _cpu(weight)
    return k.gq_pack(weight.detach(), bits) if k is not None else None


def group_quant_dequant(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, high: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor | None:
    """The dense [N, K] matrix of a packed weight, in `dtype`."""
    k = _cpu(codes)
    return k.gq_dequant(codes, d, m, high, dtype) if k is not None else None


def argmax_rows(x: torch.Tensor, bitmask: torch.Tensor | None = None, masked: list[int] | None = None
                ) -> torch.Tensor | None:
    """Row-wise argmax of logits [rows, vocab] (torch.argmax's answer: the first maximum, the first NaN):
    natively for float32 on CPU (10 us against torch's 145 us a row of 262k), else torch.argmax. The rows
    listed in `masked` count only the tokens allowed by their row of `bitmask` (int32 [rows, words],
    llguidance's layout): the argmax of those logits with the others at -inf, without writing them; None
    where no kernel can (the caller masks, then asks again without)."""
    k = _cpu(x) if x.dtype == torch.float32 and x.dim() == 2 else None
    if masked:
        if k is None or bitmask is None or bitmask.device.type != "cpu":
            return None
        return k.argmax_rows(x, bitmask, torch.tensor(masked, dtype=torch.long))
    return k.argmax_rows(x) if k is not None else x.argmax(dim=-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> bool:
    """-inf, in place, for the logits (float32 [rows, vocab]) of `rows` whose bit is clear in the same row of
    `bitmask` (int32 [rows, words], llguidance's layout); False where no kernel ran (use the torch path)."""
    k = _cpu(logits) if logits.dtype == torch.float32 and logits.is_contiguous() and bitmask.device.type == "cpu" \
        else None
    if k is None:
        return False
    k.apply_token_bitmask(logits, bitmask, rows)
    return True


def bind_threads(cpus: list[int]) -> list[int] | None:
    """Pin the calling thread's intra-op pool, thread i to cpus[i % n]; None without the kernels."""
    k = kernels()
    return k.bind_threads(cpus) if k is not None else None


def decode_projection(kind: str, a: torch.Tensor, b: torch.Tensor | None = None, c: torch.Tensor | None = None,
                      high: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      out_features: int = 0) -> object | None:
    """A linear layer's weights for `decode_layer`: `tiles` (a, b, c = tiles, d, m), `rows` (the general
    group-quantized layout: codes, d, m) or `dense` (a = the weight); None without the kernels."""
    k = _cpu(a)
    return k.make_projection(kind, a, b, c, high, bias, out_features) if k is not None else None


def decode_layer_plan() -> object | None:
    """An empty native plan of one decoder layer (csrc/decode_layer.h: fields filled by the caller)."""
    k = kernels()
    return k.DecodeLayerPlan() if k is not None else None


def decode_layer(plan: object, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_table: torch.Tensor, lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 next_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of a decode step in one native call: (new residual, the next block's input). The
    caller (models/layers/fused_decode.py) has checked that `plan`'s kernels take this step."""
    return tuple(_active.kernels.decode_layer(plan, x, h, positions, slots, block_table, lens, k_cache, v_cache,
                                              next_norm))
