"""The CPU's instruction-set level: what the running processor reports, and the level the kernels use.

Levels, lowest first, per architecture (csrc/isa.h says what each compiles to):
- x86-64: `portable` < `avx2` (x86-64-v3: AVX2, FMA, F16C, BMI2) < `avx512` (x86-64-v4 with
  AVX512_VNNI, AVX512_BF16 and AVX512_VBMI: Zen 4, Sapphire Rapids and later; AVX-512 CPUs without
  them, such as Skylake-X, run the avx2 level);
- aarch64: `portable` < `neon` (NEON with the dot-product extension, armv8.2-a+dotprod: Apple M1 and
  later, Graviton 2 and later, Ampere Altra).
`TOKENLOOM_ISA` picks a lower level than the best one (tests and benchmarks use it to run the AVX2
path on an AVX-512 machine); a level the CPU lacks is refused with a warning, never run.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

ISA_ENV = "TOKENLOOM_ISA"
LEVELS = {"x86_64": ("portable", "avx2", "avx512"), "aarch64": ("portable", "neon")}
# /proc/cpuinfo flags each level needs (on top of the levels below it).
_REQUIRED = {
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16",
               "avx512vbmi"},
    "neon": {"asimd", "asimddp"},
}
# Compiler flags of each level: fixed, never -march=native, so a cached build runs on any CPU of its level.
CFLAGS = {
    "portable": [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi"],
    "neon": ["-march=armv8.2-a+dotprod+fp16"],
}


def architecture() -> str:
    """`x86_64`, `aarch64` or another machine name (which has only the portable level)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set features the CPU reports (Linux: /proc/cpuinfo; macOS on ARM: sysctl)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin" and architecture() == "aarch64":
        return frozenset({"asimd", "asimddp"} if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else {"asimd"})
    return frozenset()


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def supported_levels() -> tuple[str, ...]:
    """Every level this CPU can run, lowest first (always at least `portable`)."""
    levels = LEVELS.get(architecture(), ("portable",))
    flags, out = cpu_flags(), ["portable"]
    for level in levels[1:]:
        if not _REQUIRED[level] <= flags:
            break
        out.append(level)
    return tuple(out)


def best_level() -> str:
    """The highest level the CPU supports."""
    return supported_levels()[-1]


def requested_level() -> str:
    """The level to run: `TOKENLOOM_ISA` where set and supported, else the best one."""
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    supported = supported_levels()
    if not wanted or wanted == "auto":
        return supported[-1]
    if wanted not in supported:
        known = sorted({lvl for levels in LEVELS.values() for lvl in levels})
        reason = "unknown level" if wanted not in known else "this CPU does not support it"
        logger.warning("%s=%s ignored (%s; this CPU runs %s); using %s", ISA_ENV, wanted, reason,
                       ", ".join(supported), supported[-1])
        return supported[-1]
    return wanted


def native_bf16() -> bool:
    """Whether the level in use multiplies bf16 natively (AVX512_BF16 here; AMX and ARM's BF16 are not
    used by our kernels yet): elsewhere bf16 arithmetic is emulated and slow, so float32 is the default."""
    return requested_level() == "avx512"


def describe() -> dict[str, object]:
    """The architecture, the CPU's best level and every level it runs (`ops.describe` adds the level in use)."""
    return {"architecture": architecture(), "cpu_isa": best_level(), "supported": list(supported_levels())}
