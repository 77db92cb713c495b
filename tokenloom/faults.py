"""Fault injection, for the reliability tests: armed faults make chosen operations raise `InjectedFault`, so
tests can show that a fault reaches only the requests it hits (they end with an error; the others finish
normally, /health stays healthy) and that a dead engine loop ends every stream and the server's process.

Sites, and what a fault there matches:
- `forward`: the model's forward pass, for a batch holding a request whose prompt has token id `token`
  (again whenever that request runs: the engine's isolation then fails it alone), or once at its `step`-th
  call (a transient fault: the batch is retried request by request and nothing is lost);
- `kv_allocate`: giving KV blocks to a request whose prompt has token id `token`;
- `tokenize`: the server's tokenizer, on a text containing `text`;
- `load`: loading the model named `model`;
- `engine_loop`: the async engine's loop itself, at its `step`-th step (the loop dies).

Arm them in code (`arm`) or, for a server started as a subprocess, with the environment variable
TOKENLOOM_FAULTS, a JSON list of such objects: `[{"site": "forward", "token": 4242}]`. Unarmed, each site
costs one truth test of an empty list.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

SITES = ("forward", "kv_allocate", "tokenize", "load", "engine_loop")


class InjectedFault(RuntimeError):
    """The error an armed fault raises."""


@dataclass(slots=True)
class Fault:
    """One armed fault: its site and what it matches (see the module's docstring)."""

    site: str
    token: int | None = None
    text: str | None = None
    model: str | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"fault site must be one of {', '.join(SITES)}; got {self.site!r}")


_armed: list[Fault] = []
_calls: dict[str, int] = {}
_lock = threading.Lock()


def arm(*faults: Fault) -> None:
    """Arm faults (in addition to those armed already)."""
    with _lock:
        _armed.extend(faults)


def disarm() -> None:
    """Disarm every fault and reset the step counts."""
    with _lock:
        _armed.clear()
        _calls.clear()


def arm_from_env() -> None:
    """Arm the faults TOKENLOOM_FAULTS lists (a JSON list of Fault fields); a malformed value is a ValueError."""
    raw = os.environ.get("TOKENLOOM_FAULTS")
    if raw:
        arm(*(Fault(**entry) for entry in json.loads(raw)))


def hit(site: str, token_ids: Iterable[Iterable[int]] = (), text: str | None = None, model: str | None = None
        ) -> None:
    """Raise InjectedFault if an armed fault at `site` matches: a prompt of `token_ids` (one per request)
    holding its token, `text` holding its text, `model` being its model, or this being its step."""
    if not _armed:
        return
    with _lock:
        step = _calls[site] = _calls.get(site, 0) + 1
        faults = [f for f in _armed if f.site == site]
    prompts = None
    for fault in faults:
        if fault.step is not None and fault.step == step:
            raise InjectedFault(f"injected fault: {site} at step {step}")
        if fault.token is not None:
            prompts = prompts if prompts is not None else [set(ids) for ids in token_ids]
            if any(fault.token in ids for ids in prompts):
                raise InjectedFault(f"injected fault: {site} on token {fault.token}")
        if fault.text is not None and text is not None and fault.text in text:
            raise InjectedFault(f"injected fault: {site} on text {fault.text!r}")
        if fault.model is not None and fault.model == model:
            raise InjectedFault(f"injected fault: {site} of model {fault.model!r}")


arm_from_env()

__all__ = ["SITES", "Fault", "InjectedFault", "arm", "arm_from_env", "disarm", "hit"]
