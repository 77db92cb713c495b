"""The server's state (a model manager whose models are async engines), the FastAPI app over it (one per
call, each with its own metrics registry) and `run_server`, which serves it with uvicorn and drains on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

import tokenloom
from tokenloom.adapters import AdapterRequest
from tokenloom.manager import ModelManager, ModelSpec
from tokenloom.server import chat, completions, embeddings, misc, models
from tokenloom.server.config import ServerConfig, ServerConfigError
from tokenloom.server.errors import install_error_handlers
from tokenloom.server.http_protocol import GuardedH11Protocol
from tokenloom.server.metrics import ErrorCounter, ServerMetrics
from tokenloom.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from tokenloom.server.model_leases import ModelLeases, ServedModel, served_bytes, served_model_factory
from tokenloom.server.openapi import install_openapi
from tokenloom.server.request_handling import ServerState

logger = logging.getLogger(__name__)


SWEEP_INTERVAL_S = 1.0  # how often idle models are checked against their keep-alive
ENGINE_WATCH_INTERVAL_S = 0.25  # how often the engines' loops are checked


def server_specs(config: ServerConfig, model: str | None, engine_options: dict[str, Any]) -> list[ModelSpec]:
    """The models a server knows: those of `models_dir` and `models_config` (a later one replaces an
    earlier one of the same name), each with the command line's engine options under its own, and `model`
    (when given) under `served_model_name`, loaded at start and kept loaded (keep_alive -1)."""
    from tokenloom.catalog import specs_from_dir, specs_from_yaml

    found = (specs_from_dir(Path(config.models_dir)) if config.models_dir else []) + (
        specs_from_yaml(Path(config.models_config)) if config.models_config else [])
    specs = {s.name: s for s in found}
    for spec in specs.values():
        spec.engine_options = {**engine_options, **spec.engine_options}
    if model is not None:
        name = config.served_model_name or model
        options = {**engine_options, "enable_adapters": True} if config.adapter_paths else dict(engine_options)
        specs[name] = ModelSpec(name, model, options, keep_alive_s=-1.0)
    elif config.adapter_paths:
        raise ServerConfigError("adapters: they belong to the command line's model; name one")
    return list(specs.values())


def build_state(config: ServerConfig, specs: list[ModelSpec], default_model: str | None) -> ServerState:
    """The server's model manager (each model an async engine, per-model metrics) and shared state."""
    metrics: ServerMetrics | None = None

    def on_load(served: ServedModel) -> None:
        if metrics is not None:
            metrics.attach(served)

    budget = None if config.memory_budget_gib is None else int(config.memory_budget_gib * 2**30)
    manager = ModelManager(specs, memory_budget_bytes=budget, max_loaded_models=config.max_loaded_models,
                           default_keep_alive_s=config.keep_alive_s,
                           engine_factory=served_model_factory(config.max_waiting, on_load),
                           measure=served_bytes, close=ServedModel.close)
    metrics = ServerMetrics(manager)
    adapters = {name: AdapterRequest(name, path) for name, path in config.adapter_paths.items()}
    enabled = bool(adapters) or any(s.engine_options.get("enable_adapters") for s in specs if s.name == default_model)
    return ServerState(ModelLeases(manager, default_model, adapters if enabled else None), config, metrics)


def build_app(state: ServerState) -> FastAPI:
    """An OpenAI-compatible app over the state's models; while it runs, idle models are swept."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_sweep_forever(state.manager)), asyncio.create_task(_watch_engines(state))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(title="tokenloom", version=tokenloom.__version__, lifespan=lifespan)
    app.state.tokenloom = state
    for module in (completions, chat, embeddings, models, misc):
        app.include_router(module.router)
    install_error_handlers(app)
    install_openapi(app, state.config.api_key is not None)
    # Added last = outermost: an oversized body is refused before the key is even looked at.
    if state.config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=state.config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes,
                       timeout=state.config.body_timeout)
    app.add_middleware(ErrorCounter, metrics=state.metrics)  # outermost: counts the others' refusals too
    return app


async def _sweep_forever(manager: ModelManager) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            unloaded = await loop.run_in_executor(None, manager.sweep)
        except Exception:
            logger.exception("sweeping idle models failed")
            continue
        for name in unloaded:
            logger.info("unloaded %s: idle past its keep_alive", name)


async def _watch_engines(state: ServerState) -> None:
    """Stop serving, to exit non-zero, once a loaded model's engine loop died: its requests have already
    ended with an error and /health says so; a supervisor restarts the process."""
    while True:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        dead = [name for name, served in state.manager.loaded().items() if not served.is_alive]
        if dead and not state.models.draining:
            logger.error("the engine of %s stopped; shutting down to be restarted", ", ".join(dead))
            state.exit_code = 1
            if state.request_exit is not None:
                state.request_exit()
            return


class _DrainingServer(uvicorn.Server):
    """uvicorn stops listening and waits for open responses on a signal; the engine must also stop taking
    requests and, after the drain timeout, abort those still running so their streams end cleanly."""

    def __init__(self, config: uvicorn.Config, models: ModelLeases, drain_timeout: float) -> None:
        super().__init__(config)
        self.models, self.drain_timeout = models, drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.models.draining:
            logger.info("draining: no new requests; %d in flight get up to %.0fs to finish",
                        self.models.num_in_flight(), self.drain_timeout)
            self.models.begin_drain(self.drain_timeout)
        super().handle_exit(sig, frame)


class ListenError(OSError):
    """The server's address cannot be bound (in use, not local, not permitted)."""


def bind_server_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening) before the slow part of start-up: the port is ours from
    here on, so nothing started meanwhile (a model load, Ray's processes and their outbound connections) can
    take it, and a taken port fails in a second rather than after the load. Clients are refused until the
    server listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts reuse a TIME_WAIT port
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def log_address(sock: socket.socket) -> None:
    """uvicorn logs its address only for sockets it binds itself: say where the server listens."""
    host, port = sock.getsockname()[:2]
    logger.info("serving on http://%s:%d (press CTRL+C to quit)", f"[{host}]" if ":" in host else host, port)


def run_server(state: ServerState, sock: socket.socket | None = None) -> int:
    """Serve until SIGINT or SIGTERM, then drain: in-flight requests finish (up to the drain timeout), every
    model is unloaded, and the process returns normally instead of dying from the re-raised signal. Returns
    the exit code: 0, or 1 when an engine loop died. `sock`: the address already bound (`bind_server_socket`),
    else bound now."""
    config = state.config
    if sock is None:
        sock = bind_server_socket(config.host, config.port)
    app = build_app(state)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=int(config.drain_timeout) + 5,
                               http=GuardedH11Protocol.configure(config.header_timeout, config.max_connections))
    server = _DrainingServer(uv_config, state.models, config.drain_timeout)
    state.request_exit = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean return.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM,)}
    log_address(sock)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.manager.close_all()
    return state.exit_code


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
