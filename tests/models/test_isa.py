"""Instruction-set levels: what the CPU reports, `TOKENLOOM_ISA`, what each level's build may contain, the
aarch64 build (cross-compiled), and the defaults chosen per machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tokenloom.config import CacheConfig, ModelConfig
from tokenloom.models import ops
from tokenloom.models.ops import isa
from tokenloom.models.ops.native import CSRC, sources


def test_levels_are_ordered_and_the_request_is_honoured_only_when_supported(monkeypatch, caplog):
    levels = isa.supported_levels()
    assert levels[0] == "portable" and isa.best_level() == levels[-1]
    assert list(levels) == [lvl for lvl in isa.LEVELS.get(isa.architecture(), ("portable",)) if lvl in levels]
    monkeypatch.setenv(isa.ISA_ENV, "portable")
    assert isa.requested_level() == "portable" and not isa.native_bf16()
    monkeypatch.setenv(isa.ISA_ENV, "sse9")
    assert isa.requested_level() == isa.best_level()
    assert "TOKENLOOM_ISA=sse9 ignored (unknown level" in caplog.text
    foreign = "neon" if isa.architecture() == "x86_64" else "avx2"
    monkeypatch.setenv(isa.ISA_ENV, foreign)
    assert isa.requested_level() == isa.best_level()
    assert "this CPU does not support it" in caplog.text


def test_a_level_needs_every_feature_it_compiles_for(monkeypatch):
    """An AVX-512 CPU without VNNI/BF16 (Skylake-X) runs the avx2 level; one without FMA only portable."""
    monkeypatch.setattr(isa, "architecture", lambda: "x86_64")
    skylake = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq",
               "avx512vl"}
    for flags, want in ((skylake, ("portable", "avx2")), (skylake | isa._REQUIRED["avx512"], ("portable", "avx2",
                        "avx512")), ({"avx", "avx2", "f16c"}, ("portable",))):
        monkeypatch.setattr(isa, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert isa.supported_levels() == want
    monkeypatch.setattr(isa, "architecture", lambda: "aarch64")
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"fp", "asimd", "asimddp"}))
    assert isa.supported_levels() == ("portable", "neon")
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"fp", "asimd"}))  # Cortex-A72: no dot product
    assert isa.supported_levels() == ("portable",)


def test_each_level_reports_itself_and_the_ops_follow_it(kernels):
    assert kernels.isa_level() == ops.level_in_use()
    assert kernels.gq_linear_native() == (ops.level_in_use() != "portable")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_lower_levels_hold_no_instruction_of_a_higher_one(kernels):
    """The avx2 build must run on a CPU without AVX-512 (no zmm register anywhere), the portable build on
    any x86-64 (no ymm either)."""
    level = kernels.isa_level()
    if level not in ("portable", "avx2"):
        pytest.skip(f"nothing above {level}")
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", kernels.__file__], capture_output=True, text=True,
                          check=True).stdout
    assert "%zmm" not in code
    if level == "portable":
        assert "%ymm" not in code


def test_dtype_auto_is_float32_where_bf16_is_emulated():
    config = ModelConfig()
    assert config.torch_dtype(None, bf16_fast=True) == torch.bfloat16
    assert config.torch_dtype(None, bf16_fast=False) == torch.float32
    assert config.torch_dtype(torch.float16, bf16_fast=False) == torch.float32
    assert config.torch_dtype(torch.float32, bf16_fast=True) == torch.float32
    assert ModelConfig(dtype="bfloat16").torch_dtype(None, bf16_fast=False) == torch.bfloat16  # asked for: kept
    assert ops.bf16_is_fast(torch.device("cpu")) == (isa.requested_level() == "avx512")


def test_kv_cache_dtype_auto_is_float16_for_quantized_float32_models_on_a_cpu():
    """llama.cpp's default f16 cache where activations are float32 and weights quantized; an unquantized float32
    model keeps float32 (compared with transformers), bf16 keeps bf16, a GPU keeps the model's dtype."""
    auto, cpu, cuda = CacheConfig(), torch.device("cpu"), torch.device("cuda")
    assert auto.torch_dtype(torch.float32, True, cpu) == torch.float16
    assert auto.torch_dtype(torch.float32, False, cpu) == torch.float32
    assert auto.torch_dtype(torch.bfloat16, True, cpu) == torch.bfloat16
    assert auto.torch_dtype(torch.float32, True, cuda) == torch.float32
    assert CacheConfig(kv_cache_dtype="float32").torch_dtype(torch.float32, True, cpu) == torch.float32  # asked for


CROSS = "aarch64-linux-gnu-g++"


AARCH64_LEVELS = ("neon", "portable")


def _aarch64_flags(level: str, work: Path) -> list[str]:
    """The level's cross-compile flags, with a precompiled header of the ATen headers every source includes
    (built in `work`): parsing those is ~80% of each file's check."""
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++17", "-O2", "-fopenmp", *isa.CFLAGS[level], *(f"-I{p}" for p in include_paths()), f"-I{CSRC}"]
    header = work / level / "aten.h"
    header.parent.mkdir(parents=True)
    header.write_text("#include <ATen/ATen.h>\n#include <ATen/Dispatch.h>\n#include <ATen/Parallel.h>\n")
    built = subprocess.run([CROSS, *flags, "-x", "c++-header", str(header), "-o", f"{header}.gch"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    return [*flags, "-include", str(header), "-Winvalid-pch", "-fsyntax-only"]


@pytest.mark.skipif(isa.architecture() == "aarch64" or shutil.which(CROSS) is None,
                    reason="needs Debian's aarch64 cross compiler (g++-aarch64-linux-gnu) on an x86-64 machine")
def test_every_kernel_compiles_for_aarch64(tmp_path):
    """The NEON paths cannot run here; each source must compile for aarch64 with each level's flags, and at the
    neon level isa.h must select them. Both levels' files go through one pool (CI's time is bounded)."""
    files: list[Path] = [p for p in sources() if p.name != "ops.cpp"]  # ops.cpp: bindings (Python.h)
    jobs: list[tuple[str, Path]] = []
    for level in AARCH64_LEVELS:
        check = tmp_path / f"{level}.cpp"
        wrong = "!defined(TOKENLOOM_NEON)" if level == "neon" else "defined(TOKENLOOM_NEON)"
        check.write_text(f'#include "isa.h"\n#if {wrong}\n#error "isa.h selected the wrong level"\n#endif\n')
        jobs += [(level, path) for path in (check, *files)]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        flags = dict(zip(AARCH64_LEVELS, pool.map(lambda level: _aarch64_flags(level, tmp_path), AARCH64_LEVELS)))

        def compile_one(job: tuple[str, Path]) -> tuple[str, str, subprocess.CompletedProcess]:
            level, path = job
            return level, path.name, subprocess.run([CROSS, *flags[level], str(path)], capture_output=True, text=True)

        failed = [(level, name, r.stderr[-2000:]) for level, name, r in pool.map(compile_one, jobs)
                  if r.returncode != 0]
    assert not failed, failed
