"""The model endpoints: GET /v1/models (every model the server can serve, with its state), GET
/v1/models/{model}, and the admin actions POST /v1/models/load and /v1/models/unload (behind the API
key when one is set, as every non-open path)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from tokenloom.adapters import AdapterRequest, adapter_method
from tokenloom.manager import ModelInfo, ModelState
from tokenloom.server.errors import APIError
from tokenloom.server.protocol import AdapterCard, ModelActionRequest, ModelCard, ModelList
from tokenloom.server.request_handling import ServerState, keep_alive_of, state_of

router = APIRouter()


@router.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
async def list_models(request: Request) -> dict[str, Any]:
    """Every model this server can serve, loaded or not."""
    state = state_of(request)
    cards = [model_card(state, info) for info in state.manager.list()]
    return {"object": "list", "data": cards + [adapter_card(state, name) for name in state.models.adapters]}


@router.post("/v1/models/load", response_model=None, responses={200: {"model": ModelCard | AdapterCard}})
async def load_model(body: ModelActionRequest, request: Request) -> dict[str, Any]:
    """Load a model now (a no-op when it is loaded), optionally setting how long it stays once idle; with
    `adapter_path`, load an adapter (LoRA, soft prompt, prefix) named `model` onto the server's model and list it."""
    state = state_of(request)
    if body.adapter_path is not None:
        return await _load_adapter(state, body.model, body.adapter_path)
    lease = await state.models.lease(body.model, keep_alive_of(body))
    await lease.release()
    return _card_of(state, body.model)


@router.post("/v1/models/unload", response_model=None, responses={200: {"model": ModelCard | AdapterCard}})
async def unload_model(body: ModelActionRequest, request: Request) -> dict[str, Any]:
    """Unload a model now; 409 while it has requests in flight. An adapter's name drops the adapter."""
    state = state_of(request)
    if body.model in state.models.adapters:
        return await _unload_adapter(state, body.model)
    name = state.models.resolve(body.model)
    if not await asyncio.get_running_loop().run_in_executor(None, state.manager.unload, name):
        info = _info(state, name)
        if info.state is ModelState.LOADED:
            raise APIError(409, f"model '{name}' has {info.in_flight} requests in flight; it unloads once they end "
                                f"if its keep_alive allows", param="model", code="model_busy")
    return _card_of(state, name)


# After load and unload: an OPTIONS or PUT on those paths then answers 405 with Allow: POST, not GET.
@router.get("/v1/models/{model:path}", response_model=None, responses={200: {"model": ModelCard | AdapterCard}})
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    """One model."""
    state = state_of(request)
    if model in state.models.adapters:
        return adapter_card(state, model)
    return _card_of(state, state.models.resolve(model))


def model_card(state: ServerState, info: ModelInfo) -> dict[str, Any]:
    """A model as /v1/models lists it: OpenAI's fields plus its state, memory, last use and keep-alive."""
    served = state.manager.loaded().get(info.name) if info.state is ModelState.LOADED else None
    last_used = None if info.last_used is None else round(time.time() - (time.monotonic() - info.last_used), 3)
    return {"id": info.name, "object": "model", "created": served.created if served else state.created,
            "owned_by": "tokenloom", "root": public_source(info.source),
            "max_model_len": served.max_model_len if served else None,
            "state": info.state.value, "bytes_used": info.bytes_used, "last_used": last_used,
            "in_flight": info.in_flight, "loads": info.num_loads, "keep_alive": info.keep_alive_s,
            "error": info.error}


async def _load_adapter(state: ServerState, name: str, path: str) -> dict[str, Any]:
    """Load the adapter into a slot of the server's model now (400 naming the file when it does not fit)."""
    base = state.models.default_model
    if base is None or not state.models.adapters_enabled:
        raise APIError(400, "adapters are off on this server: start it with --adapters (or --enable-adapters) on "
                            "its model", param="adapter_path", code="adapters_disabled")
    if name in state.manager.names():
        raise APIError(400, f"'{name}' is a model's name; pick another name for the adapter", param="model",
                       code="invalid_value")
    adapter = AdapterRequest(name, str(_inside_adapter_dir(state, path)))
    async with state.models.using(base) as lease:
        try:
            await asyncio.wrap_future(lease.model.engine.call(lambda engine: engine.load_adapter(adapter)))
        except ValueError as exc:
            raise APIError(400, str(exc), param="adapter_path", code="invalid_value") from exc
    state.models.adapters[name] = adapter
    return adapter_card(state, name)


def _inside_adapter_dir(state: ServerState, path: str) -> Path:
    """`path` resolved inside the server's --adapter-dir (relative to it, or absolute within it); 403 when
    there is no such folder, or the path leaves it (.., a link out) or is a URL."""
    folder = state.config.adapter_dir
    if folder is None:
        raise APIError(403, "loading adapters by path is off on this server: start it with --adapter-dir FOLDER "
                            "(or name adapters at start with --adapters)", param="adapter_path",
                       code="adapter_loading_disabled")
    root = Path(folder).resolve()
    resolved = (root / path).resolve()
    if "://" in path or not resolved.is_relative_to(root):
        raise APIError(403, f"adapter_path must lie inside the server's adapter folder; got {path!r}",
                       param="adapter_path", code="path_not_allowed")
    return resolved


async def _unload_adapter(state: ServerState, name: str) -> dict[str, Any]:
    """Drop an adapter: new requests no longer find it; 409 while requests use it."""
    card = adapter_card(state, name)
    async with state.models.using(state.models.default_model) as lease:
        try:
            await asyncio.wrap_future(lease.model.engine.call(lambda engine: engine.unload_adapter(name)))
        except ValueError as exc:
            raise APIError(409, str(exc), param="model", code="model_busy") from exc
    del state.models.adapters[name]
    return {**card, "state": "unloaded"}


def adapter_card(state: ServerState, name: str) -> dict[str, Any]:
    """An adapter as /v1/models lists it: a model of its own whose `parent` is the base model (vLLM's shape
    for LoRA modules; `kind` says its method); it runs on its parent's engine, loaded into an adapter slot on
    first use."""
    base, path = state.models.default_model, state.models.adapters[name].path
    return {"id": name, "object": "model", "created": state.created, "owned_by": "tokenloom",
            "root": public_source(str(path)), "parent": base, "kind": adapter_method(path)}


def public_source(source: str) -> str:
    """What a model card shows of where a model comes from: an alias or hub id as given, a file or folder by
    its name only (the server's paths are not the clients' business)."""
    if os.path.isabs(source) or source.startswith(".") or os.sep in source and os.path.exists(source):
        return Path(source).name
    return source


def _info(state: ServerState, name: str) -> ModelInfo:
    return next(i for i in state.manager.list() if i.name == name)


def _card_of(state: ServerState, name: str) -> dict[str, Any]:
    return model_card(state, _info(state, state.models.resolve(name)))
