"""One replica: a whole tokenloom server (model manager, engines, every route, its own metrics) in a Ray actor's
process, listening on 127.0.0.1 behind the front (`distributed/front.py`), which holds the only public port.

The replica is the single-machine server unchanged, so everything it does the endpoint does. It takes requests
only with the front's internal key. If its engine loop dies the process exits non-zero and Ray restarts the
actor, which loads the model again and listens on a new port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # for uvicorn to listen once the model is loaded


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ThreadedServer(uvicorn.Server):
    """uvicorn off the main thread: the actor's process keeps its own signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ReplicaServer:
    """The actor's body: builds the server's state exactly as `tokenloom serve` does (the command line's model
    loaded now), serves it on a free port of 127.0.0.1 with `internal_key` required, and reports its address."""

    def __init__(self, server_options: dict[str, Any], model: str | None, engine_options: dict[str, Any],
                 internal_key: str) -> None:
        from tokenloom.server.app import build_app, build_state, server_specs
        from tokenloom.server.config import ServerConfig

        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        config = ServerConfig(**{**server_options, "host": "127.0.0.1", "port": free_port(), "api_key": internal_key,
                                 "replicas": 1, "ray_address": None})
        state = build_state(config, server_specs(config, model, engine_options), config.served_model_name or model)
        if state.models.default_model is not None:
            state.manager.get(state.models.default_model)  # a load error fails the actor's start, not a request
        self._state = state
        uv_config = uvicorn.Config(build_app(state), host=config.host, port=config.port, log_level="warning",
                                   timeout_graceful_shutdown=int(config.drain_timeout) + 5)
        self._server = _ThreadedServer(uv_config)
        state.request_exit = lambda: setattr(self._server, "should_exit", True)
        self._thread = threading.Thread(target=self._serve, name="tokenloom-replica-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the replica's server did not start on port {config.port}")
            time.sleep(0.02)
        self._url = f"http://127.0.0.1:{config.port}"

    def url(self) -> str:
        """Where this replica listens."""
        return self._url

    def pid(self) -> int:
        """This replica's process id (tests kill it)."""
        return os.getpid()

    def _serve(self) -> None:
        try:
            self._server.run()
        finally:
            self._state.manager.close_all()
        if self._state.exit_code:  # the engine loop died: exit so that Ray restarts the actor
            logger.error("replica exiting with status %d to be restarted", self._state.exit_code)
            os._exit(self._state.exit_code)
