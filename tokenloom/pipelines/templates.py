"""Jinja prompt templates: the sandboxed environment they render in and each task's default.

A template sees the item's fields (`text`, `question`, `context`, ...), the step's `examples` (few-shot
examples, a list of dicts) and any extra variables the step is given (`target_language`, `labels`).
An undefined variable is an error for that item, not an empty string.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenloom.pipelines.base import PipelineError

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)

TEXT_GENERATION = "{{ text }}"

SUMMARIZATION = (
    "{% for ex in examples %}Text: {{ ex.text }}\nSummary: {{ ex.summary }}\n\n{% endfor %}"
    "Text: {{ text }}\nSummary:"
)

TRANSLATION = (
    "Translate {{ source_language }} to {{ target_language }}.\n\n"
    "{% for ex in examples %}{{ source_language }}: {{ ex.text }}\n{{ target_language }}: {{ ex.translation }}\n\n"
    "{% endfor %}{{ source_language }}: {{ text }}\n{{ target_language }}:"
)

QUESTION_ANSWERING = (
    "Answer the question from the context.\n\n"
    "{% for ex in examples %}Context: {{ ex.context }}\nQuestion: {{ ex.question }}\nAnswer: {{ ex.answer }}\n\n"
    "{% endfor %}Context: {{ context }}\nQuestion: {{ question }}\nAnswer:"
)

# Zero-shot classification scores " {label}" after this prompt for every label.
CLASSIFICATION = (
    "Classify the text as one of: {{ labels | join(', ') }}.\n\n"
    "{% for ex in examples %}Text: {{ ex.text }}\nLabel: {{ ex.label }}\n\n{% endfor %}"
    "Text: {{ text }}\nLabel:"
)


# Extraction: the generated JSON is held to the schema by a constraint; the prompt shows the fields wanted.
EXTRACTION = (
    "Extract the fields {{ fields | join(', ') }} from the text as JSON.\n\n"
    "{% for ex in examples %}Text: {{ ex.text }}\nJSON: {{ ex.json | tojson }}\n\n{% endfor %}"
    "Text: {{ text }}\nJSON:"
)


@lru_cache(maxsize=256)
def compile_template(source: str) -> jinja2.Template:
    """A compiled template; a syntax error is a PipelineError naming the template's line."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise PipelineError(f"Jinja syntax error on template line {exc.lineno}: {exc.message}", "template") from exc


def read_template(template: str | None, template_file: str | None, default: str | None = None) -> str:
    """The template source: given inline, read from a file, or the default."""
    if template is not None and template_file is not None:
        raise PipelineError("give template or template_file, not both", "template_file")
    if template_file is not None:
        try:
            return Path(template_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineError(f"cannot read {template_file}: {exc.strerror or exc}", "template_file") from exc
    if template is None:
        if default is None:
            raise PipelineError("a template is required", "template")
        return default
    if not isinstance(template, str):
        raise PipelineError("must be a string (a Jinja template)", "template")
    return template
