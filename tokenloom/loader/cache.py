"""What tokenloom keeps on disk to start fast: tokenizers converted from GGUF vocabularies, and
stamps of files already checked against their sha256.

Everything lives under `$TOKENLOOM_CACHE` (default `~/.cache/tokenloom`) and is only an optimisation:
an unreadable or unwritable cache means the slow path, never a failure.

Turning a GGUF vocabulary into a `tokenizers` tokenizer takes seconds (Gemma's 262k tokens: the BPE
merges are re-derived from the vocabulary), while loading the result from its `tokenizer.json` takes a
fraction of that. A tokenizer entry is a folder `tokenizers/<key>/` holding `tokenizer.json` and
`meta.json`; the key is a digest of the file's identity (absolute path, size, mtime, a hash of its
metadata) and of the versions that did the conversion, so a changed file or library gets a new entry.
Entries are written to a temporary folder and renamed into place, so readers never see half an entry;
entries of earlier versions of the same file are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenloom.paths import cache_root

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds, or how it is built, changes


def tokenizer_identity(path: Path, metadata_sha256: str, builder: str) -> dict[str, Any]:
    """What a converted tokenizer depends on: the file (path, size, mtime, metadata hash), the builder
    (tokenizer class) and the versions of the libraries that convert and load it."""
    import tokenizers
    import transformers

    stat = path.stat()
    return {"format": FORMAT, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "metadata_sha256": metadata_sha256, "builder": builder, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def _entry_dir(identity: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return cache_root() / "tokenizers" / digest[:32]


def find_tokenizer(identity: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """(path of the cached tokenizer.json, the metadata stored with it), or None when there is no
    usable entry for exactly this identity."""
    entry = _entry_dir(identity)
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the unreadable tokenizer cache entry %s (%s)", entry, exc)
        return None
    if not isinstance(meta, dict) or meta.get("identity") != identity or not (entry / "tokenizer.json").is_file():
        return None
    return entry / "tokenizer.json", meta


def store_tokenizer(identity: dict[str, Any], tokenizer_json: str, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Write an entry (replacing a broken one of the same identity) and return what `find_tokenizer` would.

    Raises OSError where the cache folder cannot be written."""
    entry = _entry_dir(identity)
    meta = {**meta, "identity": identity}
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")  # written last: marks it complete
        if entry.exists():  # broken (a usable one would have been found): move it aside, then replace it
            _remove(entry.rename(entry.with_name(f"{tmp.name}.old")))
        try:
            tmp.rename(entry)
        except OSError:
            if find_tokenizer(identity) is None:  # not another process's complete entry that won the race
                raise
    finally:
        _remove(tmp)
    _prune(entry, identity)
    return entry / "tokenizer.json", meta


_FILE_FIELDS = ("size", "mtime_ns", "metadata_sha256")


def _prune(keep: Path, identity: dict[str, Any]) -> None:
    """Remove the entries of earlier versions of the same file: no search can find them again.
    (Entries made by other library versions stay: another environment may share the cache.)"""
    for other in keep.parent.iterdir():
        if other.name.startswith(".") and _age(other) > 3600:  # left behind by a writer that died
            _remove(other)
        if other == keep or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            theirs = json.loads((other / "meta.json").read_text(encoding="utf-8"))["identity"]
            stale = theirs["path"] == identity["path"] and any(theirs[k] != identity[k] for k in _FILE_FIELDS)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge, or being written
        if stale:
            _remove(other)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- verified files -------------------------------------------------------------------------------

def _stamp(path: Path) -> Path:
    return cache_root() / "verified" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"


def _file_state(path: Path, sha256: str) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
            "sha256": sha256}


def is_verified(path: Path, sha256: str) -> bool:
    """Whether `path` was found to have this sha256 and is, by size, mtime and inode, unchanged since."""
    try:
        return json.loads(_stamp(path).read_text(encoding="utf-8")) == _file_state(path, sha256)
    except (OSError, ValueError):
        return False


def mark_verified(path: Path, sha256: str) -> None:
    """Record that `path`, as it is now, has this sha256 (best effort)."""
    stamp = _stamp(path)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=stamp.parent, prefix=".", suffix=".tmp", delete=False,
                                         encoding="utf-8") as f:
            f.write(json.dumps(_file_state(path, sha256)))
        os.replace(f.name, stamp)
    except OSError as exc:
        logger.debug("cannot record %s as verified: %s", path, exc)
