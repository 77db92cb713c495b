"""The FastAPI app (one per call, each with its own metrics registry) and `run_server`, which serves it
with uvicorn and drains on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

import tokenloom
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.server import chat, completions, misc
from tokenloom.server.config import ServerConfig
from tokenloom.server.errors import install_error_handlers
from tokenloom.server.metrics import ServerMetrics
from tokenloom.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from tokenloom.server.serving import ServerState
from tokenloom.server.tokenization import TokenizerPool

logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """An OpenAI-compatible app over `engine`."""
    app = FastAPI(title="tokenloom", version=tokenloom.__version__)
    name = config.served_model_name or engine.engine.config.model_config.model
    app.state.tokenloom = ServerState(engine, TokenizerPool(engine.engine.tokenizer), config, ServerMetrics(engine),
                                      name)
    for module in (completions, chat, misc):
        app.include_router(module.router)
    install_error_handlers(app)
    # Added last = outermost: an oversized body is refused before the key is even looked at.
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn stops listening and waits for open responses on a signal; the engine must also stop taking
    requests and, after the drain timeout, abort those still running so their streams end cleanly."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.engine.is_draining:
            logger.info("draining: no new requests; %d in flight get up to %.0fs to finish",
                        self.engine.num_in_flight(), self.drain_timeout)
            self.engine.begin_drain(self.drain_timeout)
        super().handle_exit(sig, frame)


def run_server(engine: AsyncEngine, config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain: in-flight requests finish (up to the drain timeout), and
    the process returns normally instead of dying from the re-raised signal."""
    app = build_app(engine, config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=int(config.drain_timeout) + 5)
    server = _DrainingServer(uv_config, engine, config.drain_timeout)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean return.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
