"""The native CPU kernels (csrc/), compiled once per instruction-set level and cached.

Each level (portable, avx2, avx512, neon; see `isa.py`) is its own extension module built with that
level's fixed flags, so a cache folder (or a wheel) made on one machine runs correctly on any other:
a process loads only the level its CPU runs, and builds it on first use (30-60 s with the machine's
C++ compiler; later processes import the cached library in milliseconds). A build is keyed by the
sources, the flags, the architecture and the torch version. Where no compiler is available, the build
fails, or `TOKENLOOM_KERNELS=0` is set, there is no module and every op takes its torch path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from tokenloom.models.ops import isa
from tokenloom.paths import cache_root

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "layers" / "csrc"
_BASE_CFLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def cache_dir() -> Path:
    """Where compiled kernels live: `kernels/` in tokenloom's cache (`TOKENLOOM_CACHE`, default
    ~/.cache/tokenloom)."""
    return cache_root() / "kernels"


def sources() -> list[Path]:
    """The kernel sources, every level compiles all of them."""
    return sorted(CSRC.glob("*.cpp"))


def kernels_enabled() -> bool:
    """False when `TOKENLOOM_KERNELS=0` turns the native kernels off."""
    return os.environ.get("TOKENLOOM_KERNELS", "1") != "0"


def load_level(level: str) -> ModuleType | None:
    """The kernel module compiled for `level` (built on first use), or None where kernels are off, the
    CPU cannot run that level, or it cannot be built."""
    if not kernels_enabled() or level not in isa.supported_levels():
        return None
    with _lock:  # two threads asking at once build once
        if level not in _built:
            _built[level] = _build(level)
        return _built[level]


def _build(level: str) -> ModuleType | None:
    cflags = _BASE_CFLAGS + isa.CFLAGS[level]
    files = sources() + sorted(CSRC.glob("*.h"))
    key = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files) + " ".join(cflags).encode()
                         + torch.__version__.encode() + isa.architecture().encode())
    name = f"tokenloom_cpu_{level}_{key.hexdigest()[:12]}"
    build_dir = cache_dir() / name
    try:
        built = next(build_dir.glob(f"{name}*.so"), None)
        if built is not None:
            return _import(name, built)
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("compiling the %s CPU kernels (once, 30-60 s) into %s", level, build_dir)
        return load(name, [str(p) for p in sources()], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir))
    except Exception as exc:  # no compiler, flags it does not know, ...: the torch-ops paths still work
        logger.warning("%s CPU kernels unavailable (%s: %s); using the torch-ops paths", level,
                       type(exc).__name__, exc)
        return None


def _import(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
