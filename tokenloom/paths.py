"""Where tokenloom keeps files of its own (compiled kernels, converted tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """tokenloom's cache folder: `TOKENLOOM_CACHE`, else ~/.cache/tokenloom."""
    return Path(os.environ.get("TOKENLOOM_CACHE") or Path.home() / ".cache" / "tokenloom")
