"""Names → factories for steps and tasks; the built-in ones register here at import, plugins add more.

Plugin API:

    from tokenloom.pipelines import register_step, register_task, StepSpec, TaskPlan

    register_step("postprocess", "shout", Shout)            # Shout(**options) -> a Step
    register_task("shouting-generation",                     # factory(llm, **options) -> TaskPlan
                  lambda llm, **opts: TaskPlan([StepSpec("generate"), StepSpec("shout")]))

A step's factory is called with the options written for it (in YAML or in `steps=[...]`), so a
dataclass step is its own factory; a task's factory gets the loaded `LLM` (to pick steps by model kind)
and the task options, and returns the default steps and sampling defaults. Step names are unique across
the three kinds; registering a taken name raises unless `replace=True`. `unregister_step(kind, name)` and
`unregister_task(name)` take a registration back (the plugin system does when a plugin fails midway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenloom.pipelines.base import KINDS, PipelineError, Step

if TYPE_CHECKING:
    from tokenloom.llm import LLM

StepFactory = Callable[..., Step]


@dataclass(slots=True)
class StepSpec:
    """A step by registered name, with the options its factory is called with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TaskPlan:
    """What a task runs by default: its steps in order and sampling defaults (the pipeline's own
    sampling parameters override them)."""

    steps: list[StepSpec]
    sampling: dict[str, Any] = field(default_factory=dict)


TaskFactory = Callable[..., TaskPlan]  # factory(llm: LLM, **task_options) -> TaskPlan

_STEPS: dict[str, tuple[str, StepFactory]] = {}
_TASKS: dict[str, TaskFactory] = {}


_KIND_ALIASES = {"preprocessor": "preprocess", "postprocessor": "postprocess"}


def step_kind(kind: str) -> str:
    """preprocess, inference or postprocess (preprocessor / postprocessor are accepted too)."""
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise PipelineError(f"step kind must be one of {', '.join(KINDS)}; got {kind!r}", "kind")
    return kind


def register_step(kind: str, name: str, factory: StepFactory, *, replace: bool = False) -> None:
    """Make step `name` of `kind` (preprocess, inference or postprocess) available to pipelines."""
    kind = step_kind(kind)
    if not callable(factory):
        raise PipelineError(f"the factory of step {name!r} is not callable", "factory")
    if name in _STEPS and not replace:
        raise PipelineError(f"step {name!r} is already registered (as a {_STEPS[name][0]} step)", "name")
    _STEPS[name] = (kind, factory)


def register_task(name: str, factory: TaskFactory, *, replace: bool = False) -> None:
    """Make task `name` available to `tokenloom.pipeline(name, ...)` and YAML `task: name`."""
    if not callable(factory):
        raise PipelineError(f"the factory of task {name!r} is not callable", "factory")
    if name in _TASKS and not replace:
        raise PipelineError(f"task {name!r} is already registered", "name")
    _TASKS[name] = factory


def unregister_step(kind: str, name: str) -> None:
    """Remove step `name` of `kind` (a plugin's, when the plugin is taken back); absent is fine."""
    if name in _STEPS and _STEPS[name][0] == step_kind(kind):
        del _STEPS[name]


def unregister_task(name: str) -> None:
    """Remove task `name`; absent is fine."""
    _TASKS.pop(name, None)


def get_step(name: str) -> tuple[str, StepFactory]:
    """The kind and factory of step `name` (installed plugins are loaded first if it is unknown)."""
    _load_plugins_unless(name in _STEPS)
    if name not in _STEPS:
        raise PipelineError(f"unknown step {name!r}; known steps: {', '.join(sorted(_STEPS))}")
    return _STEPS[name]


def get_task(name: str) -> TaskFactory:
    """The factory of task `name` (installed plugins are loaded first if it is unknown)."""
    _load_plugins_unless(name in _TASKS)
    if name not in _TASKS:
        raise PipelineError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}", "task")
    return _TASKS[name]


def _load_plugins_unless(known: bool) -> None:
    if not known:
        from tokenloom.plugins import load_plugins

        load_plugins()


def step_names(kind: str | None = None) -> list[str]:
    """Registered step names (of one kind, or all), sorted."""
    return sorted(name for name, (k, _) in _STEPS.items() if kind is None or k == kind)


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str, leading: int = 0) -> None:
    """Raise a PipelineError naming the first option `factory` does not take (after `leading` positional
    arguments), or the required one missing."""
    import inspect

    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = list(params)[leading:]
    bad = next((k for k in options if k not in known), None)
    if bad is not None:
        raise PipelineError(f"{what} takes no option {bad!r}; its options: {', '.join(known) or 'none'}", bad)
    missing = [k for k, p in list(params.items())[leading:] if p.default is p.empty and k not in options
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise PipelineError(f"{what} needs option {missing[0]!r}", missing[0])


def plan_task(name: str, llm: LLM, options: dict[str, Any]) -> TaskPlan:
    """Call task `name`'s factory with the loaded model and the task options (checked by name first)."""
    factory = get_task(name)
    check_options(factory, options, f"task {name!r}", leading=1)
    plan = factory(llm, **options)
    if not isinstance(plan, TaskPlan):
        raise PipelineError(f"task {name!r}: its factory returned {type(plan).__name__}, not a TaskPlan")
    return plan
