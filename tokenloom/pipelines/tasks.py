"""The built-in tasks: each picks its default steps by what the model is (decoder-only, encoder–decoder
or encoder-only) and takes a few task options (templates, few-shot examples, labels, languages)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenloom.pipelines import templates
from tokenloom.pipelines.base import PipelineError
from tokenloom.pipelines.registry import StepSpec, TaskPlan, register_task

if TYPE_CHECKING:
    from tokenloom.llm import LLM

Examples = list[dict[str, Any]] | None


def prompt_step(template: str | None, template_file: str | None, default: str, examples: Examples,
                chat: bool, system: str | None, **variables: Any) -> StepSpec:
    """A prompt step with the task's default template unless one is given."""
    source = templates.read_template(template, template_file, default)
    return StepSpec("prompt", {"template": source, "examples": examples or [], "variables": variables,
                               "chat": chat, "system": system})


def _needs_generative(llm: LLM, task: str) -> None:
    if llm.kind == "encoder":
        raise PipelineError(f"task {task!r} needs a generative model; {llm.engine.loaded.name} is encoder-only",
                            "model")


def _needs_encoder(llm: LLM, task: str, *what: str) -> None:
    if llm.kind != "encoder" or not set(what) & set(llm.supported_tasks):
        raise PipelineError(f"task {task!r} needs an encoder-only model with {' or '.join(what)} support; "
                            f"{llm.engine.loaded.name} supports {', '.join(llm.supported_tasks)}", "model")


def text_generation(llm: LLM, template: str | None = None, template_file: str | None = None,
                    examples: Examples = None, chat: bool = False, system: str | None = None,
                    chunk_tokens: int | None = None) -> TaskPlan:
    """Continue each item's `text` (rendered through `template` / the chat template when given)."""
    _needs_generative(llm, "text-generation")
    steps = [StepSpec("chunk", {"max_tokens": chunk_tokens})] if chunk_tokens else []
    if template or template_file or chat or examples:
        steps.append(prompt_step(template, template_file, templates.TEXT_GENERATION, examples, chat, system))
    return TaskPlan([*steps, StepSpec("generate")], {"max_tokens": 128})


def chat(llm: LLM, system: str | None = None, chat_template: str | None = None) -> TaskPlan:
    """Reply to each item's `messages` (or `text` as one user message) through the chat template."""
    _needs_generative(llm, "chat")
    return TaskPlan([StepSpec("chat_template", {"system": system, "chat_template": chat_template}),
                     StepSpec("generate")], {"max_tokens": 256})


def summarization(llm: LLM, template: str | None = None, template_file: str | None = None,
                  examples: Examples = None, chat: bool = False, system: str | None = None,
                  chunk_tokens: int | None = None) -> TaskPlan:
    """Summarize each item's `text` (encoder–decoder models read it as is; decoder-only models through a
    few-shot prompt); `chunk_tokens` summarizes a long text piece by piece."""
    _needs_generative(llm, "summarization")
    steps = [StepSpec("chunk", {"max_tokens": chunk_tokens})] if chunk_tokens else []
    if llm.kind == "decoder" or template or template_file:
        steps.append(prompt_step(template, template_file, templates.SUMMARIZATION, examples, chat, system))
    return TaskPlan([*steps, StepSpec("generate")],
                    {"temperature": 0.0, "max_tokens": 128, "stop": ["\n"]})


def translation(llm: LLM, target_language: str = "French", source_language: str = "English",
                template: str | None = None, template_file: str | None = None, examples: Examples = None,
                chat: bool = False, system: str | None = None) -> TaskPlan:
    """Translate each item's `text` (encoder–decoder models read it as is; decoder-only models through a
    few-shot prompt naming the two languages)."""
    _needs_generative(llm, "translation")
    steps = []
    if llm.kind == "decoder" or template or template_file:
        steps.append(prompt_step(template, template_file, templates.TRANSLATION, examples, chat, system,
                                 source_language=source_language, target_language=target_language))
    return TaskPlan([*steps, StepSpec("generate")], {"temperature": 0.0, "max_tokens": 128, "stop": ["\n"]})


def question_answering(llm: LLM, template: str | None = None, template_file: str | None = None,
                       examples: Examples = None, chat: bool = False, system: str | None = None,
                       max_answer_len: int = 15, truncate: bool = True) -> TaskPlan:
    """Answer each item's `question` from its `context`: extractive with an encoder's QA head, else
    generated from a few-shot prompt and cut to its first line."""
    if llm.kind == "encoder":
        _needs_encoder(llm, "question-answering", "qa")
        return TaskPlan([StepSpec("answer", {"max_answer_len": max_answer_len, "truncate": truncate})])
    return TaskPlan([prompt_step(template, template_file, templates.QUESTION_ANSWERING, examples, chat, system),
                     StepSpec("generate"), StepSpec("extract_answer")],
                    {"temperature": 0.0, "max_tokens": 32, "stop": ["\n"]})


def text_classification(llm: LLM, labels: list[str] | None = None, template: str | None = None,
                        template_file: str | None = None, examples: Examples = None, chat: bool = False,
                        system: str | None = None, label_prefix: str = " ", length_normalize: bool = False,
                        truncate: bool = False) -> TaskPlan:
    """Label each item's `text` (and `text_pair`): with an encoder's classifier head, or zero-shot with a
    generative model by the log-likelihood of each of `labels` (or the item's own) after a few-shot prompt."""
    if llm.kind == "encoder":
        _needs_encoder(llm, "text-classification", "classify")
        return TaskPlan([StepSpec("classify", {"truncate": truncate})])
    return zero_shot_classification(llm, labels, template, template_file, examples, chat, system, label_prefix,
                                    length_normalize)


def zero_shot_classification(llm: LLM, labels: list[str] | None = None, template: str | None = None,
                             template_file: str | None = None, examples: Examples = None, chat: bool = False,
                             system: str | None = None, label_prefix: str = " ", length_normalize: bool = False
                             ) -> TaskPlan:
    """Zero-shot classification with a generative model (see `text_classification`)."""
    if llm.kind != "decoder":  # an encoder–decoder reads prompt + label in its encoder: nothing to score
        raise PipelineError(f"zero-shot classification scores labels with a decoder-only model; "
                            f"{llm.engine.loaded.name} is {llm.kind}", "model")
    variables = {"labels": labels} if labels else {}
    return TaskPlan([prompt_step(template, template_file, templates.CLASSIFICATION, examples, chat, system,
                                 **variables),
                     StepSpec("score_labels", {"labels": labels or [], "label_prefix": label_prefix,
                                               "length_normalize": length_normalize})])


def token_classification(llm: LLM, strict: bool = False, keep_tokens: bool = False, truncate: bool = False
                         ) -> TaskPlan:
    """Entities in each item's `text` (NER): a token-classification head's BIO / IOB2 tags grouped into
    spans with character offsets."""
    _needs_encoder(llm, "token-classification", "token_classify")
    return TaskPlan([StepSpec("classify_tokens", {"truncate": truncate}),
                     StepSpec("aggregate_entities", {"strict": strict, "keep_tokens": keep_tokens})])


def fill_mask(llm: LLM, top_k: int = 5, truncate: bool = False) -> TaskPlan:
    """The top_k candidates for each mask token in each item's `text`."""
    _needs_encoder(llm, "fill-mask", "fill_mask")
    return TaskPlan([StepSpec("fill_mask", {"top_k": top_k, "truncate": truncate})])


def feature_extraction(llm: LLM, pooling: str | None = None, normalize: bool | None = None,
                       truncate: bool = False) -> TaskPlan:
    """A sentence embedding of each item's `text`."""
    _needs_encoder(llm, "feature-extraction", "embed")
    return TaskPlan([StepSpec("embed", {"pooling": pooling, "normalize": normalize, "truncate": truncate})])


def sentence_similarity(llm: LLM, truncate: bool = False) -> TaskPlan:
    """How similar each item's `text` and `text_pair` are: cosine of embeddings, or a cross-encoder's score."""
    _needs_encoder(llm, "sentence-similarity", "score", "embed")
    return TaskPlan([StepSpec("score", {"truncate": truncate})])


def extract(llm: LLM, schema: dict[str, Any] | None = None, template: str | None = None,
            template_file: str | None = None, examples: Examples = None, chat: bool = False,
            system: str | None = None) -> TaskPlan:
    """Structured extraction: each item's `text` → `result["json"]`, a JSON value generated under `schema` (a
    JSON schema: the output always parses and validates); few-shot `examples` are {"text", "json"}."""
    _needs_generative(llm, "extract")
    if not isinstance(schema, dict) or not schema:
        raise PipelineError("extract needs a JSON schema (a non-empty mapping)", "schema")
    fields = list((schema.get("properties") or {}).keys())
    return TaskPlan([prompt_step(template, template_file, templates.EXTRACTION, examples, chat, system,
                                 fields=fields),
                     StepSpec("generate"), StepSpec("parse_json", {"schema": schema})],
                    {"max_tokens": 256, "temperature": 0.0})


BUILTIN_TASKS = {
    "text-generation": text_generation, "chat": chat, "summarization": summarization, "translation": translation,
    "question-answering": question_answering, "text-classification": text_classification,
    "zero-shot-classification": zero_shot_classification, "token-classification": token_classification,
    "ner": token_classification, "fill-mask": fill_mask, "feature-extraction": feature_extraction,
    "sentence-similarity": sentence_similarity, "extract": extract,
}
for _name, _factory in BUILTIN_TASKS.items():
    register_task(_name, _factory)
