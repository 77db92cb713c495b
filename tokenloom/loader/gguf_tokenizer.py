"""GGUF files: the tokenizer embedded in their metadata, built as transformers' GGUF path builds it."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenloom.loader.gguf_config import GGUFCheckpoint, GGUFError

if TYPE_CHECKING:
    from tokenloom.loader.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def gguf_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    """The file's tokenizer, as transformers' GGUF path builds it from the metadata already parsed.

    The conversion is slow for large vocabularies, so its result is cached on disk (see
    `tokenloom.loader.cache`) and later loads read it back; an unreadable entry is rebuilt.
    """
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from tokenloom.loader import cache
    from tokenloom.loader.tokenizer import FALLBACK_CHAT_TEMPLATES, Tokenizer

    hf_class = TOKENIZER_MAPPING.get(type(ckpt.config), TokenizersBackend)
    identity = cache.tokenizer_identity(ckpt.path, ckpt.metadata_sha256,
                                        f"{hf_class.__module__}.{hf_class.__qualname__}")
    hf = None
    if found := cache.find_tokenizer(identity):
        try:
            hf = _from_file(hf_class, *found)
        except Exception as exc:  # a damaged entry must not stop the load: build it again
            logger.warning("rebuilding the cached tokenizer %s: %s: %s", found[0], type(exc).__name__, exc)
    if hf is None:
        hf = _convert_and_load(ckpt, hf_class, identity)
    extra_eos = []
    if ckpt.architecture.startswith("gemma"):
        end_of_turn = hf.backend_tokenizer.token_to_id("<end_of_turn>")
        extra_eos = [end_of_turn] if end_of_turn is not None else []
    template = ckpt.chat_template or FALLBACK_CHAT_TEMPLATES.get(ckpt.architecture)
    return Tokenizer(hf, chat_template=template, extra_eos_token_ids=extra_eos)


def _convert_and_load(ckpt: GGUFCheckpoint, hf_class: type, identity: dict[str, Any]) -> Any:
    """Convert the vocabulary, store it in the cache (or a temporary folder where the cache is not
    writable) and load it from there: one way to construct it, whether cached or not."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from tokenloom.loader import cache

    md = ckpt.metadata
    tok, tok_config = ({name: md[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in md}
                       for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
    if "tokens" not in tok:
        raise GGUFError(f"{ckpt.path}: no tokenizer.ggml.tokens in the metadata, so no tokenizer")
    if tok.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(ckpt.architecture, tok)
    except ValueError as exc:
        raise GGUFError(f"{ckpt.path}: {exc}") from exc
    kwargs = {**tok_config, **extra}
    try:
        meta = {"kwargs": kwargs, "model_vocab_size": backend.get_vocab_size(with_added_tokens=False)}
        json.dumps(meta)
    except (TypeError, ValueError):  # options that do not survive JSON: no cache, the slow in-memory way
        return hf_class(tokenizer_object=backend, **kwargs)
    backend_json = backend.to_str()
    try:
        return _from_file(hf_class, *cache.store_tokenizer(identity, backend_json, meta))
    except OSError as exc:
        logger.warning("cannot cache the tokenizer under %s (%s)", cache.cache_root(), exc)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(backend_json, encoding="utf-8")
        return _from_file(hf_class, Path(tmp) / "tokenizer.json", meta)


def _from_file(hf_class: type, path: Path, meta: dict[str, Any]) -> Any:
    """The HF tokenizer over a saved backend; the same result as passing the backend object, without
    the deep copy of it that transformers makes then."""
    if not path.is_file():  # transformers would quietly fall back to a near-empty vocabulary
        raise FileNotFoundError(path)
    hf = hf_class(tokenizer_file=str(path), **meta["kwargs"])
    if hf.backend_tokenizer.get_vocab_size(with_added_tokens=False) != meta["model_vocab_size"]:
        raise ValueError(f"{path} holds {hf.backend_tokenizer.get_vocab_size(with_added_tokens=False)} tokens, "
                         f"not {meta['model_vocab_size']}")
    return hf
