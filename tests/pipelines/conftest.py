"""Models shared by the pipeline tests (loaded once per session) and a YAML writer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tokenloom.llm import LLM


@pytest.fixture(scope="session")
def tiny_llm(tiny_models) -> LLM:
    """The tiny random Llama, float32, with a short context so a long prompt can overflow it."""
    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.02, max_model_len=128, num_threads=1)


@pytest.fixture(scope="session")
def gemma() -> LLM:
    """The real gemma-3-270m, dense float32 (not the machine's defaults), so that results computed in
    different batches or from the prefix cache agree to float32 rounding on every CPU: bf16 GEMMs differ
    by batch shape (e.g. on AMX), and quantized steps of up to 8 rows round activations to int8 where
    larger ones do not."""
    return LLM("gemma-3-270m", dtype="float32", quantization="none", kv_cache_gib=0.25)


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write a (dedented) pipeline YAML into the test's folder and return its path."""
    def write(text: str, name: str = "pipeline.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path
    return write
