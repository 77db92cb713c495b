"""LoRA adapters in PEFT's format, with PEFT (the `peft` package) as the oracle: our greedy tokens and
log-probabilities under an adapter equal PeftModel's; a batch mixing adapters and the base model gives each
request its output alone; adapters never share cached blocks; bad adapters fail with errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from tests.adapters.peft_lora import save_peft_lora
from tokenloom import AdapterRequest, SamplingParams
from tokenloom.adapters import AdapterError
from tokenloom.engine.request import InvalidRequestError
from tokenloom.llm import LLM

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "gpt2"]
PROMPTS = [[5, 17, 42, 99, 7, 3, 25], [11, 12, 13], list(range(3, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """Per architecture: two adapters saved by PEFT (r 4 and 8) and their PeftModels."""
    root = tmp_path_factory.mktemp("lora")
    return {(arch, seed): (root / f"{arch}-{seed}", save_peft_lora(tiny_models[arch], root / f"{arch}-{seed}",
                                                                   seed, 4 * seed, arch))
            for arch in ARCHS for seed in (1, 2)}


def _peft_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=mask, max_new_tokens=steps,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logprobs_equal_peft(arch, tiny_models, adapters):
    llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    for seed in (1, 2):
        path, peft_model = adapters[(arch, seed)]
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=AdapterRequest(f"a{seed}", path))
        for prompt, out in zip(PROMPTS, outs):
            tokens, logprobs = _peft_greedy(peft_model, prompt, GREEDY.max_tokens)
            got = out.outputs[0]
            assert got.token_ids == tokens, f"{arch} adapter {seed}"
            ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
            assert max(abs(a - b) for a, b in zip(ours, logprobs)) <= 1e-4
    # The base model's requests are untouched by the loaded adapters.
    base = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    plain = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in base] == [o.outputs[0].token_ids for o in plain]


def test_a_batch_mixing_four_adapters_and_the_base_model_equals_each_alone(tiny_models, adapters, tmp_path):
    extra = [tmp_path / f"extra{i}" for i in (3, 4)]
    for i, path in zip((3, 4), extra):
        save_peft_lora(tiny_models["llama"], path, i, 4, "llama")
    requests = [AdapterRequest("a1", adapters[("llama", 1)][0]), AdapterRequest("a2", adapters[("llama", 2)][0]),
                AdapterRequest("a3", extra[0]), AdapterRequest("a4", extra[1]), None]
    prompts = [PROMPTS[i % 3] for i in range(5)]
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True, max_adapters=4)
    together = llm.generate(prompts, GREEDY, use_tqdm=False, adapter=requests)
    alone = [llm.generate([p], GREEDY, use_tqdm=False, adapter=a)[0] for p, a in zip(prompts, requests)]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert len({tuple(o.outputs[0].token_ids) for o in together[:2]}) == 2  # the adapters do differ


def test_adapters_never_share_cached_blocks(tiny_models, adapters):
    prompt = list(range(3, 60))  # three full blocks of 16
    a1, a2 = (AdapterRequest(f"a{s}", adapters[("llama", s)][0]) for s in (1, 2))
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    hits = lambda: llm.engine.stats().prefix_cache_hits  # noqa: E731
    first = llm.generate([prompt], GREEDY, use_tqdm=False, adapter=a1)[0]
    before = hits()
    other = llm.generate([prompt], GREEDY, use_tqdm=False, adapter=a2)[0]
    assert hits() == before  # the same prompt under another adapter finds nothing
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert hits() == before  # nor does the base model
    again = llm.generate([prompt], GREEDY, use_tqdm=False, adapter=a1)[0]
    assert hits() > before and again.outputs[0].token_ids == first.outputs[0].token_ids
    fresh = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    assert fresh.generate([prompt], GREEDY, use_tqdm=False, adapter=a2)[0].outputs[0].token_ids == \
        other.outputs[0].token_ids


def test_bad_adapters_fail_alone_naming_the_file(tiny_models, adapters, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True, max_adapters=2)
    # Offline, a request's adapter error is its prompt's error (an AdapterError from the engine itself).
    with pytest.raises(ValueError, match=r"prompt 0: adapter 'gone': .*adapter_config.json does not exist"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=AdapterRequest("gone", tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    shutil.copytree(adapters[("llama", 1)][0], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :32].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"safetensors: .*q_proj has lora_A \(4, 32\).*needs \(4, 64\)"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=AdapterRequest("bad", bad))
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not supported here"):
        llm.engine.add_request("x", PROMPTS[0], GREEDY, adapter=AdapterRequest("bad2", bad))
    # The engine goes on serving, with and without adapters.
    good = AdapterRequest("a1", adapters[("llama", 1)][0])
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=good)[0].outputs[0].token_ids
    off = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01)
    with pytest.raises(InvalidRequestError, match="adapters are off: start the engine with enable_adapters=True"):
        off.generate(PROMPTS[:1], GREEDY, use_tqdm=False, adapter=good)


def test_an_adapter_over_group_quantized_layers(tiny_models, adapters):
    """LoRA adds to the output of any base layer, quantized ones included (int8 weights: close to fp32)."""
    a1 = AdapterRequest("a1", adapters[("llama", 1)][0])
    exact = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    int8 = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True,
               quantization="int8")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for want, got in zip(exact.generate(PROMPTS, params, use_tqdm=False, adapter=a1),
                         int8.generate(PROMPTS, params, use_tqdm=False, adapter=a1)):
        pairs = [(w[t].logprob, g[t].logprob) for w, g, t in
                 zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:], want.prompt_token_ids[1:])]
        assert max(abs(w - g) for w, g in pairs) < 0.05
    base = int8.generate(PROMPTS, params, use_tqdm=False)
    assert any(b.prompt_logprobs[1:] != g.prompt_logprobs[1:] for b, g in
               zip(base, int8.generate(PROMPTS, params, use_tqdm=False, adapter=a1)))
