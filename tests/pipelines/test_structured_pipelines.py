"""Constraints in pipelines: parse_json with a schema constrains the generation (every item's JSON validates),
a YAML pipeline's sampling takes structured_outputs, the extract task (text + schema → JSON) on
gemma-3-270m, and beam search with a constraint is refused clearly."""

from __future__ import annotations

import re

import jsonschema
import pytest

import tokenloom
from tokenloom.pipelines import PipelineError, load_pipeline

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_parse_json_with_a_schema_constrains_the_generation(tiny_llm):
    pipe = tokenloom.pipeline("text-generation", tiny_llm, sampling={"max_tokens": 40, "temperature": 0.0},
                              postprocess=[{"parse_json": {"schema": PERSON}}])
    assert pipe.sampling.structured_outputs is not None
    results = pipe(["one", "two", "three"])
    for result in results:
        if "error" in result:  # the random model ran out of tokens inside the JSON: the item says so
            assert "stopped at max_tokens before the JSON was complete" in result["error"], result["error"]
        else:
            assert result["finish_reason"] == "stop"
            jsonschema.validate(result["json"], PERSON)
    assert any("error" not in result for result in results)
    short = tokenloom.pipeline("text-generation", tiny_llm, sampling={"max_tokens": 3, "temperature": 0.0},
                               postprocess=[{"parse_json": {"schema": PERSON}}])(["one"])[0]
    assert "generation stopped at max_tokens before the JSON was complete" in short["error"]
    loose = tokenloom.pipeline("text-generation", tiny_llm, sampling={"max_tokens": 8},
                               postprocess=[{"parse_json": {"schema": PERSON, "enforce": False, "strict": False}}])
    assert loose.sampling.structured_outputs is None


def test_a_yaml_pipeline_takes_structured_outputs(tiny_llm, write_yaml):
    path = write_yaml("""
        task: text-generation
        sampling:
          max_tokens: 8
          temperature: 0
          structured_outputs: {regex: "[0-9]{3}-[a-z]{2}"}
    """)
    for result in load_pipeline(path, llm=tiny_llm)(["a", "b"]):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", result["text"])
    bad = write_yaml("""
        task: text-generation
        sampling: {structured_outputs: {regex: "a", choice: [b]}}
    """, "bad.yaml")
    with pytest.raises(PipelineError, match="exactly one of"):
        load_pipeline(bad, llm=tiny_llm)


def test_beam_search_with_a_constraint_is_refused(tiny_llm):
    with pytest.raises(PipelineError, match="beam search does not take a structured-outputs constraint"):
        tokenloom.pipeline("text-generation", tiny_llm, inference={"beam_search": {"beam_width": 2}},
                           postprocess=[{"parse_json": {"schema": PERSON}}])
    with pytest.raises(PipelineError, match="already hold a structured_outputs constraint"):
        tokenloom.pipeline("text-generation", tiny_llm, sampling={"structured_outputs": {"regex": "x"}},
                           postprocess=[{"parse_json": {"schema": PERSON}}])


def test_extract_on_gemma(gemma):
    extract = tokenloom.pipeline("extract", gemma, schema=PERSON, examples=[
        {"text": "Bob turned 52 last week.", "json": {"name": "Bob", "age": 52}}])
    texts = ["Alice is a 34-year-old engineer from Lyon.", "At 71, Marco still runs every morning."]
    results = extract(texts)
    for result in results:
        assert "error" not in result, result
        jsonschema.validate(result["json"], PERSON)
    assert results[0]["json"] == {"name": "Alice", "age": 34}
    assert results[1]["json"]["age"] == 71
    with pytest.raises(PipelineError, match="extract needs a JSON schema"):
        tokenloom.pipeline("extract", gemma)
