"""Sentence embeddings from token hidden states: mean / CLS / last / max pooling, then optional L2 norm.

A sentence-transformers folder says how: `modules.json` lists the modules (Transformer, Pooling,
Normalize), the Pooling module's `config.json` the mode, `sentence_bert_config.json` the maximum
sequence length. Without those files: mean pooling, normalized (cosine similarity is then a dot
product, as with OpenAI embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenloom.models.layers.encoder_attention import EncoderMetadata

POOLING_MODES = ("mean", "cls", "last", "max", "mean_sqrt_len")
# 1_Pooling/config.json flags → our mode names
_ST_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


class PoolingConfigError(ValueError):
    """A sentence-transformers configuration we cannot reproduce; the message names the file."""


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """How token states become one vector, and the input limit the embedding model was trained with."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise PoolingConfigError(f"pooling mode must be one of {', '.join(POOLING_MODES)}; got {self.mode!r}")


def read_pooling_config(path: Path) -> PoolingConfig:
    """The pooling a model folder asks for (sentence-transformers files), else the defaults."""
    modules_file = path / "modules.json"
    max_len = _max_seq_length(path)
    if not modules_file.is_file():
        return PoolingConfig(max_seq_length=max_len)
    modules = json.loads(modules_file.read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    unknown = [m["type"] for m in modules if m["type"].rsplit(".", 1)[-1] not in _ST_MODULES]
    if unknown:
        raise PoolingConfigError(f"{modules_file}: modules {unknown} are not supported (only {', '.join(_ST_MODULES)})")
    mode = "mean"
    if "Pooling" in kinds:
        mode = _pooling_mode(path / kinds["Pooling"].get("path", "") / "config.json")
    return PoolingConfig(mode, "Normalize" in kinds, max_len)


def _pooling_mode(config_file: Path) -> str:
    data = json.loads(config_file.read_text())
    if isinstance(data.get("pooling_mode"), str):  # newer sentence-transformers spell the mode out
        return {"lasttoken": "last", "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(data["pooling_mode"],
                                                                                 data["pooling_mode"])
    modes = [mode for flag, mode in _ST_FLAGS.items() if data.get(flag)]
    other = [k for k, v in data.items() if k.startswith("pooling_mode_") and v and k not in _ST_FLAGS]
    if len(modes) != 1 or other:
        raise PoolingConfigError(f"{config_file}: exactly one of {', '.join(_ST_FLAGS)} must be true "
                                 f"(got {modes + other}); concatenated or weighted pooling is not supported")
    return modes[0]


def _max_seq_length(path: Path) -> int | None:
    file = path / "sentence_bert_config.json"
    if not file.is_file():
        return None
    value = json.loads(file.read_text()).get("max_seq_length")
    return int(value) if value else None


def with_overrides(config: PoolingConfig, mode: str | None, normalize: bool | None) -> PoolingConfig:
    """`config` with a caller's per-call choices applied (None keeps the model's own)."""
    return replace(config, mode=mode or config.mode, normalize=config.normalize if normalize is None else normalize)


def pool(hidden: torch.Tensor, meta: EncoderMetadata, config: PoolingConfig) -> torch.Tensor:
    """[tokens, hidden] packed states → [seqs, hidden] float32 sentence vectors."""
    hidden = hidden.float()
    if config.mode == "cls":
        out = hidden[meta.first_rows()]
    elif config.mode == "last":
        out = hidden[meta.last_rows()]
    elif config.mode == "max":
        out = hidden.new_full((meta.num_seqs, hidden.shape[1]), float("-inf"))
        out.scatter_reduce_(0, meta.seq_ids().unsqueeze(1).expand_as(hidden), hidden, "amax")
    else:
        sums = hidden.new_zeros((meta.num_seqs, hidden.shape[1])).index_add_(0, meta.seq_ids(), hidden)
        lens = torch.tensor(meta.seq_lens, dtype=hidden.dtype, device=hidden.device).unsqueeze(1)
        out = sums / (lens if config.mode == "mean" else lens.sqrt())
    return F.normalize(out, p=2, dim=-1) if config.normalize else out
