"""GGUF files: their metadata as an HF-style config.

`read_gguf` opens the file (tensors stay memory-mapped until iterated, see `gguf_weights`), checks that
its architecture and tensor types are supported, and translates the `{arch}.*` metadata into the
transformers config of that architecture, as transformers' own GGUF loader does. llama3 rope parameters,
which llama.cpp stores as per-frequency factors, are recovered from those factors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from tokenloom.loader.gguf_file import GGUFContents, GGUFFormatError, GGUFTensor, read_gguf_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})


class GGUFError(ValueError):
    """A GGUF file that cannot be used: not GGUF, truncated, corrupt, or of an unsupported kind."""


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file: its metadata as an HF config, plus its memory-mapped tensors."""

    path: Path
    architecture: str
    config: PretrainedConfig
    chat_template: str | None
    tensors: list[GGUFTensor] = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    metadata_sha256: str = ""  # of the file's header and metadata; keys what is derived from them


class _Meta:
    """`{arch}.key` lookups over the file's metadata, with float32 values rounded to their shortest form."""

    def __init__(self, arch: str, md: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.arch, self.md, self.tensors = arch, md, tensors

    def __call__(self, key: str, default: Any = None) -> Any:
        value = self.md.get(f"{self.arch}.{key}", default)
        return float(str(np.float32(value))) if isinstance(value, float) else value

    def ids(self) -> dict[str, int | None]:
        """Special token ids as HF configs name them (None where the file has none)."""
        return {f"{n}_token_id": self.md.get(f"tokenizer.ggml.{k}_token_id")
                for n, k in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}

    def vocab_size(self) -> int:
        """Rows of the embedding matrix (the token list may be shorter or padded)."""
        return int(self.tensors["token_embd.weight"].shape[0])

    def has(self, name: str) -> bool:
        """Whether the file holds a tensor of this GGUF name."""
        return name in self.tensors


def _rope_scaling(m: _Meta, theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = m("rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": m("rope.scaling.factor")}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = m("rope.scaling.original_context_length")
        return scaling
    if m.has("rope_freqs.weight"):  # llama3: llama.cpp stores per-frequency factors, not the parameters
        freqs = np.asarray(m.tensors["rope_freqs.weight"].data, dtype=np.float64)
        return _llama3_scaling(freqs, theta, head_dim)
    return None


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover llama3 rope parameters from llama.cpp's factors (it assumes an 8192 original context)."""
    factor, old_ctx, low, high = float(freqs.max()), 8192, 1.0, 4.0
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    if mid.sum() >= 2:  # factor = 1 / ((1 - s) / f + s), s linear in old_ctx / wavelen
        smooth = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
        slope, low = np.polyfit(smooth, old_ctx / wavelen[mid], 1)
        high = low + slope
    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": round(float(low), 3),
            "high_freq_factor": round(float(high), 3), "original_max_position_embeddings": old_ctx}


def _decoder_fields(m: _Meta) -> dict[str, Any]:
    hidden, heads = m("embedding_length"), m("attention.head_count")
    head_dim = m("attention.key_length") or m("rope.dimension_count") or hidden // heads
    theta = m("rope.freq_base", 10000.0)
    return dict(vocab_size=m.vocab_size(), hidden_size=hidden, intermediate_size=m("feed_forward_length"),
                num_hidden_layers=m("block_count"), num_attention_heads=heads,
                num_key_value_heads=m("attention.head_count_kv", heads), head_dim=head_dim,
                rms_norm_eps=m("attention.layer_norm_rms_epsilon"), rope_theta=theta,
                rope_scaling=_rope_scaling(m, theta, head_dim), max_position_embeddings=m("context_length"),
                tie_word_embeddings=not m.has("output.weight"), **m.ids())


def _llama_config(m: _Meta) -> PretrainedConfig:
    from transformers import LlamaConfig
    return LlamaConfig(**_decoder_fields(m), attention_bias=m.has("blk.0.attn_q.bias"),
                       mlp_bias=m.has("blk.0.ffn_up.bias"), architectures=["LlamaForCausalLM"])


def _qwen2_config(m: _Meta) -> PretrainedConfig:
    from transformers import Qwen2Config
    fields = _decoder_fields(m)
    del fields["head_dim"]  # Qwen2 has none: always hidden / heads
    return Qwen2Config(**fields, architectures=["Qwen2ForCausalLM"])


def _qwen3_config(m: _Meta) -> PretrainedConfig:
    from transformers import Qwen3Config
    return Qwen3Config(**_decoder_fields(m), attention_bias=m.has("blk.0.attn_q.bias"),
                       architectures=["Qwen3ForCausalLM"])


def _gemma3_config(m: _Meta) -> PretrainedConfig:
    from transformers import Gemma3TextConfig
    fields = _decoder_fields(m)
    n_layers, pattern = fields["num_hidden_layers"], m("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer converters: one flag per layer
        layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    else:  # llama.cpp's built-in rule: every 6th layer is global
        layer_types = ["full_attention" if (i + 1) % (pattern or 6) == 0 else "sliding_attention"
                       for i in range(n_layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(hidden / heads)
    scalar = fields["hidden_size"] // fields["num_attention_heads"] if n_layers == 62 else fields["head_dim"]
    return Gemma3TextConfig(**fields, sliding_window=m("attention.sliding_window"), layer_types=layer_types,
                            rope_local_base_freq=m("rope.freq_base_swa", 10000.0), query_pre_attn_scalar=scalar,
                            final_logit_softcapping=m("final_logit_softcapping"),
                            attn_logit_softcapping=m("attn_logit_softcapping"),
                            architectures=["Gemma3ForCausalLM"])


def _gpt2_config(m: _Meta) -> PretrainedConfig:
    from transformers import GPT2Config
    hidden, ff = m("embedding_length"), m("feed_forward_length")
    tied = not m.has("output.weight") or np.array_equal(  # llama.cpp always writes a copy of wte
        m.tensors["output.weight"].data, m.tensors["token_embd.weight"].data)
    return GPT2Config(vocab_size=m.vocab_size(), n_positions=m("context_length"), n_embd=hidden,
                      n_layer=m("block_count"), n_head=m("attention.head_count"),
                      n_inner=None if ff in (None, 4 * hidden) else ff,
                      layer_norm_epsilon=m("attention.layer_norm_epsilon"), tie_word_embeddings=bool(tied),
                      architectures=["GPT2LMHeadModel"], **{k: v for k, v in m.ids().items() if k != "pad_token_id"})


# The architectures a GGUF file may declare (`general.architecture`), each with its config translation;
# `gguf_weights.LAYOUTS` holds how each one's tensors are named and stored.
CONFIGS: dict[str, Callable[[_Meta], PretrainedConfig]] = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "qwen3": _qwen3_config,
    "gemma3": _gemma3_config,
    "gpt2": _gpt2_config,
}


def _open(path: Path) -> GGUFContents:
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF' ({size} bytes)")
    try:
        return read_gguf_file(path)
    except (GGUFFormatError, UnicodeDecodeError, struct.error, ValueError) as exc:
        raise GGUFError(f"{path} is truncated or corrupt ({size} bytes): {exc}") from exc


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file's metadata into an HF config; weights stay in the file until iterated."""
    path = Path(path)
    md, tensor_list, metadata_sha256 = _open(path)
    arch = md.get("general.architecture")
    if arch not in CONFIGS:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(CONFIGS)})")
    tensors = {t.name: t for t in tensor_list}
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in tensor_list if t.tensor_type not in SUPPORTED_TYPES})
    if bad:
        supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
        raise GGUFError(f"{path}: unsupported tensor types: {', '.join(bad[:5])}; supported: {supported}")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    try:
        config = CONFIGS[arch](_Meta(arch, md, tensors))
    except (KeyError, TypeError, ValueError) as exc:
        raise GGUFError(f"{path}: incomplete {arch} metadata: {exc!r}") from exc
    return GGUFCheckpoint(path, arch, config, md.get("tokenizer.chat_template"), tensor_list, md, metadata_sha256)
