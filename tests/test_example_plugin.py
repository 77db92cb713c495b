"""The example plugin package (examples/plugins), installed with pip and found through its entry point:
its logits processor, preprocessor, postprocessor, model architecture and task all take effect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenloom import SamplingParams
from tokenloom.plugins import load_plugins, registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example package into a folder of its own and put it on sys.path, as a site dir."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(EXAMPLE, build / "plugin")  # setuptools writes build files next to the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(build / "plugin")], check=True)
    sys.path.insert(0, str(target))
    infos = {i.name: i for i in load_plugins()}
    yield infos["example"]
    registry.unload("example")
    sys.path.remove(str(target))
    for module in [m for m in sys.modules if m.startswith("tokenloom_example_plugin")]:
        del sys.modules[module]


@pytest.fixture(scope="module")
def llama(tiny_models):
    from tokenloom.llm import LLM

    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.02)


def test_the_entry_point_registers_one_of_each_kind(installed, capsys):
    from tokenloom.cli import main

    assert installed.error is None and installed.adds == {
        "logits_processors": ["ban_tokens"], "preprocessors": ["uppercase"], "postprocessors": ["word_count"],
        "models": ["ScaledLlamaForCausalLM"], "tasks": ["shouting"]}
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "example  (entry point tokenloom_example_plugin)" in out and "tasks: shouting" in out


def test_its_logits_processor_by_name(installed, llama):
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llama.generate([[5, 17, 42]], plain, use_tqdm=False)[0].outputs[0].token_ids
    banned = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            logits_processors=[{"name": "ban_tokens", "args": {"token_ids": first[:2]}}])
    out = llama.generate([[5, 17, 42]], banned, use_tqdm=False)[0].outputs[0].token_ids
    assert not set(out) & set(first[:2])


def test_its_task_with_its_pre_and_postprocessor(installed, llama, tmp_path):
    from tokenloom import pipeline
    from tokenloom.pipelines import load_pipeline

    texts = ["hello world", "the quick brown fox"]
    want = llama.generate([t.upper() for t in texts], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for pipe in (pipeline("shouting", model=llama),
                 _yaml_pipeline(tmp_path, load_pipeline, llama)):
        results = pipe(texts)
        assert [r["text"] for r in results] == [o.outputs[0].text for o in want]
        assert [r["num_words"] for r in results] == [len(o.outputs[0].text.split()) for o in want]


def _yaml_pipeline(tmp_path, load_pipeline, llama):
    path = tmp_path / "shout.yaml"
    path.write_text(f"task: shouting\nmodel: {llama.engine.loaded.path}\nengine: {{dtype: float32, "
                    f"kv_cache_gib: 0.02}}\n")
    return load_pipeline(path)


def test_its_model_architecture(installed, tiny_models, tmp_path, hf_reference):
    from tokenloom.llm import LLM

    path = tmp_path / "scaled"
    shutil.copytree(tiny_models["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["ScaledLlamaForCausalLM"], logit_scale=2.0)
    (path / "config.json").write_text(json.dumps(config))
    scaled = LLM(str(path), dtype="float32", kv_cache_gib=0.02)
    assert type(scaled.engine.loaded.model).__name__ == "ScaledLlamaForCausalLM"
    prompt = [5, 17, 42, 99]
    out = scaled.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf_reference(tiny_models["llama"])(torch.tensor([prompt])).logits[0, -1]
    want = torch.log_softmax(2.0 * logits, -1)
    for token, entry in out.outputs[0].logprobs[0].items():
        assert entry.logprob == pytest.approx(want[token].item(), abs=1e-4)
