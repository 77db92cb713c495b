"""Plugins: logits processors selected per request (the built-in no_repeat_ngram against transformers), plugins
found through entry points and --plugin, and broken plugins reported and skipped."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from tokenloom import SamplingParams
from tokenloom.plugins import PluginRegistry, build_logits_processors, load_plugins, registry
from tokenloom.sampling_params import SamplingParamsError

PROMPTS = [[5, 17, 42, 99, 7], [11, 12, 13, 11, 12], list(range(3, 30))]


@pytest.fixture(scope="module")
def llama(tiny_models):
    from tokenloom.llm import LLM

    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.02)


def test_no_repeat_ngram_equals_transformers(llama, tiny_models, hf_reference):
    model = hf_reference(tiny_models["llama"])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            logits_processors=[{"name": "no_repeat_ngram", "args": {"size": 2}}])
    outs = llama.generate(PROMPTS, params, use_tqdm=False)
    plain = llama.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, no_repeat_ngram_size=2,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
        tokens = prompt + ref
        bigrams = list(zip(tokens, tokens[1:]))
        for i in range(len(prompt) - 1, len(bigrams)):  # no generated token completes a bigram seen before
            assert bigrams[i] not in bigrams[:i]
    # The tiny model repeats itself without the processor, so the test shows the processor at work.
    assert any(o.outputs[0].token_ids != b.outputs[0].token_ids for o, b in zip(outs, plain))


def test_unknown_processors_and_bad_args_are_named(llama):
    """Processors are resolved when a request is added (SamplingParams is a plain value)."""
    with pytest.raises(SamplingParamsError, match="unknown processor 'nope'; known: .*no_repeat_ngram"):
        build_logits_processors(["nope"])
    with pytest.raises(SamplingParamsError, match="size must be an integer >= 1; got 0"):
        build_logits_processors([{"name": "no_repeat_ngram", "args": {"size": 0}}])
    with pytest.raises(SamplingParamsError, match="does not take these args"):
        build_logits_processors([{"name": "no_repeat_ngram", "args": {"width": 2}}])
    with pytest.raises(SamplingParamsError, match="each entry must be a name or"):
        build_logits_processors([{"processor": "no_repeat_ngram"}])
    with pytest.raises(ValueError, match="prompt 0: logits_processors: unknown processor 'nope'"):
        llama.generate(PROMPTS[:1], SamplingParams(logits_processors=["nope"]), use_tqdm=False)


def test_a_failing_processor_fails_only_its_own_request(llama):
    def explode(prompt_ids, output_ids, logits):
        if len(output_ids) == 3:
            raise RuntimeError("strategy bug")
        return logits

    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logits_processors=[explode])
    alone = llama.generate(PROMPTS[:2], good, use_tqdm=False)
    outs = llama.generate(PROMPTS[:2] + PROMPTS[:1], [good, good, bad], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:2]] == [o.outputs[0].token_ids for o in alone]
    assert outs[2].outputs[0].finish_reason == "error" and "strategy bug" in str(outs[2].outputs[0].stop_reason)


PLUGIN = textwrap.dedent('''
    from tokenloom.plugins import PluginError

    class BanToken:
        def __init__(self, token: int) -> None:
            self.token = token

        def __call__(self, prompt_ids, output_ids, logits):
            logits[self.token] = float("-inf")
            return logits

    def register(registry):
        registry.add_logits_processor("ban_token_{tag}", BanToken)
''')

BROKEN = textwrap.dedent('''
    def register(registry):
        registry.add_logits_processor("half_registered", lambda: None)
        raise RuntimeError("plugin bug")
''')


def test_plugins_from_a_module_and_an_entry_point(tmp_path, monkeypatch, llama):
    (tmp_path / "local_plugin.py").write_text(PLUGIN.format(tag="local"))
    (tmp_path / "installed_plugin.py").write_text(PLUGIN.format(tag="installed"))
    (tmp_path / "broken_plugin.py").write_text(BROKEN)
    dist = tmp_path / "installed_plugin-1.0.dist-info"  # what pip leaves for an installed package
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tokenloom.plugins]\ninstalled = installed_plugin\n"
                                           "broken = broken_plugin:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    infos = {i.name: i for i in load_plugins(["local_plugin"])}
    try:
        assert infos["local_plugin"].adds == {"logits_processors": ["ban_token_local"]}
        assert infos["installed"].adds == {"logits_processors": ["ban_token_installed"]}
        assert infos["broken"].error == "RuntimeError: plugin bug" and infos["broken"].adds == {}
        assert "half_registered" not in registry.logits_processors  # what it added before failing is undone
        prompt = PROMPTS[1]
        base = llama.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
        banned = llama.generate([prompt], SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True,
            logits_processors=[{"name": "ban_token_installed", "args": {"token": base[0]}}]), use_tqdm=False)
        assert banned[0].outputs[0].token_ids[0] != base[0]
    finally:
        for name in ("ban_token_local", "ban_token_installed"):
            registry.logits_processors.pop(name, None)
        for name in ("local_plugin", "installed", "broken"):
            registry.plugins.pop(name, None)
        sys.modules.pop("local_plugin", None)
        sys.modules.pop("installed_plugin", None)


def test_a_registry_refuses_a_name_twice():
    reg = PluginRegistry()
    info = reg.load("dup", lambda: (lambda r: (r.add_logits_processor("no_repeat_ngram", object))), "test")
    assert "already registered" in info.error and reg.logits_processors["no_repeat_ngram"] is not object
