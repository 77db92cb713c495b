"""HF checkpoint folders: config.json, tokenizer files and safetensors (or pytorch_model.bin) weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tokenloom.loader.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint's files are missing or unreadable; the message names the file."""


def read_hf_config(path: Path) -> Any:
    """The folder's config.json as a transformers config object."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}") from exc


def weight_files(path: Path) -> list[Path]:
    """The weight files of a folder: sharded or single safetensors, else pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid weight index: {exc}") from exc
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise CheckpointError(f"{index} names missing shard files: {missing}")
            return [path / s for s in shards]
    for pattern in ("*.safetensors", "pytorch_model.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{path} has no *.safetensors or pytorch_model.bin weights")


def iter_hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every weight file, memory-mapped where the format allows."""
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
            yield from state.items()


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors file ({exc})") from exc


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint was saved in, from config.json."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def hf_tokenizer(path: Path) -> Tokenizer:
    """The folder's tokenizer, with generation_config.json's extra end-of-sequence ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {exc}") from exc
    extra: list[int] = []
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
    return Tokenizer(tok, extra_eos_token_ids=extra)
