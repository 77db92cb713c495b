"""Native CPU kernels (csrc/), compiled with the machine's C++ compiler on first use and cached.

The build is keyed by the source, the flags and the torch version, so a changed kernel or a new torch
rebuilds it; later processes import the cached library directly (milliseconds, no compiler). Where no
compiler is available, or `TOKENLOOM_KERNELS=0` is set, callers get None and use their torch-ops path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from tokenloom.paths import cache_root

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("paged_attention.cpp", "rms_norm.cpp", "fused.cpp", "group_quant.cpp",
                                      "gq_tiles.cpp", "bf16_rows.cpp", "argmax.cpp", "threads.cpp", "ops.cpp")]
_HEADERS = [_CSRC / "norm_row.h", _CSRC / "quant_group.h"]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def cache_dir() -> Path:
    """Where compiled kernels live: `kernels/` in tokenloom's cache (`TOKENLOOM_CACHE`, default
    ~/.cache/tokenloom)."""
    return cache_root() / "kernels"


@cache
def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module (`paged_decode_attention`, `rms_norm`, `gq_linear`), or None where it is disabled
    or cannot be built."""
    if os.environ.get("TOKENLOOM_KERNELS", "1") == "0":
        return None
    key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + " ".join(_CFLAGS).encode()
                         + torch.__version__.encode() + _cpu_identity().encode())
    name = f"tokenloom_cpu_kernels_{key.hexdigest()[:12]}"
    build_dir = cache_dir() / name
    try:
        built = next(build_dir.glob(f"{name}*.so"), None)
        if built is not None:
            return _import(name, built)
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("compiling the CPU kernels (once, 30-60 s) into %s", build_dir)
        return load(name, [str(p) for p in _SOURCES], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir))
    except Exception as exc:  # no compiler, unsupported flags, ...: the torch-ops path still works
        logger.warning("CPU kernels unavailable (%s: %s); using the torch-ops paths",
                       type(exc).__name__, exc)
        return None


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: -march=native code must not run on another CPU
    (a cache directory can be shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _import(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
