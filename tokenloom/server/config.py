"""Server options; each field is also a `tokenloom serve` flag (`--max-waiting` ↔ `max_waiting`)."""

from __future__ import annotations

from dataclasses import dataclass


class ServerConfigError(ValueError):
    """A server option has an invalid value; the message names the option."""


@dataclass(slots=True)
class ServerConfig:
    """How the HTTP server listens, authenticates and protects itself, and which models it serves: the
    command line's model (loaded at start and kept loaded) plus, on demand, every model of `models_dir`
    and `models_config`, within `memory_budget_gib` (weights plus KV cache) and `max_loaded_models`;
    `keep_alive` (seconds or 30s / 10m / 2h; 0: unload after the last request; -1: never) is how long an
    on-demand model stays loaded once idle, unless its catalog entry or a request says otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 1024
    max_body_bytes: int = 8 * 2**20
    drain_timeout: float = 30.0
    log_level: str = "info"
    models_dir: str | None = None
    models_config: str | None = None
    memory_budget_gib: float | None = None
    max_loaded_models: int | None = None
    keep_alive: str = "5m"
    # Adapters (LoRA, soft prompt, prefix) of the command line's model, NAME=PATH[,NAME=PATH...]: each is a
    # model of its own in /v1/models (its parent the base model), picked by a request's `model`, as vLLM's
    # --lora-modules.
    adapters: str | None = None
    # How models write tool calls (hermes, llama3_json, json, or a plugin's); default: what the chat template
    # writes (json, described in a system message, for templates that know no tools).
    tool_call_parser: str | None = None
    # A request that gives no max_tokens generates at most this many (0: up to the context, vLLM's default);
    # one that asks for more than max_tokens_limit is refused (0: no limit but the context).
    max_tokens_default: int = 2048
    max_tokens_limit: int = 0
    max_prompts_per_request: int = 256  # a completion's list of prompts
    header_timeout: float = 30.0  # seconds for a request line and its headers (slowloris)
    body_timeout: float = 60.0  # seconds for a request body, from its headers on
    max_connections: int = 1024  # open connections; past it a new one is answered 503
    # The folder POST /v1/models/load may load adapters from (adapter_path inside it; no .., no URLs). Unset,
    # clients cannot make the server read a path: only the --adapters given at start exist.
    adapter_dir: str | None = None
    # Scale-out on Ray (tokenloom[ray]): this many replicas of the server behind this endpoint, on a local Ray
    # instance or the cluster at ray_address; routing: prefix (to the replica holding the prompt's leading
    # blocks, balanced against load) or round_robin.
    replicas: int = 1
    ray_address: str | None = None
    routing: str = "prefix"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be in [0, 65535]; got {self.port}")
        if self.max_waiting < 1:
            raise ServerConfigError(f"max_waiting must be >= 1; got {self.max_waiting}")
        if self.replicas < 1:
            raise ServerConfigError(f"replicas must be >= 1; got {self.replicas}")
        if self.routing not in ("prefix", "round_robin"):
            raise ServerConfigError(f"routing must be prefix or round_robin; got {self.routing!r}")
        if self.max_body_bytes < 1:
            raise ServerConfigError(f"max_body_bytes must be >= 1; got {self.max_body_bytes}")
        for name in ("max_tokens_default", "max_tokens_limit"):
            if getattr(self, name) < 0:
                raise ServerConfigError(f"{name} must be >= 0 (0: up to the context); got {getattr(self, name)}")
        if self.max_tokens_limit and self.max_tokens_default > self.max_tokens_limit:
            raise ServerConfigError(f"max_tokens_default ({self.max_tokens_default}) must not exceed "
                                    f"max_tokens_limit ({self.max_tokens_limit})")
        for name in ("max_prompts_per_request", "max_connections"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ServerConfigError(f"{name} must be > 0 seconds; got {getattr(self, name)}")
        if self.drain_timeout < 0:
            raise ServerConfigError(f"drain_timeout must be >= 0; got {self.drain_timeout}")
        if self.tool_call_parser is not None:
            from tokenloom.structured.tool_parsers import tool_parser

            try:
                tool_parser(self.tool_call_parser)
            except ValueError as exc:
                raise ServerConfigError(f"tool_call_parser: {exc}") from exc
        if self.api_key == "":
            raise ServerConfigError("api_key must not be empty (omit it to disable authentication)")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ServerConfigError(f"memory_budget_gib must be > 0; got {self.memory_budget_gib}")
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise ServerConfigError(f"max_loaded_models must be >= 1; got {self.max_loaded_models}")
        try:
            _ = self.keep_alive_s
        except ValueError as exc:
            raise ServerConfigError(f"keep_alive: {exc}") from exc
        _ = self.adapter_paths
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ServerConfigError(f"log_level must be one of critical, error, warning, info, debug; "
                                    f"got {self.log_level!r}")

    @property
    def adapter_paths(self) -> dict[str, str]:
        """`adapters` as {name: path}; ServerConfigError names a malformed entry."""
        out: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in (self.adapters or "").split(","))):
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ServerConfigError(f"adapters: each entry must be NAME=PATH; got {entry!r}")
            if name.strip() in out:
                raise ServerConfigError(f"adapters: {name.strip()!r} is named twice")
            out[name.strip()] = path.strip()
        return out

    @property
    def keep_alive_s(self) -> float:
        """The default keep-alive of models loaded on demand, in seconds (-1: forever)."""
        from tokenloom.catalog import parse_keep_alive

        return parse_keep_alive(self.keep_alive)
