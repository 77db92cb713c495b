"""resolve_model: local directories, .gguf files, the offline HF cache, aliases, and the errors."""

import os
from pathlib import Path

import pytest

from tokenloom.loader import sources
from tokenloom.loader.sources import ModelNotFoundError, ModelSource, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets an empty HF cache and a cwd of its own, so nothing real is found by accident."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _gguf_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 20)
    return path


def _snapshot(cache: Path, repo: str, rev: str, with_ref: bool = True) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = _hf_dir(folder / "snapshots" / rev)
    if with_ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(rev + "\n")
    return snap


def test_local_hf_directory(tmp_path):
    model_dir = _hf_dir(tmp_path / "my-model")
    assert resolve_model(str(model_dir)) == ModelSource("hf", model_dir, "my-model")
    assert resolve_model("my-model").path.resolve() == model_dir  # relative to cwd


def test_gguf_file(tmp_path):
    path = _gguf_file(tmp_path / "models" / "tiny-q8.gguf")
    assert resolve_model(str(path)) == ModelSource("gguf", path, "tiny-q8")


def test_gguf_magic_without_suffix(tmp_path):
    path = _gguf_file(tmp_path / "weights.bin")
    assert resolve_model(str(path)).kind == "gguf"


def test_directory_without_config_json(tmp_path):
    (tmp_path / "half").mkdir()
    _gguf_file(tmp_path / "half" / "a.gguf")
    with pytest.raises(ModelNotFoundError, match=r"without config\.json.*a\.gguf"):
        resolve_model(str(tmp_path / "half"))


def test_existing_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a gguf")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model(str(path))


def test_hf_cache_snapshot(tmp_path):
    _snapshot(tmp_path / "hub", "org/tiny", "0000old")
    snap = _snapshot(tmp_path / "hub", "org/tiny", "abc123")  # refs/main now points here
    assert resolve_model("org/tiny") == ModelSource("hf", snap, "tiny")


def test_hf_cache_without_refs_takes_newest_snapshot(tmp_path):
    old = _snapshot(tmp_path / "hub", "org/tiny", "old", with_ref=False)
    new = _snapshot(tmp_path / "hub", "org/tiny", "new", with_ref=False)
    os.utime(old, (1, 1))
    assert resolve_model("org/tiny").path == new


def test_hf_home_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snap = _snapshot(tmp_path / "hf-home" / "hub", "gpt2", "rev1")
    assert resolve_model("gpt2") == ModelSource("hf", snap, "gpt2")


def test_local_directory_wins_over_cache(tmp_path):
    _snapshot(tmp_path / "hub", "org/tiny", "abc")
    local = _hf_dir(tmp_path / "org" / "tiny")
    assert resolve_model("org/tiny").path.resolve() == local


def test_added_alias(tmp_path, monkeypatch):
    target = _hf_dir(tmp_path / "packaged" / "all-minilm")
    monkeypatch.setitem(sources.ALIASES, "all-minilm-test", lambda: target)
    assert resolve_model("all-minilm-test") == ModelSource("hf", target, "all-minilm-test")


def test_default_alias_is_the_embedded_gguf():
    src = resolve_model(sources.DEFAULT_MODEL)
    assert src.kind == "gguf" and src.name == "gemma-3-270m"
    assert src.path.is_file() and src.path.suffix == ".gguf"
    assert src.path.open("rb").read(4) == b"GGUF"


def test_not_found_lists_everything_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("nobody/nothing")
    message = str(info.value)
    assert "local path" in message and str(tmp_path / "nobody" / "nothing") in message
    assert str(tmp_path / "hub" / "models--nobody--nothing") in message
    assert "aliases" in message and "gemma-3-270m" in message
    assert isinstance(info.value, ValueError)
