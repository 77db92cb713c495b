"""GGUF files: HF-style config, HF-named float weights, and the embedded tokenizer.

llama.cpp's converter renames tensors and changes a few of them on the way in; we undo exactly that,
as transformers' own GGUF loader does: Llama Q/K rows are permuted for its rotary layout, Gemma stores
every RMSNorm weight as `w + 1`, and GPT-2's Conv1D weights are transposed to `[out, in]`. Qwen2/3 and
Gemma 3 are written without the permutation. Shapes come out in torch order (GGUF lists them reversed).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from tokenloom.loader.dequant import code_bits, dequantize, group_codes
from tokenloom.loader.gguf_file import GGUFContents, GGUFFormatError, GGUFTensor, read_gguf_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tokenloom.loader.tokenizer import Tokenizer
    from tokenloom.models.layers.quantized import GroupQuantWeight

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: folded into config.rope_scaling instead
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


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


# --- config ---------------------------------------------------------------------------------------

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


# --- names and transforms -------------------------------------------------------------------------

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
class _Arch:
    config: Callable[[_Meta], PretrainedConfig]
    top: dict[str, str]
    block: dict[str, str]
    block_prefix: str = "model.layers."
    permute_qk: bool = False  # llama.cpp's rotary row order (LlamaModel.permute)
    norm_shift: float = 0.0  # Gemma: norm weights stored as w + 1
    transposed: frozenset[str] = frozenset()  # GPT-2 Conv1D weights, stored [out, in]


ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch(_llama_config, _LLAMA_TOP, _LLAMA_BLOCK, permute_qk=True),
    "qwen2": _Arch(_qwen2_config, _LLAMA_TOP, _LLAMA_BLOCK),
    "qwen3": _Arch(_qwen3_config, _LLAMA_TOP, _LLAMA_BLOCK),
    "gemma3": _Arch(_gemma3_config, _LLAMA_TOP, _GEMMA3_BLOCK, norm_shift=1.0),
    "gpt2": _Arch(_gpt2_config, _GPT2_TOP, _GPT2_BLOCK, block_prefix="transformer.h.",
                  transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
}


def _hf_name(spec: _Arch, name: str) -> tuple[str, str] | None:
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
    spec, cfg = ARCHITECTURES[ckpt.architecture], ckpt.config
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
        self.spec = ARCHITECTURES[ckpt.architecture]
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
        from tokenloom.models.layers.quantized import concat_group_quant, pack_group_codes

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


# --- reading --------------------------------------------------------------------------------------

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
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in tensor_list}
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in tensor_list if t.tensor_type not in SUPPORTED_TYPES})
    if bad:
        supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
        raise GGUFError(f"{path}: unsupported tensor types: {', '.join(bad[:5])}; supported: {supported}")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    try:
        config = ARCHITECTURES[arch].config(_Meta(arch, md, tensors))
    except (KeyError, TypeError, ValueError) as exc:
        raise GGUFError(f"{path}: incomplete {arch} metadata: {exc!r}") from exc
    return GGUFCheckpoint(path, arch, config, md.get("tokenizer.chat_template"), tensor_list, md, metadata_sha256)


# --- tokenizer ------------------------------------------------------------------------------------

_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def gguf_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    """The file's tokenizer, as transformers' GGUF path builds it from the metadata already parsed.

    The conversion is slow for large vocabularies, so its result is cached on disk (see
    `tokenloom.loader.cache`) and later loads read it back; an unreadable entry is rebuilt.
    """
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from tokenloom.loader import cache
    from tokenloom.loader.tokenizer import FALLBACK_CHAT_TEMPLATES, Tokenizer

    hf_class = TOKENIZER_MAPPING.get(type(ckpt.config), TokenizersBackend)
    identity = cache.tokenizer_identity(ckpt.path, ckpt.metadata_sha256,
                                        f"{hf_class.__module__}.{hf_class.__qualname__}")
    hf = None
    if found := cache.find_tokenizer(identity):
        try:
            hf = _from_file(hf_class, *found)
        except Exception as exc:  # a damaged entry must not stop the load: build it again
            logger.warning("rebuilding the cached tokenizer %s: %s: %s", found[0], type(exc).__name__, exc)
    if hf is None:
        hf = _convert_and_load(ckpt, hf_class, identity)
    extra_eos = []
    if ckpt.architecture.startswith("gemma"):
        end_of_turn = hf.backend_tokenizer.token_to_id("<end_of_turn>")
        extra_eos = [end_of_turn] if end_of_turn is not None else []
    template = ckpt.chat_template or FALLBACK_CHAT_TEMPLATES.get(ckpt.architecture)
    return Tokenizer(hf, chat_template=template, extra_eos_token_ids=extra_eos)


def _convert_and_load(ckpt: GGUFCheckpoint, hf_class: type, identity: dict[str, Any]) -> Any:
    """Convert the vocabulary, store it in the cache (or a temporary folder where the cache is not
    writable) and load it from there: one way to construct it, whether cached or not."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from tokenloom.loader import cache

    md = ckpt.metadata
    tok, tok_config = ({name: md[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in md}
                       for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
    if "tokens" not in tok:
        raise GGUFError(f"{ckpt.path}: no tokenizer.ggml.tokens in the metadata, so no tokenizer")
    if tok.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(ckpt.architecture, tok)
    except ValueError as exc:
        raise GGUFError(f"{ckpt.path}: {exc}") from exc
    kwargs = {**tok_config, **extra}
    try:
        meta = {"kwargs": kwargs, "model_vocab_size": backend.get_vocab_size(with_added_tokens=False)}
        json.dumps(meta)
    except (TypeError, ValueError):  # options that do not survive JSON: no cache, the slow in-memory way
        return hf_class(tokenizer_object=backend, **kwargs)
    backend_json = backend.to_str()
    try:
        return _from_file(hf_class, *cache.store_tokenizer(identity, backend_json, meta))
    except OSError as exc:
        logger.warning("cannot cache the tokenizer under %s (%s)", cache.cache_root(), exc)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(backend_json, encoding="utf-8")
        return _from_file(hf_class, Path(tmp) / "tokenizer.json", meta)


def _from_file(hf_class: type, path: Path, meta: dict[str, Any]) -> Any:
    """The HF tokenizer over a saved backend; the same result as passing the backend object, without
    the deep copy of it that transformers makes then."""
    if not path.is_file():  # transformers would quietly fall back to a near-empty vocabulary
        raise FileNotFoundError(path)
    hf = hf_class(tokenizer_file=str(path), **meta["kwargs"])
    if hf.backend_tokenizer.get_vocab_size(with_added_tokens=False) != meta["model_vocab_size"]:
        raise ValueError(f"{path} holds {hf.backend_tokenizer.get_vocab_size(with_added_tokens=False)} tokens, "
                         f"not {meta['model_vocab_size']}")
    return hf
