"""Bad model references and broken checkpoints fail with clear errors; the CLI streams and reports errors."""

from __future__ import annotations

import shutil

import pytest

from tokenloom.cli import main
from tokenloom.config import ConfigError
from tokenloom.llm import LLM
from tokenloom.loader.gguf_config import GGUFError
from tokenloom.loader.hf import CheckpointError
from tokenloom.loader.sources import ModelNotFoundError, resolve_model


def test_unknown_model_reference_lists_what_was_tried():
    with pytest.raises(ModelNotFoundError) as info:
        LLM("no-such-model-anywhere")
    message = str(info.value)
    assert "no-such-model-anywhere" in message and "gemma-3-270m" in message


def test_truncated_gguf_fails_clearly(tmp_path):
    real = resolve_model("gemma-3-270m").path
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as src:
        cut.write_bytes(src.read(3_000_000))
    with pytest.raises(GGUFError, match="cut.gguf"):
        LLM(str(cut))


def test_corrupt_safetensors_fails_clearly(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(str(broken))


def test_bad_engine_option_names_the_option(tiny_models):
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        LLM(str(tiny_models["llama"]), kv_cache_gib=-1)
    with pytest.raises(ConfigError, match="no_such_option"):
        LLM(str(tiny_models["llama"]), no_such_option=1)
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        LLM(str(tiny_models["llama"]), kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="kv_cache_dtype float32 is wider than the model's bfloat16"):
        LLM(str(tiny_models["llama"]), dtype="bfloat16", kv_cache_dtype="float32", kv_cache_gib=0.01)


def test_cli_generate_streams_text(tiny_models, capsys):
    rc = main(["generate", "-m", str(tiny_models["qwen2"]), "Hello", "--max-tokens", "8",
               "--temperature", "0", "--dtype", "float32", "--kv-cache-gib", "0.01"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("Hello") and len(out.out) > len("Hello")


def test_cli_reports_bad_input_without_traceback(tiny_models, capsys):
    rc = main(["generate", "-m", str(tiny_models["qwen2"]), "Hello", "--top-p", "7", "--kv-cache-gib", "0.01"])
    err = capsys.readouterr().err
    assert rc == 2 and "top_p" in err and "Traceback" not in err
    rc = main(["generate", "-m", "nowhere-model", "Hi"])
    assert rc == 2 and "nowhere-model" in capsys.readouterr().err


def test_cli_chat_reads_input_that_is_not_utf8(tiny_models):
    """Bytes that are not UTF-8 on stdin (a terminal in another encoding) are read with U+FFFD, not a crash."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tokenloom.cli", "chat", "-m", str(tiny_models["qwen2"]),
                           "--max-tokens", "4", "--kv-cache-gib", "0.01", "--dtype", "float32"],
                          input=b"caf\xe9 \xff\xfe\n\n", capture_output=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in proc.stderr and b"assistant> " in proc.stdout
