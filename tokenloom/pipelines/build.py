"""Build a Pipeline from a task name, a model and options: `tokenloom.pipeline(task, model=..., **options)`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenloom.config import option_names
from tokenloom.pipelines.base import KINDS, Pipeline, PipelineError, Step
from tokenloom.pipelines.postprocess import ParseJson
from tokenloom.pipelines.registry import StepSpec, check_options, get_step, plan_task
from tokenloom.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from tokenloom.llm import LLM

StepLike = StepSpec | str | dict[str, Any] | tuple[str, dict[str, Any]]


@dataclass
class PipelineSpec:
    """Everything that defines a pipeline, before its model is loaded (what a pipeline YAML holds).

    `steps` replaces the task's default steps; `inference` replaces just their inference step (e.g.
    beam_search for generate); `preprocess` steps run before them and `postprocess` steps after.
    `options` are the task's own options (templates, labels, ...)."""

    task: str
    model: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] | SamplingParams = field(default_factory=dict)
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)
    steps: list[StepSpec] | None = None
    preprocess: list[StepSpec] = field(default_factory=list)
    postprocess: list[StepSpec] = field(default_factory=list)
    inference: StepSpec | None = None


def as_step_spec(value: StepLike) -> StepSpec:
    """A step given as a StepSpec, a name, a one-key {name: options} mapping or a (name, options) pair."""
    if isinstance(value, StepSpec):
        return value
    if isinstance(value, str):
        return StepSpec(value)
    if isinstance(value, dict) and len(value) == 1:
        (name, options), = value.items()
        return StepSpec(name, dict(options or {}))
    if isinstance(value, tuple) and len(value) == 2:
        return StepSpec(value[0], dict(value[1] or {}))
    raise PipelineError(f"a step is a name or a one-key mapping {{name: options}}; got {value!r}")


def make_step(spec: StepSpec) -> tuple[str, Step]:
    """Instantiate one step; an error names `step.option`."""
    if not isinstance(spec.options, dict):
        raise PipelineError("a step's options must be a mapping", spec.name)
    kind, factory = get_step(spec.name)
    try:
        check_options(factory, spec.options, f"step {spec.name!r}")
        step = factory(**spec.options)
    except PipelineError as exc:
        raise PipelineError(exc.reason, f"{spec.name}.{exc.field}" if exc.field else spec.name) from exc
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc), spec.name) from exc
    if not callable(getattr(step, "run", None)):
        raise PipelineError(f"the factory returned {type(step).__name__}, which has no run(items, ctx)", spec.name)
    return kind, step


def make_steps(specs: list[StepSpec], where: str | None = None) -> list[tuple[str, str, Step]]:
    """(kind, name, step) for each spec; with `where` ("steps"), errors name `where[i].option`."""
    made = []
    for i, spec in enumerate(specs):
        try:
            kind, step = make_step(spec)
        except PipelineError as exc:
            if where is None:
                raise
            raise PipelineError(exc.reason, f"{where}[{i}]" + (f".{exc.field}" if exc.field else "")) from exc
        made.append((kind, spec.name, step))
    return made


def check_order(steps: list[tuple[str, str, Step]]) -> None:
    """Preprocessors, exactly one inference step, postprocessors — in that order."""
    kinds = [kind for kind, _, _ in steps]
    if kinds.count("inference") != 1:
        names = [name for kind, name, _ in steps if kind == "inference"]
        raise PipelineError(f"a pipeline needs exactly one inference step; got {len(names)} ({', '.join(names)})",
                            "steps")
    ranks = [KINDS.index(k) for k in kinds]
    if ranks != sorted(ranks):
        raise PipelineError("steps must be preprocessors, then the inference step, then postprocessors; got "
                            + ", ".join(f"{name} ({kind})" for kind, name, _ in steps), "steps")


def sampling_params(defaults: dict[str, Any], given: dict[str, Any] | SamplingParams | None) -> SamplingParams:
    """The pipeline's sampling parameters: the task's defaults under the given ones."""
    if isinstance(given, SamplingParams):
        return given
    try:
        return SamplingParams(**{**defaults, **(given or {})})
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc), "sampling") from exc


def check_inference(spec: StepSpec) -> None:
    """A step that can stand in for a task's inference step; errors name `inference.step.option`."""
    try:
        kind, _ = make_step(spec)
    except PipelineError as exc:
        raise PipelineError(exc.reason, f"inference.{exc.field}" if exc.field else "inference") from exc
    if kind != "inference":
        raise PipelineError(f"{spec.name!r} is a {kind} step, not an inference step", "inference")


def task_steps(spec: PipelineSpec, defaults: list[StepSpec]) -> list[tuple[str, str, Step]]:
    """The spec's own steps, or the task's, with the inference step swapped when the spec names one."""
    specs = spec.steps if spec.steps is not None else defaults
    if spec.inference is not None:
        check_inference(spec.inference)
        specs = [spec.inference if get_step(s.name)[0] == "inference" else s for s in specs]
    if spec.steps is not None:
        return make_steps(specs, "steps")
    try:
        return make_steps(specs)
    except PipelineError as exc:  # a task option passed on to one of the task's steps
        option = (exc.field or "").rsplit(".", 1)[-1]
        raise PipelineError(exc.reason, option if option in spec.options else exc.field) from exc


def build_pipeline(spec: PipelineSpec, llm: LLM | None = None) -> Pipeline:
    """Load the model (unless `llm` is given) and assemble the pipeline the spec describes."""
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise PipelineError(f"must be an integer >= 1; got {spec.batch_size!r}", "batch_size")
    if llm is None:
        from tokenloom.llm import LLM

        llm = LLM(spec.model, **spec.engine) if spec.model else LLM(**spec.engine)
    plan = plan_task(spec.task, llm, spec.options)
    main = task_steps(spec, plan.steps)
    steps = make_steps(spec.preprocess, "preprocess") + main + make_steps(spec.postprocess, "postprocess")
    check_order(steps)
    sampling = enforced_schema(steps, sampling_params(plan.sampling, spec.sampling))
    return Pipeline(spec.task, llm, [(name, step) for _, name, step in steps], sampling, spec.batch_size)


def enforced_schema(steps: list[tuple[str, str, Step]], sampling: SamplingParams) -> SamplingParams:
    """The sampling parameters with a `parse_json` step's schema as the generation's constraint (when it
    enforces one); beam search takes no constraint."""
    schemas = [step.schema for _, _, step in steps
               if isinstance(step, ParseJson) and step.schema is not None and step.enforce]
    if schemas:
        if sampling.structured_outputs is not None:
            raise PipelineError("parse_json enforces its schema; the sampling parameters already hold a "
                                "structured_outputs constraint (give one or the other)", "sampling")
        sampling = dataclasses.replace(sampling, structured_outputs=StructuredOutputsParams(json=schemas[-1]))
    if sampling.structured_outputs is not None and any(name == "beam_search" for _, name, _ in steps):
        raise PipelineError("beam search does not take a structured-outputs constraint (a JSON schema, regex, "
                            "choice or grammar); use the generate step", "inference")
    return sampling


def pipeline(task: str, model: str | LLM | None = None, *, sampling: dict[str, Any] | SamplingParams | None = None,
             batch_size: int = 32, steps: list[StepLike] | None = None, preprocess: list[StepLike] | None = None,
             postprocess: list[StepLike] | None = None, inference: StepLike | None = None,
             **options: Any) -> Pipeline:
    """A pipeline for `task` on `model` (a model reference, or a loaded `LLM` to share).

    Keyword options that are engine options (`kv_cache_gib`, `dtype`, ...) configure the model; the rest
    are the task's options (`template`, `examples`, `labels`, `target_language`, ...). `sampling` is a
    SamplingParams or a mapping over the task's defaults; `steps` replaces the task's steps, `inference`
    only its inference step (e.g. `{"beam_search": {"beam_width": 4}}`), `preprocess` / `postprocess` add
    steps before / after them (a step is a name or {name: options}).

        summarize = tokenloom.pipeline("summarization", model="gemma-3-270m", kv_cache_gib=0.25)
        summarize(["A long text ..."])[0]["text"]
    """
    engine = {k: v for k, v in options.items() if k in option_names() and k != "model"}
    task_options = {k: v for k, v in options.items() if k not in engine}
    llm = None
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if model is not None and not isinstance(model, str):
        if engine:
            raise PipelineError(f"engine options ({', '.join(engine)}) cannot apply to an already loaded LLM", "model")
        llm, model = model, None
    spec = PipelineSpec(task, model, engine, sampling or {}, batch_size, task_options,
                        [as_step_spec(s) for s in steps] if steps is not None else None,
                        [as_step_spec(s) for s in preprocess or []], [as_step_spec(s) for s in postprocess or []],
                        as_step_spec(inference) if inference is not None else None)
    return build_pipeline(spec, llm)
