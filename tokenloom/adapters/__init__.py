"""Adapters served on a base model: LoRA (PEFT's format) applied per request inside one continuous batch.

`AdapterRequest(name, path)` names an adapter for a request; the engine loads it on first use into one of
`max_adapters` slots (`enable_adapters=True`), and requests with different adapters and none share batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class AdapterError(ValueError):
    """An adapter cannot be loaded or used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class AdapterRequest:
    """Which adapter a request runs with: a `name` (unique per adapter) and the folder PEFT saved it in."""

    name: str
    path: str | Path
