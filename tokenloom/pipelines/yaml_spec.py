"""Pipelines from YAML: `load_pipeline("pipeline.yaml")`.

    task: question-answering          # required: a registered task
    model: gemma-3-270m               # a model reference (default: the default model)
    engine: {kv_cache_gib: 0.25}      # engine options, as LLM(...) takes them
    sampling: {max_tokens: 32}        # over the task's sampling defaults
    batch_size: 16                    # items per engine call (and per flushed batch in `tokenloom run`)
    examples:                         # any other key is a task option (template, labels, target_language, ...)
      - {context: "...", question: "...", answer: "..."}
    preprocess: [normalize]           # steps before the task's own
    postprocess: [{parse_json: {strict: false}}]   # steps after them
    inference: {beam_search: {beam_width: 4}}      # replaces the task's inference step
    # steps: [...]                    # or replace the task's steps altogether

A step is a name or a one-key mapping {name: {option: value}}. Everything is checked before the model
loads; a malformed file raises PipelineConfigError naming the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tokenloom.config import ConfigError, EngineConfig
from tokenloom.pipelines.base import PipelineError
from tokenloom.pipelines.build import PipelineSpec, as_step_spec, build_pipeline, check_inference, make_steps
from tokenloom.pipelines.registry import check_options, get_task
from tokenloom.sampling_params import SamplingParams
from tokenloom.yamlio import compose_file

if TYPE_CHECKING:
    from tokenloom.llm import LLM
    from tokenloom.pipelines.base import Pipeline

_FIELDS = ("task", "model", "engine", "sampling", "batch_size", "steps", "preprocess", "postprocess", "inference")
_STEP_LISTS = ("steps", "preprocess", "postprocess")


class PipelineConfigError(PipelineError):
    """A pipeline YAML that cannot be used; the message names the file, the line and the field."""


def load_pipeline(path: str | Path, llm: LLM | None = None) -> Pipeline:
    """The pipeline a YAML file describes, with its model loaded (or `llm`, already loaded, shared)."""
    spec, lines = load_spec(path)
    try:
        return build_pipeline(spec, llm)
    except PipelineConfigError:
        raise
    except PipelineError as exc:
        raise located(path, lines, exc.field, exc.reason) from exc


def load_spec(path: str | Path) -> tuple[PipelineSpec, dict[str, int]]:
    """The checked spec of a pipeline YAML and the line of each field (`engine.dtype`, `steps[1].prompt`)."""
    path = Path(path)
    root = _compose(path)
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise PipelineConfigError(f"{path} line {line}: a pipeline is a mapping with at least `task:`")
    lines = field_lines(root)
    data = yaml.safe_load(yaml.serialize(root))
    try:
        return _spec(data), lines
    except PipelineError as exc:
        raise located(path, lines, exc.field, exc.reason) from exc


def _compose(path: Path) -> yaml.Node | None:
    return compose_file(path, PipelineConfigError, "pipeline")


def field_lines(root: yaml.MappingNode) -> dict[str, int]:
    """Line numbers (1-based) of every top-level key, the keys under engine/sampling, and each step entry,
    its name and its options."""
    lines: dict[str, int] = {}
    for key, value in root.value:
        lines[key.value] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub, options in value.value:
                lines[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
                for opt, _ in options.value if isinstance(options, yaml.MappingNode) else []:
                    lines[f"{key.value}.{sub.value}.{opt.value}"] = opt.start_mark.line + 1
        if key.value in _STEP_LISTS and isinstance(value, yaml.SequenceNode):
            for i, entry in enumerate(value.value):
                lines[f"{key.value}[{i}]"] = entry.start_mark.line + 1
                if isinstance(entry, yaml.MappingNode):
                    for name, options in entry.value:
                        lines[f"{key.value}[{i}].{name.value}"] = name.start_mark.line + 1
                        for opt, _ in options.value if isinstance(options, yaml.MappingNode) else []:
                            lines[f"{key.value}[{i}].{name.value}.{opt.value}"] = opt.start_mark.line + 1
    return lines


def located(path: str | Path, lines: dict[str, int], field: str | None, reason: str) -> PipelineConfigError:
    """An error at `field`'s line: its own, else its nearest parent's, else its last part's (a task option
    that reached a step), else the file's first line."""
    line, probe = None, field or ""
    while probe and line is None:
        line = lines.get(probe)
        probe = probe.rsplit(".", 1)[0] if "." in probe else probe.rsplit("[", 1)[0] if "[" in probe else ""
    if line is None and field:
        line = lines.get(field.rsplit(".", 1)[-1])
    where = f" field {field!r}:" if field else ""
    return PipelineConfigError(f"{path} line {line or 1}:{where} {reason}")


def _spec(data: dict[str, Any]) -> PipelineSpec:
    task = data.get("task")
    if not isinstance(task, str) or not task:
        raise PipelineError("required, a registered task name", "task")
    factory = get_task(task)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise PipelineError("must be a model reference (a string)", "model")
    engine = _mapping(data, "engine")
    for key, value in engine.items():
        if key == "model":
            raise PipelineError("give the model as the top-level `model:`", "engine.model")
        try:
            EngineConfig.from_kwargs(**{key: value})
        except (ConfigError, TypeError, ValueError) as exc:
            raise PipelineError(str(exc), f"engine.{key}") from exc
    sampling = _mapping(data, "sampling")
    for key in sampling:
        if key not in SamplingParams.__dataclass_fields__:
            raise PipelineError(f"unknown sampling parameter; known: {', '.join(SamplingParams.__dataclass_fields__)}",
                                f"sampling.{key}")
    try:
        SamplingParams(**sampling)
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc), "sampling." + str(exc).split(" ", 1)[0]) from exc
    batch_size = data.get("batch_size", 32)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"must be an integer >= 1; got {batch_size!r}", "batch_size")
    options = {k: v for k, v in data.items() if k not in _FIELDS}
    check_options(factory, options, f"task {task!r}", leading=1)
    lists = {name: _steps(data, name) for name in _STEP_LISTS}
    inference = None
    if data.get("inference") is not None:
        try:
            inference = as_step_spec(data["inference"])
        except PipelineError as exc:
            raise PipelineError(exc.reason, "inference") from exc
        check_inference(inference)
    return PipelineSpec(task, model, engine, sampling, batch_size, options, lists["steps"],
                        lists["preprocess"] or [], lists["postprocess"] or [], inference)


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise PipelineError("must be a mapping", key)
    return value


def _steps(data: dict[str, Any], key: str) -> list[Any] | None:
    if data.get(key) is None:
        return None
    if not isinstance(data[key], list):
        raise PipelineError("must be a list of steps (a name, or {name: {option: value}})", key)
    specs = []
    for i, entry in enumerate(data[key]):
        try:
            specs.append(as_step_spec(entry))
        except PipelineError as exc:
            raise PipelineError(exc.reason, f"{key}[{i}]") from exc
    make_steps(specs, key)  # every step and option checked before the model loads
    return specs
