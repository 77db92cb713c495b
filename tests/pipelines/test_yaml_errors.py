"""A malformed pipeline YAML fails with the file, the line and the field named (before the model loads
where the model is not needed to tell)."""

from __future__ import annotations

import pytest

from tokenloom.pipelines import PipelineConfigError, load_pipeline, load_spec

CASES = {
    "yaml syntax": ("task: chat\nsampling: {temperature: 0\n", 3, None, "not valid YAML"),
    "not a mapping": ("- task: chat\n", 1, None, "a pipeline is a mapping"),
    "missing task": ("model: gemma-3-270m\n", 1, "task", "required"),
    "unknown task": ("model: gemma-3-270m\ntask: sumarization\n", 2, "task", "unknown task 'sumarization'"),
    "misspelled field": ("task: summarization\nsampling_params: {}\n", 2, "sampling_params",
                         "takes no option 'sampling_params'"),
    "engine option": ("task: chat\nengine:\n  dtype: float32\n  kv_cache_gib: -1\n", 4, "engine.kv_cache_gib",
                      "kv_cache_gib must be > 0"),
    "unknown engine option": ("task: chat\nengine:\n  kv_cache: 1\n", 3, "engine.kv_cache", "unknown engine option"),
    "sampling value": ("task: chat\nsampling:\n  max_tokens: 8\n  temperature: 500\n", 4, "sampling.temperature",
                       "must be in [0, 100]"),
    "unknown sampling parameter": ("task: chat\nsampling: {temprature: 1}\n", 2, "sampling.temprature",
                                   "unknown sampling parameter"),
    "batch size": ("task: chat\nbatch_size: 0\n", 2, "batch_size", "integer >= 1"),
    "steps not a list": ("task: chat\nsteps: generate\n", 2, "steps", "must be a list"),
    "unknown step": ("task: chat\nsteps:\n  - normalize\n  - promt: {template: x}\n  - generate\n", 4,
                     "steps[1]", "unknown step 'promt'"),
    "unknown step option": ("task: chat\npreprocess:\n  - normalize:\n      form: NFC\n      frm: NFC\n", 5,
                            "preprocess[0].normalize.frm", "takes no option 'frm'"),
    "bad step option value": ("task: chat\npreprocess:\n  - normalize: {form: NFX}\n", 3,
                              "preprocess[0].normalize.form", "must be one of NFC"),
    "inference option": ("task: summarization\ninference:\n  beam_search:\n    beam_width: 0\n", 4,
                         "inference.beam_search.beam_width", "must be an integer >= 1"),
    "inference of another kind": ("task: summarization\ninference: normalize\n", 2, "inference",
                                  "'normalize' is a preprocess step"),
    "template syntax": ("task: text-generation\nsteps:\n  - prompt:\n      template: '{% for x in y %}'\n"
                        "  - generate\n", 4, "steps[0].prompt.template", "Jinja syntax error"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_errors_name_file_line_and_field(name, write_yaml):
    text, line, field, fragment = CASES[name]
    path = write_yaml(text)
    with pytest.raises(PipelineConfigError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}:"), message
    if field is not None:
        assert f"field {field!r}:" in message, message
    assert fragment in message, message


def test_errors_found_while_building_name_the_task_option(tiny_llm, write_yaml):
    path = write_yaml("task: text-generation\nsampling: {max_tokens: 4}\ntemplate: |\n  {{ text }\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path} line 3: field 'template': Jinja syntax error"):
        load_pipeline(path, llm=tiny_llm)
    path = write_yaml("task: text-classification\nlabels: positive\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path} line 2: field 'labels': must be a list"):
        load_pipeline(path, llm=tiny_llm)
    path = write_yaml("task: chat\nsteps: [normalize, generate, score_labels]\n")
    with pytest.raises(PipelineConfigError, match=rf"^{path} line 2: field 'steps': .*exactly one inference step"):
        load_pipeline(path, llm=tiny_llm)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PipelineConfigError, match="nope.yaml: cannot read"):
        load_spec(tmp_path / "nope.yaml")
