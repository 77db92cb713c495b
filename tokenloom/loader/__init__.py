"""Turn a model reference into a ready model, its tokenizer and its limits."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenloom.config import ConfigError, ModelConfig
from tokenloom.loader.hf import hf_tokenizer
from tokenloom.loader.tokenizer import Tokenizer
from tokenloom.models import ops
from tokenloom.models.quantize import default_quantization, quantize_model
from tokenloom.models.registry import ModelKind, UnsupportedModelError, model_class_for, model_kind

if TYPE_CHECKING:
    from tokenloom.loader.sources import ModelSource

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run, with what the engine needs to know about it."""

    model: nn.Module
    tokenizer: Tokenizer
    hf_config: Any
    name: str
    path: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    load_seconds: float
    quantization: str = "none"

    @property
    def kind(self) -> ModelKind:
        """decoder, encoder-decoder or encoder: the one answer to "what kind of model is this"."""
        return model_kind(self.model)

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied matrices counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters and quantized weight buffers in memory (shared tensors counted once)."""
        tensors = {t.data_ptr(): t for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def count_parameters(source: ModelSource) -> int:
    """Parameters stored in a model's files, from the tensor headers only (GGUF directory, safetensors
    headers); 0 when only pytorch_model.bin holds them."""
    import math

    if source.kind == "gguf":
        from tokenloom.loader.gguf_file import read_gguf_file

        return sum(math.prod(t.shape) for t in read_gguf_file(source.path).tensors)
    from safetensors import safe_open

    from tokenloom.loader.hf import weight_files

    total = 0
    for file in weight_files(source.path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not iterable
    return total


def load_tokenizer(model_config: ModelConfig) -> Tokenizer:
    """The tokenizer `load_model` would give the model, without its weights (a router that routes by token ids)."""
    from tokenloom.loader.sources import resolve_model

    if model_config.tokenizer:
        return hf_tokenizer(Path(model_config.tokenizer))
    source = resolve_model(model_config.model)
    if source.kind == "gguf":
        from tokenloom.loader.gguf_config import read_gguf
        from tokenloom.loader.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(read_gguf(source.path))
    return hf_tokenizer(source.path)


def load_model(model_config: ModelConfig, device: torch.device) -> LoadedModel:
    """Resolve `model_config.model`, build the model on the meta device, then fill its weights."""
    from tokenloom.loader.sources import resolve_model

    start = time.perf_counter()
    source = resolve_model(model_config.model)
    if source.kind == "gguf":
        from tokenloom.loader.gguf_config import read_gguf
        from tokenloom.loader.gguf_tokenizer import gguf_tokenizer
        from tokenloom.loader.gguf_weights import GGUFExactWeights, iter_gguf_weights

        ckpt = read_gguf(source.path)
        hf_config, saved_dtype = ckpt.config, None
        weights = lambda dtype: iter_gguf_weights(ckpt, dtype)
        default_tokenizer = lambda: gguf_tokenizer(ckpt)
        exact = GGUFExactWeights(ckpt)  # quantization repacks the file's blocks rather than re-fitting them
    else:
        from tokenloom.loader.hf import checkpoint_dtype, iter_hf_weights, read_hf_config

        hf_config = read_hf_config(source.path)
        saved_dtype = checkpoint_dtype(hf_config)
        weights = lambda dtype: iter_hf_weights(source.path)
        default_tokenizer = lambda: hf_tokenizer(source.path)
        exact = None
    tokenizer = hf_tokenizer(Path(model_config.tokenizer)) if model_config.tokenizer else default_tokenizer()
    max_len = _max_model_len(hf_config, model_config.max_model_len)
    dtype = model_config.torch_dtype(saved_dtype, ops.bf16_is_fast(device))
    model = build_model(hf_config, max_len, dtype, device)
    with _one_thread():
        model.load_weights(weights(_parameter_dtype(model)))
    quantization = model_config.quantization
    if quantization == "auto":
        quantization = default_quantization(model, exact)
    quantize_model(model, quantization, exact)
    logger.info("%s: %s, quantization %s, kernels %s (CPU %s)", source.name, str(dtype).removeprefix("torch."),
                quantization, ops.level_in_use(), ops.isa.best_level())
    return LoadedModel(model, tokenizer, hf_config, source.name, source.path, dtype, device, max_len,
                       time.perf_counter() - start, quantization)


def resolve_model_class(hf_config: Any) -> type[nn.Module]:
    """The registered class for the checkpoint's architecture; on a miss, the installed plugins are
    loaded (one may add it) and the registry asked again."""
    try:
        return model_class_for(hf_config)
    except UnsupportedModelError:
        from tokenloom.plugins import load_plugins

        load_plugins()
        return model_class_for(hf_config)


def build_model(hf_config: Any, max_model_len: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Instantiate the architecture without initialising weights (meta device, then empty storage)."""
    model_class = resolve_model_class(hf_config)
    with torch.device("meta"), _skip_init():
        model = model_class(hf_config, max_positions=max_model_len)
    # `to_empty` would do, but its `empty_like` of a meta tensor runs torch's Python reference
    # implementation, whose first use imports sympy (~0.3 s); an explicit empty_strided does not.
    model = model.to(dtype=dtype)._apply(
        lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make `torch.nn.init`'s in-place initialisers no-ops while modules are built on the meta device.

    Meta tensors hold no values, so initialising them does nothing, yet costs: a random init on meta
    runs torch's Python decompositions, and the first one imports torch._dynamo (~1.3 s of startup).
    """
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, _no_init)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _no_init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on this thread alone (other threads keep their own setting).

    Filling fresh parameter memory is bound by page faults and memory bandwidth: a second thread
    gains nothing on an idle machine, while on a busy one every op's fork/join waits for a thread
    that is not running (the default model's weights: 1.2 s alone against 2.6 s with two threads,
    with other work on both cores). The result is the same either way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    """The one floating dtype of the model's parameters, which loaders may produce directly; float32
    where they differ (each tensor is then rounded by the copy into its own parameter)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# Relative-position models have no stated context length: their training length is the default, as in
# transformers, and max_model_len may raise it (the position buckets extend to any distance).
_RELATIVE_POSITION_DEFAULTS = {"t5": 512, "mt5": 512, "umt5": 512}


def _max_model_len(hf_config: Any, requested: int | None) -> int:
    limit = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        limit = getattr(hf_config, key, None)
        if limit:
            break
    default = _RELATIVE_POSITION_DEFAULTS.get(getattr(hf_config, "model_type", ""))
    if limit is None and default is not None:
        if requested is not None:
            return requested
        logger.info("%s states no context length (relative positions): max_model_len %d, its training length; "
                    "set max_model_len to change it", hf_config.model_type, default)
        return default
    if requested is None:
        if limit is None:
            raise ConfigError("the checkpoint does not state its context length; set max_model_len")
        return int(limit)
    if limit is not None and requested > limit:
        raise ConfigError(f"max_model_len {requested} exceeds the model's context length {limit}")
    return requested
