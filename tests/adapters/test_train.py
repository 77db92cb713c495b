"""`tokenloom train --method lora|prompt-tuning|p-tuning|prefix-tuning`: the loss falls on a small fixed set,
a seed makes a run repeatable, a resumed run equals an uninterrupted one, PEFT loads what we train and gives
our logits, and bad data fails naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch

from tokenloom import AdapterRequest, SamplingParams
from tokenloom.adapters import AdapterError
from tokenloom.adapters.train import train
from tokenloom.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)


def _generation_data(path, n: int = 12):
    rows = [{"prompt": f"Count {i}:", "completion": " one two three" if i % 2 else " four five six"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def test_loss_falls_and_a_seed_repeats_the_run(tiny_models, tmp_path):
    data = _generation_data(tmp_path / "train.jsonl")
    options = dict(model=str(tiny_models["llama"]), data=str(data), epochs=4, lr=1e-2, batch_size=4, rank=4, seed=7)
    first = train(output=str(tmp_path / "a"), **options)
    # A tiny random model's logits span about one nat (its LM head is small): the loss can fall ~0.3 at most.
    assert all(b < a for a, b in zip(first.losses, first.losses[1:])), first.losses
    assert first.losses[-1] < first.losses[0] - 0.1, first.losses
    second = train(output=str(tmp_path / "b"), **options)
    assert second.losses == first.losses
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "p-tuning"])
def test_a_resumed_run_equals_an_uninterrupted_one(method, tiny_models, tmp_path):
    data = _generation_data(tmp_path / "train.jsonl")
    options = dict(model=str(tiny_models["qwen2"]), data=str(data), lr=5e-3, batch_size=4, rank=4, seed=3,
                   method=method, num_virtual_tokens=3)
    whole = train(output=str(tmp_path / "whole"), epochs=2, **options)
    train(output=str(tmp_path / "part"), epochs=1, **options)
    resumed = train(output=str(tmp_path / "part"), epochs=2, resume=True, **options)
    assert resumed.losses == whole.losses
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_peft_loads_what_we_train_and_gives_our_outputs(arch, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.adapters.test_lora import PROMPTS, _peft_greedy

    out = tmp_path / "lora"
    train(model=str(tiny_models[arch]), data=str(_generation_data(tmp_path / "train.jsonl")), output=str(out),
          epochs=2, lr=1e-2, batch_size=4, rank=4)
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=AdapterRequest("trained", out))
    plain = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert any(o.outputs[0].logprobs != p.outputs[0].logprobs for o, p in zip(outs, plain))  # it did train
    for prompt, o in zip(PROMPTS, outs):
        tokens, logprobs = _peft_greedy(peft_model, prompt, GREEDY.max_tokens)
        assert o.outputs[0].token_ids == tokens
        ours = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, logprobs)) <= 1e-4


@pytest.mark.parametrize(("method", "arch", "encoder"), [
    ("prompt-tuning", "gemma3", None), ("p-tuning", "llama", None), ("p-tuning", "qwen2", "lstm"),
    ("prefix-tuning", "qwen3", None), ("prefix-tuning", "gpt2", None), ("prefix-tuning", "llama", "mlp")])
def test_prompt_learning_trains_and_peft_gives_our_outputs(method, arch, encoder, tiny_models, tmp_path):
    """The loss falls; PEFT loads the adapter and its forward pass gives our greedy tokens and logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.adapters.peft_prompt import peft_logprobs
    from tests.adapters.test_lora import PROMPTS

    out = tmp_path / method
    init = {"init_text": "Count the numbers"} if method == "prompt-tuning" else {}
    result = train(model=str(tiny_models[arch]), data=str(_generation_data(tmp_path / "train.jsonl")),
                   output=str(out), method=method, num_virtual_tokens=4, epochs=3, lr=3e-2, batch_size=4,
                   prompt_encoder=encoder, **init)
    assert result.losses[-1] < result.losses[0], result.losses
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    for prompt, o in zip(PROMPTS, llm.generate(PROMPTS, GREEDY, use_tqdm=False, adapter=AdapterRequest("t", out))):
        got = o.outputs[0]
        want = peft_logprobs(peft_model, prompt + got.token_ids)[len(prompt) - 1:-1]
        assert got.token_ids == want.argmax(-1).tolist()
        ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - want[i, t].item()) for i, (a, t) in enumerate(zip(ours, got.token_ids))) <= 1e-4


def test_classification_through_label_words(tiny_models, tmp_path):
    train_file, dev_file = tmp_path / "train.txt", tmp_path / "dev.txt"
    lines = [f"{i % 2} {'good fine great' if i % 2 else 'bad awful poor'} film {i}" for i in range(16)]
    train_file.write_text("\n".join(lines) + "\n")
    dev_file.write_text("\n".join(lines[:8]) + "\n")
    result = train(model=str(tiny_models["llama"]), data=str(train_file), eval_data=str(dev_file),
                   task="classification", labels="no,yes", template="{text} ->", output=str(tmp_path / "cls"),
                   epochs=10, lr=2e-2, batch_size=4, rank=4, patience=3)
    assert result.losses[-1] < result.losses[0] and result.metrics[-1] == 1.0, (result.losses, result.metrics)


def test_bad_training_data_names_the_file_and_line(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(AdapterError, match=r"bad.jsonl:2: a generation example needs"):
        train(model=model, data=str(bad), output=str(tmp_path / "x"))
    labels = tmp_path / "labels.txt"
    labels.write_text("0 fine\n7 what is this\n")
    with pytest.raises(AdapterError, match=r"labels.txt:2: unknown label '7'"):
        train(model=model, data=str(labels), output=str(tmp_path / "x"), task="classification", labels="no,yes")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AdapterError, match="empty.jsonl holds no examples"):
        train(model=model, data=str(empty), output=str(tmp_path / "x"))
    with pytest.raises(AdapterError, match="needs labels"):
        train(model=model, data=str(labels), output=str(tmp_path / "x"), task="classification")


def test_the_train_command(tiny_models, tmp_path, capsys):
    from tokenloom.cli import main

    data = _generation_data(tmp_path / "train.jsonl", n=4)
    rc = main(["train", "-m", str(tiny_models["llama"]), "--data", str(data), "--output", str(tmp_path / "cli"),
               "--epochs", "2", "--rank", "2", "--batch-size", "2"])
    assert rc == 0 and "epoch 2: loss" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["r"] == 2
    rc = main(["train", "-m", str(tiny_models["llama"]), "--data", str(data), "--output", str(tmp_path / "soft"),
               "--method", "prompt-tuning", "--num-virtual-tokens", "3", "--init-text", "count", "--batch-size", "2"])
    config = json.loads((tmp_path / "soft" / "adapter_config.json").read_text())
    assert rc == 0 and config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3
    assert config["prompt_tuning_init_text"] == "count"
    assert main(["train", "-m", str(tiny_models["llama"]), "--data", str(data), "--output", str(tmp_path / "x"),
                 "--method", "ia3"]) == 2
    assert "method must be one of lora, prompt-tuning, p-tuning, prefix-tuning, full, head, mlm; got 'ia3'" in \
        capsys.readouterr().err
    assert main(["train", "-m", str(tiny_models["llama"]), "--data", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "x")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_a_yaml_config_with_options_that_override_it(tiny_models, tmp_path, capsys):
    from tokenloom.cli import main

    data = _generation_data(tmp_path / "train.jsonl", n=4)
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tiny_models['llama']}\ndata: {data}\nmethod: prefix-tuning\nnum-virtual-tokens: 3\n"
                      f"epochs: 2\nbatch_size: 2\nlr: 0.01\n")
    result = train(config, output=str(tmp_path / "a"), epochs=1)
    assert len(result.losses) == 1
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 3
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "b"), "--num-virtual-tokens", "2"]) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["num_virtual_tokens"] == 2
    config.write_text(f"model: {tiny_models['llama']}\ndata: {data}\nrank: eight\n")
    with pytest.raises(AdapterError, match=r"train.yaml line 3: rank must be int; got 'eight'"):
        train(config, output=str(tmp_path / "c"))
    config.write_text(f"model: {tiny_models['llama']}\nlearning_rate: 0.1\n")
    with pytest.raises(AdapterError, match=r"train.yaml line 2: unknown option 'learning_rate'; options are model"):
        train(config, output=str(tmp_path / "c"))
    config.write_text(f"model: {tiny_models['llama']}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "training needs data, output" in capsys.readouterr().err


def test_lora_dropout_and_bf16_autocast_train_and_resume_exactly(tiny_models, tmp_path):
    data = _generation_data(tmp_path / "train.jsonl")
    options = dict(model=str(tiny_models["llama"]), data=str(data), lr=1e-2, batch_size=4, rank=4, seed=2,
                   lora_dropout=0.3, dtype="bfloat16")
    whole = train(output=str(tmp_path / "whole"), epochs=2, **options)
    assert json.loads((tmp_path / "whole" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    train(output=str(tmp_path / "part"), epochs=1, **options)
    resumed = train(output=str(tmp_path / "part"), epochs=2, resume=True, **options)
    assert resumed.losses == whole.losses  # the dropout masks of epoch 2 too (the RNG state is checkpointed)
    no_dropout = train(output=str(tmp_path / "plain"), epochs=2, **{**options, "lora_dropout": 0.0})
    assert no_dropout.losses[1] != whole.losses[1]


def test_a_file_that_is_not_utf8_names_its_line(tiny_models, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("0 fine\n1 caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(AdapterError, match=r"latin1.txt:2: not UTF-8 \(byte 0xe9 at column 6\)"):
        train(model=str(tiny_models["llama"]), data=str(bad), output=str(tmp_path / "x"), task="classification",
              labels="no,yes")


@pytest.mark.parametrize(("arch", "layers"), [("llama", 1), ("gpt2", None)])
def test_full_fine_tuning_saves_a_model_transformers_loads(arch, layers, tiny_models, tmp_path):
    """The top layer only (its weights move, the others stay), or the whole model; the saved checkpoint
    loads in tokenloom and in transformers with the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.adapters.test_lora import PROMPTS

    out = tmp_path / "full"
    result = train(model=str(tiny_models[arch]), data=str(_generation_data(tmp_path / "train.jsonl")),
                   output=str(out), method="full", train_layers=layers, epochs=3, lr=3e-3, batch_size=4)
    assert result.losses[-1] < result.losses[0], result.losses
    before, after = load_file(tiny_models[arch] / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    if layers == 1:
        assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), sorted(changed)
    else:
        assert any(".h.0." in k for k in changed) and any("wte" in k for k in changed)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = LLM(str(out), dtype="float32", kv_cache_gib=0.01)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for prompt, o in zip(PROMPTS, ours.generate(PROMPTS, params, use_tqdm=False)):
        with torch.no_grad():
            want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        got = [lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], prompt[1:])]
        assert max(abs(g - want[i, t].item()) for i, (g, t) in enumerate(zip(got, prompt[1:]))) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3"])
def test_a_seed_starts_lora_from_pefts_own_initial_weights(arch, tiny_models, tmp_path):
    """Seeded alike, our LoRA's A matrices are PEFT's (same draws, same module order), so a benchmark against
    PEFT compares training runs from one starting point, not two random ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tokenloom.adapters.train import TrainConfig, Trainer
    from tokenloom.adapters.trainable import DEFAULT_TARGETS, GPT2_TARGETS

    trainer = Trainer(TrainConfig(model=str(tiny_models[arch]), data=str(_generation_data(tmp_path / "t.jsonl")),
                                  output=str(tmp_path / "out"), rank=4, alpha=8, seed=7))
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    torch.manual_seed(7)
    targets = list(GPT2_TARGETS if arch == "gpt2" else DEFAULT_TARGETS)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 fan_in_fan_out=arch == "gpt2"))
    state = peft_model.state_dict()
    assert len(trainer.adapter.updates) == sum(k.endswith("lora_A.default.weight") for k in state)
    for name, update in trainer.adapter.updates:
        assert torch.equal(update.a.detach(), state[f"base_model.model.{name}.lora_A.default.weight"]), name
