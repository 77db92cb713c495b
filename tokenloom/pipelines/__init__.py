"""Task pipelines: preprocessors, one inference step and postprocessors over batches of items.

    import tokenloom
    qa = tokenloom.pipeline("question-answering", model="gemma-3-270m", kv_cache_gib=0.25)
    qa([{"question": "Who wrote it?", "context": "It was written by Ada."}])
    pipe = tokenloom.pipelines.load_pipeline("pipeline.yaml")   # see yaml_spec for the format

Steps and tasks are found by name in registries that plugins extend with `register_step(kind, name,
factory)` and `register_task(name, factory)` (see `registry`).
"""

from tokenloom.pipelines.base import (
    ERROR,
    RESULT,
    Item,
    ItemStep,
    Pipeline,
    PipelineContext,
    PipelineError,
    Step,
    fail,
)
from tokenloom.pipelines.batch import RunSummary, read_rows, run_file
from tokenloom.pipelines.beam import BeamSearch
from tokenloom.pipelines.build import PipelineSpec, build_pipeline, pipeline
from tokenloom.pipelines.encoder import Answer, Classify, ClassifyTokens, Embed, FillMask, Score
from tokenloom.pipelines.entities import AggregateEntities, group_entities
from tokenloom.pipelines.generate import Generate, ScoreLabels
from tokenloom.pipelines.postprocess import ExtractAnswer, ParseJson, ParseLabel
from tokenloom.pipelines.preprocess import ChatTemplate, Chunk, Normalize, Prompt, Tokenize
from tokenloom.pipelines.registry import (
    StepSpec,
    TaskPlan,
    get_step,
    get_task,
    register_step,
    register_task,
    step_names,
    task_names,
    unregister_step,
    unregister_task,
)
from tokenloom.pipelines.yaml_spec import PipelineConfigError, load_pipeline, load_spec

BUILTIN_STEPS = {
    "preprocess": {"normalize": Normalize, "prompt": Prompt, "chat_template": ChatTemplate, "chunk": Chunk,
                   "tokenize": Tokenize},
    "inference": {"generate": Generate, "beam_search": BeamSearch, "score_labels": ScoreLabels, "embed": Embed,
                  "classify": Classify, "score": Score, "classify_tokens": ClassifyTokens, "answer": Answer,
                  "fill_mask": FillMask},
    "postprocess": {"parse_label": ParseLabel, "extract_answer": ExtractAnswer, "parse_json": ParseJson,
                    "aggregate_entities": AggregateEntities},
}
for _kind, _steps in BUILTIN_STEPS.items():
    for _name, _factory in _steps.items():
        register_step(_kind, _name, _factory, replace=True)

import tokenloom.pipelines.tasks  # noqa: E402,F401 - registers the built-in tasks

__all__ = [
    "ERROR", "RESULT", "Item", "ItemStep", "Pipeline", "PipelineContext", "PipelineError", "Step", "fail",
    "RunSummary", "read_rows", "run_file", "PipelineSpec", "build_pipeline", "pipeline", "AggregateEntities",
    "group_entities", "Generate", "ScoreLabels", "ExtractAnswer", "ParseJson", "ParseLabel", "ChatTemplate", "Chunk",
    "Normalize", "Prompt", "Tokenize", "StepSpec", "TaskPlan", "get_step", "get_task", "register_step",
    "register_task", "step_names", "task_names", "unregister_step", "unregister_task", "PipelineConfigError",
    "load_pipeline", "load_spec", "Answer", "Classify", "ClassifyTokens", "Embed", "FillMask", "Score",
    "BeamSearch",
]
