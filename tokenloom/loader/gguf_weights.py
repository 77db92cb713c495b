"""GGUF files: HF-named weights, float or (for `quantize_model`) as the file's own quantized blocks.

llama.cpp's converter renames tensors and changes a few of them on the way in; we undo exactly that,
as transformers' own GGUF loader does: Llama Q/K rows are permuted for its rotary layout, Gemma stores
every RMSNorm weight as `w + 1`, and GPT-2's Conv1D weights are transposed to `[out, in]`. Qwen2/3 and
Gemma 3 are written without the permutation. Shapes come out in torch order (GGUF lists them reversed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenloom.loader.dequant import code_bits, dequantize, group_codes
from tokenloom.loader.gguf_config import CONFIGS, GGUFCheckpoint, GGUFError, Q
from tokenloom.loader.gguf_file import GGUFTensor

if TYPE_CHECKING:
    from tokenloom.models.layers.group_quant import GroupQuantWeight

_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: folded into config.rope_scaling instead
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GEMMA3_BLOCK = {**_LLAMA_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}


@dataclass(frozen=True)
class _Layout:
    """How an architecture's tensors are named in a GGUF file and what llama.cpp changed in them."""

    top: dict[str, str]
    block: dict[str, str]
    block_prefix: str = "model.layers."
    permute_qk: bool = False  # llama.cpp's rotary row order (LlamaModel.permute)
    norm_shift: float = 0.0  # Gemma: norm weights stored as w + 1
    transposed: frozenset[str] = frozenset()  # GPT-2 Conv1D weights, stored [out, in]


LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout(_LLAMA_TOP, _LLAMA_BLOCK, permute_qk=True),
    "qwen2": _Layout(_LLAMA_TOP, _LLAMA_BLOCK),
    "qwen3": _Layout(_LLAMA_TOP, _LLAMA_BLOCK),
    "gemma3": _Layout(_LLAMA_TOP, _GEMMA3_BLOCK, norm_shift=1.0),
    "gpt2": _Layout(_GPT2_TOP, _GPT2_BLOCK, block_prefix="transformer.h.",
                    transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
}
assert LAYOUTS.keys() == CONFIGS.keys(), "every architecture read_gguf accepts needs its tensor layout"


def _hf_name(spec: _Layout, name: str) -> tuple[str, str] | None:
    """(HF parameter name, GGUF base name such as 'attn_q'), or None for an unknown tensor."""
    if m := _BLOCK_RE.fullmatch(name):
        base = spec.block.get(m[2])
        return (f"{spec.block_prefix}{m[1]}.{base}.{m[3]}", m[2]) if base else None
    stem, _, suffix = name.rpartition(".")
    return (f"{spec.top[stem]}.{suffix}", stem) if stem in spec.top else None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: rows back from (head, 2, dim/2) to (head, dim/2, 2) order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor(t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    if t.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data))
    if t.tensor_type == Q.BF16:  # numpy has no bfloat16: raw bytes reinterpreted
        return torch.from_numpy(np.array(t.data)).view(torch.bfloat16)
    return dequantize(t.data, t.tensor_type, t.shape, dtype)


def iter_gguf_weights(ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) in HF layout.

    Quantized tensors come out in `dtype` (their float32 values rounded once, as copying them into a
    parameter of that dtype would); F32/F16/BF16 tensors keep the file's dtype.
    """
    spec, cfg = LAYOUTS[ckpt.architecture], ckpt.config
    for t in ckpt.tensors:
        if t.name in _SKIPPED:
            continue
        named = _hf_name(spec, t.name)
        if named is None:
            raise GGUFError(f"{ckpt.path}: tensor {t.name!r} has no counterpart in a {ckpt.architecture} model")
        hf_name, base = named
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        shifted = spec.norm_shift and base.endswith("norm")
        w = _tensor(t, torch.float32 if shifted else dtype)  # the shift is float32 arithmetic, rounded after
        if shifted:
            w = w.float() - spec.norm_shift
        if spec.permute_qk and base in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.num_attention_heads if base == "attn_q" else cfg.num_key_value_heads)
        if base in spec.transposed and w.dim() == 2:
            w = w.t().contiguous()
        yield hf_name, w


class GGUFExactWeights:
    """A GGUF file's block-quantized matrices, for `quantize_model` to repack instead of re-fitting
    (the `ExactWeights` protocol): looked up by HF parameter name, `lm_head.weight` being the token
    embedding of a tied model. Llama's Q/K rows are un-permuted as packed rows; GPT-2's transposed
    matrices have no exact counterpart (their blocks run along the other axis)."""

    _ROWS = 8192  # rows converted at a time (the temporaries of a 262k-row embedding)

    def __init__(self, ckpt: GGUFCheckpoint) -> None:
        self.ckpt = ckpt
        self.spec = LAYOUTS[ckpt.architecture]
        self.tensors: dict[str, tuple[GGUFTensor, str]] = {}
        for t in ckpt.tensors:
            named = _hf_name(self.spec, t.name) if t.name not in _SKIPPED else None
            if named is not None and named[1] not in self.spec.transposed:
                self.tensors[named[0]] = (t, named[1])
        if ckpt.config.tie_word_embeddings and "model.embed_tokens.weight" in self.tensors:
            self.tensors["lm_head.weight"] = self.tensors["model.embed_tokens.weight"]

    def native_bits(self, name: str) -> int | None:
        """4, 5 or 8 for a matrix stored in a block format the group layout holds exactly, else None."""
        entry = self.tensors.get(name)
        return code_bits(entry[0].tensor_type) if entry is not None and len(entry[0].shape) == 2 else None

    def pack(self, name: str, bits: int) -> GroupQuantWeight:
        """The matrix's codes, scales and minimums laid out at `bits` per code."""
        from tokenloom.models.layers.group_quant import concat_group_quant, pack_group_codes

        t, base = self.tensors[name]
        rows = t.shape[0]
        data = np.asarray(t.data).reshape(rows, -1)
        parts = [pack_group_codes(*group_codes(data[start:start + self._ROWS], t.tensor_type,
                                               min(self._ROWS, rows - start)), bits)
                 for start in range(0, rows, self._ROWS)]
        packed = concat_group_quant(parts)
        if self.spec.permute_qk and base in ("attn_q", "attn_k"):
            heads = self.ckpt.config.num_attention_heads if base == "attn_q" else self.ckpt.config.num_key_value_heads
            order = _unpermute(torch.arange(rows), heads)
            packed = type(packed)(*(f[order] if f is not None else None for f in packed))
        return packed
