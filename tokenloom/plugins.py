"""Plugins: code outside tokenloom that adds logits processors (custom inference strategies), model
architectures, pipeline steps (preprocessors, postprocessors) and tasks, without forking.

A plugin is a module (or any object) with a `register(registry)` function, found through the entry-point
group `tokenloom.plugins` of installed packages or named with `--plugin module.path`:

    # pyproject.toml of the plugin package
    [project.entry-points."tokenloom.plugins"]
    my_plugin = "my_plugin"                     # a module with register(), or "my_plugin:register"

    def register(registry: tokenloom.plugins.PluginRegistry) -> None:
        registry.add_logits_processor("ban_digits", BanDigits)   # factory(**args) -> processor
        registry.add_model("MyForCausalLM", MyForCausalLM)
        registry.add_step("postprocessor", "shout", Shout)
        registry.add_task("shouting", make_shouting_pipeline)
        registry.add_tool_parser("my_format", MyToolCallParser)        # tool-call format
        registry.add_constraint_backend("my_backend", MyBackend)       # structured outputs backend

A plugin that fails to import or register is reported by name (`tokenloom plugins list`, the log) and
skipped; everything else keeps working. What a plugin registered before failing is taken back.

A logits processor is called per request and step as `processor(prompt_ids, output_ids, logits)` on that
request's float32 logits row [vocab] and returns the row (it may modify it in place). Requests select
processors by name with arguments: `SamplingParams(logits_processors=["name", {"name": ..., "args":
{...}}])`, the same list in a server request body, or a pipeline's sampling parameters.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch

from tokenloom.sampling_params import SamplingParamsError

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "tokenloom.plugins"


class LogitsProcessor(Protocol):
    """Reshapes one request's next-token logits (custom decoding strategies)."""

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        ...


class PluginError(ValueError):
    """A processor, plugin or plugin spec that cannot be used; the message names it."""


class NoRepeatNGram:
    """Forbid any n-gram from occurring twice in the prompt plus output (transformers' `no_repeat_ngram_size`)."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise PluginError(f"no_repeat_ngram: size must be an integer >= 1; got {size!r}")
        self.size = size

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        tokens = list(prompt_ids) + list(output_ids)
        n = self.size
        if len(tokens) + 1 < n:
            return logits
        prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
        if banned:
            logits[list(banned)] = float("-inf")
        return logits


@dataclass(slots=True)
class PluginInfo:
    """One plugin as `tokenloom plugins list` shows it: where it came from, what it added, or its error."""

    name: str
    source: str
    adds: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class PluginRegistry:
    """Where plugins register what they add; each addition is recorded under the plugin making it."""

    def __init__(self) -> None:
        self.logits_processors: dict[str, Callable[..., LogitsProcessor]] = {"no_repeat_ngram": NoRepeatNGram}
        self.plugins: dict[str, PluginInfo] = {}
        self._current: PluginInfo | None = None
        self._undo: list[Callable[[], None]] = []
        self._undo_by_plugin: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.RLock()

    # ---- what a plugin calls ----

    def add_logits_processor(self, name: str, factory: Callable[..., LogitsProcessor]) -> None:
        """Make `factory(**args)` selectable per request as `name`."""
        if name in self.logits_processors:
            raise PluginError(f"logits processor {name!r} is already registered")
        self.logits_processors[name] = factory
        self._record("logits_processors", name, lambda: self.logits_processors.pop(name, None))

    def add_model(self, architecture: str, model_class: Any) -> None:
        """Load checkpoints whose config names `architecture` with `model_class`."""
        from tokenloom.models import registry

        previous = registry.register_model(architecture, model_class)
        self._record("models", architecture, lambda: registry.unregister_model(architecture, previous))

    def add_step(self, kind: str, name: str, factory: Callable[..., Any]) -> None:
        """A pipeline step (`kind`: preprocessor, postprocessor or inference) usable by name in pipelines."""
        from tokenloom import pipelines

        pipelines.register_step(kind, name, factory)
        self._record(f"{kind}s", name, lambda: pipelines.unregister_step(kind, name))

    def add_task(self, name: str, factory: Callable[..., Any]) -> None:
        """A pipeline task usable as `tokenloom.pipeline(name, ...)` and in pipeline YAML."""
        from tokenloom import pipelines

        pipelines.register_task(name, factory)
        self._record("tasks", name, lambda: pipelines.unregister_task(name))

    def add_constraint_backend(self, name: str, factory: Callable[..., Any]) -> None:
        """A structured-outputs backend (`factory(TokenizerInfo)` → a `tokenloom.structured.Backend`), picked
        by `--structured-outputs-backend NAME` or a request's `structured_outputs.backend`."""
        from tokenloom.structured import register_backend, unregister_backend

        register_backend(name, factory)
        self._record("constraint_backends", name, lambda: unregister_backend(name))

    def add_tool_parser(self, name: str, parser: type) -> None:
        """A tool-call format (a `tokenloom.structured.tool_parsers.ToolCallParser` subclass), picked by
        `--tool-call-parser NAME`."""
        from tokenloom.structured.tool_parsers import register_tool_parser, unregister_tool_parser

        register_tool_parser(name, parser)
        self._record("tool_parsers", name, lambda: unregister_tool_parser(name))

    # ---- what tokenloom calls ----

    def logits_processor(self, spec: str | dict[str, Any] | Callable[..., Any]) -> LogitsProcessor:
        """A processor from a request's spec: a name, {"name", "args"}, or (offline) a callable itself."""
        if callable(spec) and not isinstance(spec, str):
            return spec
        if isinstance(spec, str):
            name, args = spec, {}
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str) and set(spec) <= {"name", "args"}:
            name, args = spec["name"], spec.get("args") or {}
        else:
            raise PluginError(f"logits_processors: each entry must be a name or {{'name': ..., 'args': {{...}}}}; "
                              f"got {spec!r}")
        if not isinstance(args, dict):
            raise PluginError(f"logits_processors: args of {name!r} must be a mapping; got {args!r}")
        if name not in self.logits_processors:
            load_plugins()  # an installed plugin's processor, asked for before anything loaded plugins
        factory = self.logits_processors.get(name)
        if factory is None:
            known = ", ".join(sorted(self.logits_processors))
            raise PluginError(f"logits_processors: unknown processor {name!r}; known: {known}")
        try:
            return factory(**args)
        except PluginError:
            raise
        except (TypeError, ValueError) as exc:
            raise PluginError(f"logits_processors: {name!r} does not take these args {args!r}: {exc}") from exc

    def load(self, name: str, import_target: Callable[[], Any], source: str) -> PluginInfo:
        """Import one plugin (`import_target()` returns its module or register function) and run its
        `register`; a failure is recorded (and what it had added undone), not raised."""
        with self._lock:
            info = PluginInfo(name, source)
            self.plugins[name] = info
            self._current, self._undo = info, []
            try:
                _register_function(import_target())(self)
                self._undo_by_plugin[name] = self._undo
            except Exception as exc:  # a plugin's bug must not take tokenloom down
                for undo in reversed(self._undo):
                    undo()
                info.adds, info.error = {}, f"{type(exc).__name__}: {exc}"
                logger.warning("plugin %s (%s) skipped: %s", name, source, info.error)
            finally:
                self._current, self._undo = None, []
            return info

    def unload(self, name: str) -> None:
        """Take back everything plugin `name` registered (it can be loaded again later)."""
        with self._lock:
            for undo in reversed(self._undo_by_plugin.pop(name, [])):
                undo()
            info = self.plugins.pop(name, None)
            if info is not None:
                _loaded_sources.discard(info.source)

    def _record(self, kind: str, name: str, undo: Callable[[], None]) -> None:
        if self._current is not None:
            self._current.adds.setdefault(kind, []).append(name)
            self._undo.append(undo)


def _register_function(target: Any) -> Callable[[PluginRegistry], None]:
    register = getattr(target, "register", target)
    if not callable(register):
        raise PluginError(f"{target!r} has no register(registry) function")
    return register


registry = PluginRegistry()
_loaded_sources: set[str] = set()


def build_logits_processors(specs: list[Any] | None) -> list[LogitsProcessor]:
    """A request's logits processors from its `SamplingParams.logits_processors` (names resolved through
    the registry, installed plugins loaded on a miss); a bad entry is a SamplingParamsError naming it."""
    try:
        return [registry.logits_processor(spec) for spec in specs or []]
    except PluginError as exc:
        raise SamplingParamsError(str(exc)) from exc


def load_plugins(modules: Iterable[str] = (), entry_point_plugins: bool = True) -> list[PluginInfo]:
    """Load the installed entry-point plugins (once per process) and the named modules; returns every
    plugin loaded so far, failed ones included. The registries call it themselves when asked for a name
    they do not know, so installed plugins work without an explicit call."""
    found: list[tuple[str, Any, str]] = []
    if entry_point_plugins:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.append((ep.name, ep.load, f"entry point {ep.value}"))
    for module in modules:
        found.append((module, _module_loader(module), f"--plugin {module}"))
    for name, loader, source in found:
        if source not in _loaded_sources:
            _loaded_sources.add(source)
            registry.load(name, loader, source)
    return list(registry.plugins.values())


def _module_loader(module: str) -> Callable[[], Any]:
    def import_module() -> Any:
        path, _, attr = module.partition(":")
        loaded = importlib.import_module(path)
        return getattr(loaded, attr) if attr else loaded
    return import_module
