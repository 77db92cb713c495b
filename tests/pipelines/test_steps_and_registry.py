"""Steps on their own (hand-worked cases), the step/task registries and the plugin system's use of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tokenloom.pipelines import (
    RESULT,
    ItemStep,
    PipelineError,
    StepSpec,
    TaskPlan,
    get_step,
    group_entities,
    load_pipeline,
    pipeline,
    register_step,
    register_task,
    task_names,
    unregister_step,
    unregister_task,
)
from tokenloom.pipelines.postprocess import ExtractAnswer, ParseJson, ParseLabel
from tokenloom.pipelines.preprocess import Normalize
from tokenloom.sampling_params import SamplingParams


def tokens(text: str, tags: list[str]) -> list[dict]:
    """One token per word of `text`, tagged in order, with its character span."""
    out, pos = [], 0
    for word, tag in zip(text.split(), tags, strict=True):
        start = text.index(word, pos)
        pos = start + len(word)
        out.append({"label": tag, "score": 0.5 + 0.1 * len(out), "start": start, "end": pos})
    return out


def test_bio_tags_group_into_entities_with_offsets():
    text = "Ada Lovelace met Charles Babbage in London today"
    got = group_entities(tokens(text, ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]), text)
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in got] == [
        ("PER", "Ada Lovelace", 0, 12), ("PER", "Charles Babbage", 17, 32), ("LOC", "London", 36, 42)]
    assert got[0]["score"] == pytest.approx(0.55)


def test_iob2_edge_cases():
    text = "New York Paris Rome x"
    tags = ["B-LOC", "I-LOC", "B-LOC", "I-PER", "I-LOC"]
    lenient = group_entities(tokens(text, tags), text)
    assert [(e["entity"], e["text"]) for e in lenient] == [("LOC", "New York"), ("LOC", "Paris"), ("PER", "Rome"),
                                                           ("LOC", "x")]
    strict = group_entities(tokens(text, tags), text, strict=True)
    assert [(e["entity"], e["text"]) for e in strict] == [("LOC", "New York"), ("LOC", "Paris")]
    bare = group_entities(tokens("Ada Lovelace in London", ["PER", "PER", "O", "LOC"]), "Ada Lovelace in London")
    assert [(e["entity"], e["text"]) for e in bare] == [("PER", "Ada Lovelace"), ("LOC", "London")]


def test_item_postprocessors():
    item = {"context": "It was written by Ada in 1843.", RESULT: {"text": " Ada.\nQuestion: more"}}
    ExtractAnswer().apply(item, None)
    assert item[RESULT] == {"text": " Ada.\nQuestion: more", "answer": "Ada", "start": 18, "end": 21}
    item = {RESULT: {"text": "I think it is Negative, not positive"}}
    ParseLabel(labels=["positive", "negative"]).apply(item, None)
    assert item[RESULT]["label"] == "negative"
    item = {RESULT: {"text": 'Sure: {"name": "Ada", "year": 1843} done'}}
    ParseJson(required_keys=["name"]).apply(item, None)
    assert item[RESULT]["json"] == {"name": "Ada", "year": 1843}
    with pytest.raises(PipelineError, match="no valid JSON"):
        ParseJson().apply({RESULT: {"text": "{broken"}}, None)
    assert Normalize(collapse_whitespace=True, form="NFKC").clean("  ﬁne \n  day ") == "fine day"


def test_a_row_missing_a_template_field_fails_alone(tiny_llm):
    qa = pipeline("question-answering", tiny_llm, sampling={"max_tokens": 2})
    got = qa([{"question": "Who?", "context": "Ada."}, {"question": "Who?"}])
    assert "answer" in got[0]
    assert got[1] == {"error": "prompt: UndefinedError: 'context' is undefined"}


@dataclass
class Shout(ItemStep):
    """Upper-case the generated text (a plugin's postprocessor)."""

    suffix: str = "!"

    def apply(self, item, ctx) -> None:
        item[RESULT]["text"] = item[RESULT]["text"].upper() + self.suffix


def shouting(llm, suffix: str = "!") -> TaskPlan:
    """A plugin's task: generate, then shout."""
    return TaskPlan([StepSpec("generate"), StepSpec("shout", {"suffix": suffix})], {"max_tokens": 4})


def test_plugin_registered_step_and_task_work_from_yaml(tiny_llm, write_yaml):
    from tokenloom.plugins import PluginRegistry

    plugins = PluginRegistry()
    plugins.load("shouter", lambda: lambda reg: (reg.add_step("postprocessor", "shout", Shout),
                                                 reg.add_task("shouting", shouting)), "test")
    try:
        assert get_step("shout")[0] == "postprocess" and "shouting" in task_names()
        pipe = load_pipeline(write_yaml("task: shouting\nsuffix: '?!'\nsampling: {temperature: 0}\n"), llm=tiny_llm)
        plain = tiny_llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert pipe(["Hello world"])[0]["text"] == plain[0].outputs[0].text.upper() + "?!"
        added = pipeline("text-generation", tiny_llm, sampling={"temperature": 0, "max_tokens": 4},
                         postprocess=[{"shout": {"suffix": "."}}])
        assert added(["Hello world"])[0]["text"] == plain[0].outputs[0].text.upper() + "."
    finally:
        unregister_step("postprocess", "shout")
        unregister_task("shouting")


def test_a_failing_plugin_takes_its_steps_back():
    from tokenloom.plugins import PluginRegistry

    def broken(reg):
        reg.add_step("preprocessor", "half_done", Shout)
        raise RuntimeError("boom")

    info = PluginRegistry().load("broken", lambda: broken, "test")
    assert info.error == "RuntimeError: boom"
    with pytest.raises(PipelineError, match="unknown step 'half_done'"):
        get_step("half_done")


def test_registry_rules(tiny_llm):
    with pytest.raises(PipelineError, match="already registered"):
        register_step("postprocess", "generate", Shout)
    with pytest.raises(PipelineError, match="step kind must be one of"):
        register_step("middle", "x", Shout)
    with pytest.raises(PipelineError, match="task 'chat' is already registered"):
        register_task("chat", shouting)
    with pytest.raises(PipelineError, match="exactly one inference step"):
        pipeline("text-generation", tiny_llm, steps=["normalize"])
    with pytest.raises(PipelineError, match="preprocessors, then the inference step"):
        pipeline("text-generation", tiny_llm, steps=["generate", "normalize"])
    with pytest.raises(PipelineError, match="takes no option 'colour'"):
        pipeline("summarization", tiny_llm, colour="red")


def test_sampling_with_a_logits_processor_from_yaml(tiny_llm, write_yaml):
    pipe = load_pipeline(write_yaml("""
        task: text-generation
        sampling:
          temperature: 0
          max_tokens: 12
          logits_processors: [{name: no_repeat_ngram, args: {size: 1}}]
        """), llm=tiny_llm)
    params = SamplingParams(temperature=0, max_tokens=12, logits_processors=[{"name": "no_repeat_ngram",
                                                                              "args": {"size": 1}}])
    want = tiny_llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]
    got = pipe(["Hello"])[0]["text"]
    assert got == want.text
    assert len(set(want.token_ids)) == len(want.token_ids)
