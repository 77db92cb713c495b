"""Prompt-learning adapters in PEFT's format: soft prompts (prompt tuning, P-tuning) and prefixes (prefix
tuning), served as virtual tokens at the head of a request.

PEFT saves each as one tensor, `prompt_embeddings` [N, ...], already passed through its prompt encoder
(P-tuning's MLP or LSTM, prefix tuning's projection), so serving needs no encoder:
- a soft prompt [N, hidden] is N input embeddings placed before the prompt's own (positions 0..N-1);
- a prefix [N, layers * 2 * kv_heads * head_dim] is N keys and values per layer placed before the prompt's,
  which then starts at position N (as transformers does with PEFT's `past_key_values`).

Serving: the input processor puts N placeholder tokens before a request's prompt; for the packed rows of
those positions the model takes the adapter's vectors instead of computing its own, through `VirtualTokens`,
the step's state the runner fills: a forward hook on the input embedding swaps in soft-prompt rows, and every
attention layer swaps in prefix keys and values (`VirtualKV`) before they reach the cache. Everything else
(scheduling, chunked prefill, preemption, the prefix cache keyed by the adapter's name) treats virtual
tokens as prompt tokens; a prefix's blocks are computed by the first request and shared by the rest.
The placeholders never reach the outputs. Training uses the same path with trainable tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenloom.adapters import METHOD_NAMES, AdapterError, AdapterRequest
from tokenloom.adapters.heads import SequenceHead, read_head

PROMPT_METHODS = {k: v for k, v in METHOD_NAMES.items() if k != "LORA"}
PLACEHOLDER_TOKEN = 0  # the id a virtual position carries; its embedding is never used


@dataclass(slots=True)
class ModelShape:
    """What a prompt-learning adapter must match: the hidden size and the attention layers' shapes."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(slots=True)
class PromptAdapter:
    """A loaded soft prompt (`embeddings` [N, hidden]) or prefix (`keys`, `values` [layers, N, kv_heads, dim]),
    with a SEQ_CLS adapter's classification head."""

    name: str
    path: Path
    method: str
    num_virtual_tokens: int
    embeddings: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    head: SequenceHead | None = None

    @property
    def outputs_virtual_rows(self) -> bool:
        """Whether the model's outputs hold rows for the virtual tokens: a soft prompt's are inputs (PEFT's
        forward returns their hidden states; an encoder's first row is the first virtual token), a prefix's
        are keys and values only."""
        return self.embeddings is not None

    def memory_bytes(self) -> int:
        """Bytes of its tables and head."""
        head = self.head.memory_bytes() if self.head is not None else 0
        return head + sum(t.numel() * t.element_size() for t in (self.embeddings, self.keys, self.values)
                          if t is not None)


def split_prefix(table: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's prefix table [N, layers * 2 * kv_heads * dim] → keys, values [layers, N, kv_heads, dim] (its
    layout: per virtual token, layer-major, the key then the value of each layer)."""
    n = table.shape[0]
    kv = table.view(n, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim).permute(1, 2, 0, 3, 4)
    return kv[:, 0], kv[:, 1]


def read_prompt_adapter(request: AdapterRequest, config_file: Path, config: dict[str, Any], weights_file: Path,
                        shape: ModelShape, device: torch.device) -> PromptAdapter:
    """A PEFT prompt-tuning, P-tuning or prefix-tuning folder (with its classification head when its task is
    SEQ_CLS) for a model of `shape`; AdapterError names what does not fit."""
    def fail(what: str) -> AdapterError:
        return AdapterError(f"adapter {request.name!r}: {what}")

    peft_type = config.get("peft_type")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise fail(f"{config_file}: num_virtual_tokens must be a positive integer; got {n!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise fail(f"{config_file}: num_transformer_submodules={config['num_transformer_submodules']} is an "
                   f"encoder-decoder adapter; those are not supported")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the caller
        raise fail(f"{weights_file} cannot be read: {exc}") from exc
    table = tensors.get("prompt_embeddings")
    if table is None:
        raise fail(f"{weights_file} holds no 'prompt_embeddings' tensor (has {sorted(tensors)[:5]})")
    method = PROMPT_METHODS[peft_type]
    if peft_type == "PREFIX_TUNING":
        want = (n, shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim)
        what = (f"virtual tokens x (layers {shape.num_layers} x 2 x kv heads {shape.num_kv_heads} x head dim "
                f"{shape.head_dim})")
    else:
        want, what = (n, shape.hidden_size), "virtual tokens x hidden size"
    if tuple(table.shape) != want:
        raise fail(f"{weights_file}: prompt_embeddings is {tuple(table.shape)}; this model needs {want}, {what} "
                   f"(an adapter of another base model?)")
    head = None
    if config.get("task_type") == "SEQ_CLS":
        try:
            head = read_head(tensors, Path(request.path), shape.hidden_size, device, str(weights_file), [])
        except ValueError as exc:
            raise fail(str(exc)) from exc
    table = table.to(device, torch.float32)
    if peft_type == "PREFIX_TUNING":
        keys, values = split_prefix(table, shape)
        return PromptAdapter(request.name, Path(request.path), method, n, keys=keys.contiguous(),
                             values=values.contiguous(), head=head)
    return PromptAdapter(request.name, Path(request.path), method, n, embeddings=table, head=head)


@dataclass(slots=True)
class VirtualTokens:
    """The step's soft-prompt rows (`embed_rows` take `embeds` [R, hidden] as input embeddings); the prefix
    rows travel in the attention metadata (`VirtualKV`)."""

    embed_rows: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    _hooked: list[Any] = field(default_factory=list)

    def set(self, rows: torch.Tensor | None, embeds: torch.Tensor | None) -> None:
        """This step's soft-prompt rows (None after the step)."""
        self.embed_rows, self.embeds = rows, embeds

    def hook(self, embedding: nn.Module) -> None:
        """Swap soft-prompt rows into `embedding`'s output (the model's input embeddings), once."""
        if not self._hooked:
            self._hooked.append(embedding.register_forward_hook(self._swap))

    def _swap(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.embed_rows is None:
            return None
        return output.index_put((self.embed_rows,), self.embeds.to(output.dtype))


def model_shape(model: nn.Module) -> ModelShape:
    """The shape prompt-learning adapters of `model` must have (every attention layer alike)."""
    from tokenloom.models.layers.attention import prefix_layers

    if not hasattr(model, "input_embeddings"):
        raise AdapterError(f"{type(model).__name__} has no input_embeddings(): prompt-learning adapters need it")
    layers = prefix_layers(model)
    shapes = {(a.num_kv_heads, a.head_dim) for a in layers}
    if len(shapes) != 1:
        raise AdapterError(f"prefix tuning needs attention layers of one shape; this model has {sorted(shapes)}")
    (kv_heads, head_dim), = shapes
    hidden = int(model.input_embeddings().weight.shape[1])
    return ModelShape(hidden, len(layers), kv_heads, head_dim)
