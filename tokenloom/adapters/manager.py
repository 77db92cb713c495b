"""The engine's adapters: `max_adapters` slots holding LoRAs, soft prompts and prefixes, loaded by name on
first use, the least recently used one no request in flight uses replaced when the slots are full.

Per step the manager turns the runner's view of the batch (which packed rows each adapter's requests hold)
into what the model reads: LoRA row groups (`LoRABatch`), soft-prompt rows (`VirtualTokens`) and prefix
keys and values (`VirtualKV`, for the attention metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenloom.adapters import AdapterError, AdapterRequest
from tokenloom.adapters.heads import SequenceHead
from tokenloom.adapters.lora import LoRAAdapter, LoRABatch, LoRALinear, read_lora
from tokenloom.adapters.virtual import (
    PROMPT_METHODS,
    ModelShape,
    PromptAdapter,
    VirtualTokens,
    model_shape,
    read_prompt_adapter,
)
from tokenloom.models.layers.attention import VirtualKV

Adapter = LoRAAdapter | PromptAdapter


@dataclass(slots=True)
class VirtualSpan:
    """A request's virtual positions in this step: packed rows `row`.. take its adapter's entries `first`..,
    `count` of them."""

    slot: int
    row: int
    first: int
    count: int


class AdapterManager:
    """Adapter slots, loading by name, and each step's adapter state for the model."""

    def __init__(self, model: nn.Module, device: torch.device, max_adapters: int, max_rank: int) -> None:
        self.model, self.device = model, device
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.batch = LoRABatch()
        self.virtual = VirtualTokens()
        self.slots: list[Adapter | None] = [None] * max_adapters
        self._use = [0] * max_adapters  # last use, for LRU
        self._clock = 0
        self._layers: dict[str, LoRALinear] = {}
        self._shape: ModelShape | None = None

    # ---- slots ----

    def slot_for(self, request: AdapterRequest, busy: set[int]) -> int:
        """The slot holding `request`'s adapter, loading it (into a free slot, or the least recently used one
        no request in `busy` uses) on first use."""
        self._clock += 1
        for i, adapter in enumerate(self.slots):
            if adapter is not None and adapter.name == request.name:
                if adapter.path != Path(request.path):
                    raise AdapterError(f"adapter {request.name!r} is loaded from {adapter.path}, not {request.path}")
                self._use[i] = self._clock
                return i
        free = [i for i in range(self.max_adapters) if i not in busy]
        if not free:
            raise AdapterError(f"all {self.max_adapters} adapter slots are in use by requests in flight "
                               f"(max_adapters); retry when one finishes")
        slot = min(free, key=lambda i: (self.slots[i] is not None, self._use[i]))
        adapter = self.read(request)
        self._install(slot, adapter)
        self._use[slot] = self._clock
        return slot

    def num_virtual_tokens(self, slot: int) -> int:
        """How many virtual tokens the adapter in `slot` puts before a prompt (0 for a LoRA)."""
        adapter = self.slots[slot]
        return adapter.num_virtual_tokens if isinstance(adapter, PromptAdapter) else 0

    def read(self, request: AdapterRequest) -> Adapter:
        """Read a PEFT adapter folder (LoRA, prompt tuning, P-tuning or prefix tuning) for this model."""
        path = Path(request.path)
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        for f in (config_file, weights_file):
            if not f.is_file():
                raise AdapterError(f"adapter {request.name!r}: {f} does not exist")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdapterError(f"adapter {request.name!r}: {config_file} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise AdapterError(f"adapter {request.name!r}: {config_file} is not a JSON object")
        peft_type = config.get("peft_type")
        if peft_type == "LORA":
            return read_lora(request, config_file, config, weights_file, self.model, self.device, self.max_rank)
        if peft_type in PROMPT_METHODS:
            if self._shape is None:
                self._shape = model_shape(self.model)
                self.virtual.hook(self.model.input_embeddings())
            return read_prompt_adapter(request, config_file, config, weights_file, self._shape, self.device)
        raise AdapterError(f"adapter {request.name!r}: {config_file}: peft_type {peft_type!r} is not supported "
                           f"here (LORA, {', '.join(PROMPT_METHODS)} are)")

    def unload(self, name: str, busy: set[int]) -> bool:
        """Free the slot of adapter `name` (False when it is not loaded); AdapterError while requests in
        flight (`busy` slots) use it."""
        for slot, adapter in enumerate(self.slots):
            if adapter is not None and adapter.name == name:
                if slot in busy:
                    raise AdapterError(f"adapter {name!r} has requests in flight; unload it once they end")
                for layer in self._layers.values():
                    layer.set_updates(slot, [])
                self.slots[slot] = None
                return True
        return False

    def _install(self, slot: int, adapter: Adapter) -> None:
        for layer in self._layers.values():
            layer.set_updates(slot, [])
        if isinstance(adapter, LoRAAdapter):
            for name, updates in adapter.updates.items():
                self._layer(name).set_updates(slot, updates)
        self.slots[slot] = adapter

    def _layer(self, name: str) -> LoRALinear:
        layer = self._layers.get(name)
        if layer is None:
            parent_name, _, leaf = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            current = getattr(parent, leaf)
            layer = current if isinstance(current, LoRALinear) else LoRALinear(current, self.batch,
                                                                               self.max_adapters)
            setattr(parent, leaf, layer)
            self._layers[name] = layer
        return layer

    def memory_bytes(self) -> int:
        """Bytes of the loaded adapters' tensors."""
        return sum(adapter.memory_bytes() for adapter in self.slots if adapter is not None)

    # ---- a step ----

    def head(self, slot: int) -> SequenceHead | None:
        """The classification head of the adapter in `slot` (None when it has none)."""
        return self.slots[slot].head

    def outputs_virtual_rows(self, slot: int) -> bool:
        """Whether the model's outputs hold rows for the virtual tokens of the adapter in `slot` (a soft
        prompt's, as PEFT's forward returns them; not a prefix's or a LoRA's)."""
        adapter = self.slots[slot]
        return isinstance(adapter, PromptAdapter) and adapter.outputs_virtual_rows

    def begin_step(self, rows_by_slot: dict[int, list[int]], num_rows: int,
                   spans: list[VirtualSpan] = ()) -> VirtualKV | None:
        """Set this step's adapter state: the packed rows of each adapter's requests (LoRAs run on theirs),
        soft-prompt rows; returns the prefix rows' keys and values for the attention metadata (None when
        the step has none)."""
        groups = [(slot, torch.tensor(rows, dtype=torch.long, device=self.device))
                  for slot, rows in sorted(rows_by_slot.items()) if isinstance(self.slots[slot], LoRAAdapter)]
        token_slots = None
        if groups:
            token_slots = torch.full((num_rows,), -1, dtype=torch.long, device=self.device)
            for slot, rows in groups:
                token_slots[rows] = slot
        self.batch.set(groups, token_slots)
        embed_spans = [s for s in spans if self.slots[s.slot].embeddings is not None]
        if embed_spans:
            rows, embeds = self._gather(embed_spans, lambda a: a.embeddings, 0)
            self.virtual.set(rows, embeds)
        kv_spans = [s for s in spans if self.slots[s.slot].keys is not None]
        if not kv_spans:
            return None
        rows, keys = self._gather(kv_spans, lambda a: a.keys, 1)
        _, values = self._gather(kv_spans, lambda a: a.values, 1)
        return VirtualKV(rows, keys, values)

    def end_step(self) -> None:
        """Clear the step's adapter state."""
        self.batch.set([], None)
        self.virtual.set(None, None)

    def _gather(self, spans: list[VirtualSpan], table, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat([torch.arange(s.row, s.row + s.count) for s in spans]).to(self.device)
        parts = [table(self.slots[s.slot]).narrow(dim, s.first, s.count) for s in spans]
        return rows, torch.cat(parts, dim)
