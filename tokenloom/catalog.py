"""Where the ModelManager's models come from: a folder of models (`--models-dir`) and a YAML catalog
(`--models-config models.yaml`).

A catalog lists models by name with their source and per-model options:

    models:
      - name: gemma                  # required: the name requests use
        source: gemma-3-270m         # required: anything `resolve_model` accepts
        dtype: bfloat16              # any engine option: dtype, quantization, kv_cache_gib, max_model_len, ...
        kv_cache_gib: 0.5
        keep_alive: 10m              # seconds, or 30s / 10m / 2h; 0 unloads at once; -1 never
        sampling: {temperature: 0.7} # default sampling parameters for this model's requests
        chat_template: "{{ ... }}"   # overrides the model's own

A malformed catalog fails at start-up with the file, the line and the field named.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tokenloom.config import ConfigError, EngineConfig, option_names
from tokenloom.manager import ModelSpec
from tokenloom.sampling_params import SamplingParams
from tokenloom.yamlio import compose_file

_SPEC_FIELDS = {"name", "source", "keep_alive", "sampling", "chat_template"}
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class CatalogError(ValueError):
    """A catalog or models folder that cannot be used; the message names the file, line and field."""


def parse_keep_alive(value: Any) -> float:
    """Seconds from a keep-alive value as Ollama takes it: a number of seconds or "30s" / "10m" / "2h";
    0 unloads right after the last request, -1 (also "-1m", Ollama's example) keeps the model loaded; other
    negative values, NaN and infinities are refused."""
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a duration, not {value!r}")
    if isinstance(value, (int, float)):
        number, seconds = float(value), float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"keep_alive must be seconds or a duration like 30s, 10m, 2h; got {value!r}")
        number = float(match.group(1))
        seconds = number * _UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"keep_alive must be finite; got {value!r}")
    if seconds < 0 and number != -1:
        raise ValueError(f"keep_alive must be >= 0, or -1 to keep the model loaded; got {value!r}")
    return -1.0 if seconds < 0 else seconds


def specs_from_dir(folder: Path) -> list[ModelSpec]:
    """Every HF model folder (config.json) and .gguf file under `folder`, named after the folder or the
    file's stem; two models with one name are an error naming both paths. A model folder's own subfolders
    (sentence-transformers' 1_Pooling/config.json, ...) are part of it, not models."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CatalogError(f"--models-dir {folder}: not a directory")
    found: dict[str, Path] = {}
    candidates = []
    for root, dirs, files in os.walk(folder, followlinks=True):  # models are often symlinked in
        if "config.json" in files:
            candidates.append(Path(root))
            dirs.clear()
        candidates += [Path(root) / f for f in files if f.endswith(".gguf")]
    for path in sorted(candidates):
        name = path.stem if path.is_file() else path.name
        if name in found:
            raise CatalogError(f"--models-dir {folder}: two models named {name!r}: {found[name]} and {path}")
        found[name] = path
    return [ModelSpec(name, str(path)) for name, path in found.items()]


def specs_from_yaml(path: Path) -> list[ModelSpec]:
    """The models a YAML catalog lists, every field checked (see the module docstring for the format)."""
    path = Path(path)
    root = compose_file(path, CatalogError, "catalog")
    models = _mapping_value(root, "models") if isinstance(root, yaml.MappingNode) else None
    if not isinstance(models, yaml.SequenceNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise CatalogError(f"{path} line {line}: expected a top-level 'models:' list")
    specs, seen = [], {}
    for node in models.value:
        spec = _spec(path, node)
        if spec.name in seen:
            raise CatalogError(f"{path} line {node.start_mark.line + 1}: field 'name': {spec.name!r} is already "
                               f"used on line {seen[spec.name]}")
        seen[spec.name] = node.start_mark.line + 1
        specs.append(spec)
    return specs


def _mapping_value(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((v for k, v in node.value if k.value == key), None)


def _spec(path: Path, node: yaml.Node) -> ModelSpec:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise CatalogError(f"{path} line {line}: each model must be a mapping with name and source")
    data = yaml.safe_load(yaml.serialize(node))
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}

    def fail(field: str, message: str) -> CatalogError:
        return CatalogError(f"{path} line {lines.get(field, line)}: field {field!r}: {message}")

    for required in ("name", "source"):
        if not isinstance(data.get(required), str) or not data[required].strip():
            raise fail(required, "required, a non-empty string")
    engine = {k: v for k, v in data.items() if k not in _SPEC_FIELDS}
    for key in engine:
        if key == "model" or key not in option_names():  # the model itself is `source`
            raise fail(key, f"unknown option; known: {', '.join(sorted(_SPEC_FIELDS | set(option_names())))}")
    for key, value in engine.items():
        try:
            EngineConfig.from_kwargs(model=data["source"], **{key: value}).validate()
        except (ConfigError, TypeError, ValueError) as exc:
            raise fail(key, str(exc)) from exc
    keep_alive = None
    if "keep_alive" in data:
        try:
            keep_alive = parse_keep_alive(data["keep_alive"])
        except ValueError as exc:
            raise fail("keep_alive", str(exc)) from exc
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise fail("sampling", "must be a mapping of sampling parameters")
    try:
        SamplingParams(**sampling)
    except (TypeError, ValueError) as exc:
        raise fail("sampling", str(exc)) from exc
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise fail("chat_template", "must be a string (a Jinja template)")
    return ModelSpec(data["name"], data["source"], engine, keep_alive, dict(sampling), template)


def catalog_specs(models_dir: Path | None = None, models_config: Path | None = None) -> list[ModelSpec]:
    """The models a server or CLI knows: the default alias, then a models folder, then a catalog file
    (a later source replaces an earlier one's model of the same name)."""
    from tokenloom.loader.sources import ALIASES

    specs = {name: ModelSpec(name, name) for name in ALIASES}
    for found in (specs_from_dir(models_dir) if models_dir else []) + (
            specs_from_yaml(models_config) if models_config else []):
        specs[found.name] = found
    return list(specs.values())


def describe_model(ref: str, chat_template: str | None = None) -> dict[str, Any]:
    """What `tokenloom models show` prints, read from the model's files without loading its weights:
    source, architecture, parameters, context length, weight format and chat template."""
    from collections import Counter

    from tokenloom.loader import count_parameters
    from tokenloom.loader.sources import resolve_model

    source = resolve_model(ref)
    if source.kind == "gguf":
        from tokenloom.loader.gguf_config import read_gguf
        from tokenloom.loader.gguf_tokenizer import gguf_tokenizer

        ckpt = read_gguf(source.path)
        config, tokenizer = ckpt.config, gguf_tokenizer(ckpt)
        params = count_parameters(source)
        types = Counter(t.tensor_type.name for t in ckpt.tensors)
        weights = "GGUF " + ", ".join(f"{name} x{n}" for name, n in types.most_common())
    else:
        from tokenloom.loader.hf import checkpoint_dtype, hf_tokenizer, read_hf_config

        config, tokenizer = read_hf_config(source.path), hf_tokenizer(source.path)
        params = count_parameters(source)
        dtype = checkpoint_dtype(config)
        weights = f"{str(dtype).removeprefix('torch.') if dtype else 'unknown dtype'} ({source.path.name})"
    return {"name": ref, "source": str(source.path), "kind": source.kind,
            "architecture": ", ".join(getattr(config, "architectures", None) or [config.model_type]),
            "parameters": f"{params / 1e6:.1f} M" if params else "unknown (no safetensors headers)",
            "context length": getattr(config, "max_position_embeddings", "unknown"),
            "weights": weights, "chat template": chat_template or tokenizer.chat_template or "none"}
