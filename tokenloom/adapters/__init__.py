"""Adapters served on a base model, per request inside one continuous batch: LoRAs (lora.py), soft prompts
and prefixes (virtual.py), all in PEFT's format; trained by train.py.

`AdapterRequest(name, path)` names an adapter for a request; the engine loads it on first use into one of
`max_adapters` slots (`enable_adapters=True`, manager.py), and requests with different adapters and none
share batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METHOD_NAMES = {"LORA": "lora", "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "p-tuning",
                "PREFIX_TUNING": "prefix-tuning"}


class AdapterError(ValueError):
    """An adapter cannot be loaded or used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class AdapterRequest:
    """Which adapter a request runs with: a `name` (unique per adapter) and the folder PEFT saved it in."""

    name: str
    path: str | Path


def adapter_method(path: str | Path) -> str:
    """The method of the PEFT adapter in `path` (lora, prompt-tuning, p-tuning, prefix-tuning), or
    `unknown` when its config cannot be read."""
    try:
        peft_type = json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return METHOD_NAMES.get(peft_type, "unknown")
