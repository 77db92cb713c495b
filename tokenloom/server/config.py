"""Server options; each field is also a `tokenloom serve` flag (`--max-waiting` ↔ `max_waiting`)."""

from __future__ import annotations

from dataclasses import dataclass


class ServerConfigError(ValueError):
    """A server option has an invalid value; the message names the option."""


@dataclass(slots=True)
class ServerConfig:
    """How the HTTP server listens, authenticates and protects itself."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 1024
    max_body_bytes: int = 8 * 2**20
    drain_timeout: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be in [0, 65535]; got {self.port}")
        if self.max_waiting < 1:
            raise ServerConfigError(f"max_waiting must be >= 1; got {self.max_waiting}")
        if self.max_body_bytes < 1:
            raise ServerConfigError(f"max_body_bytes must be >= 1; got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ServerConfigError(f"drain_timeout must be >= 0; got {self.drain_timeout}")
        if self.api_key == "":
            raise ServerConfigError("api_key must not be empty (omit it to disable authentication)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ServerConfigError(f"log_level must be one of critical, error, warning, info, debug; "
                                    f"got {self.log_level!r}")
