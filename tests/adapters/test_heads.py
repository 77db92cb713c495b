"""Classification heads on an encoder (PEFT's SEQ_CLS LoRA adapters: LoRA on the layers, `classifier` on the
pooled [CLS] token): `tokenloom train --method head` trains one that PEFT loads with our logits; a head saved by
PEFT serves through `llm.classify(adapter=...)` with PEFT's logits; heads and the base model mix in one batch;
wrong pairings fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.encoder_models import tiny_encoder_path
from tokenloom import AdapterRequest
from tokenloom.adapters import AdapterError
from tokenloom.adapters.train import train
from tokenloom.engine.pooling import PoolingParams
from tokenloom.llm import LLM

TEXTS = ["good fine great film", "bad awful poor film 3", "A man is riding a horse.", "Ünïcödé text 🙂"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random bare BERT (BertModel, with its pooler)."""
    return tiny_encoder_path(tmp_path_factory, "bert-Model")


def _peft_logits(base_path, adapter, texts: list[str], num_labels: int) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels, dtype=torch.float32,
                                                              id2label={i: str(i) for i in range(num_labels)})
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


def _save_peft_head(base_path, out, num_labels: int, seed: int) -> None:
    """A random SEQ_CLS LoRA adapter saved by PEFT (B and the classifier random, unlike PEFT's init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels, dtype=torch.float32,
                                                              id2label={i: str(i) for i in range(num_labels)})
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["query", "value", "dense"]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save.default.weight.normal_()
    model.save_pretrained(out)


def _data(path, n: int = 16):
    path.write_text("".join(f"{i % 2} {'good fine great' if i % 2 else 'bad awful poor'} film {i}\n"
                            for i in range(n)))
    return path


def test_a_trained_head_learns_and_peft_gives_our_logits(bert, tmp_path):
    data = _data(tmp_path / "train.txt")
    result = train(model=str(bert), data=str(data), eval_data=str(data), method="head", task="classification",
                   labels="negative,positive", output=str(tmp_path / "head"), epochs=5, lr=5e-2, batch_size=4,
                   rank=4, seed=1)
    assert result.losses[-1] < result.losses[0] / 4 and result.metrics[-1] == 1.0, (result.losses, result.metrics)
    config = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["target_modules"] == ["query", "value"]
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    outs = llm.classify(TEXTS, adapter=AdapterRequest("head", tmp_path / "head"))
    assert [o.labels for o in outs] == [["negative", "positive"]] * len(TEXTS)
    assert outs[0].label == "positive" and outs[1].label == "negative"
    want = _peft_logits(bert, tmp_path / "head", TEXTS, 2)
    assert torch.allclose(torch.tensor([o.logits for o in outs]), want, atol=1e-4)


def test_a_peft_head_serves_with_peft_logits_next_to_other_heads_and_the_base(bert, tmp_path):
    _save_peft_head(bert, tmp_path / "three", 3, seed=5)
    _save_peft_head(bert, tmp_path / "two", 2, seed=6)
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    three, two = AdapterRequest("three", tmp_path / "three"), AdapterRequest("two", tmp_path / "two")
    alone = {a.name: torch.tensor([o.logits for o in llm.classify(TEXTS, adapter=a)]) for a in (three, two)}
    assert torch.allclose(alone["three"], _peft_logits(bert, tmp_path / "three", TEXTS, 3), atol=1e-4)
    assert torch.allclose(alone["two"], _peft_logits(bert, tmp_path / "two", TEXTS, 2), atol=1e-4)
    assert llm.classify(TEXTS[:1], adapter=three)[0].labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    base = llm.embed(TEXTS)
    # One engine step: both heads' requests and the base model's embeddings together.
    engine = llm.engine
    for i, text in enumerate(TEXTS):
        inp = engine.tokenize(text)
        engine.add_request(f"t{i}", inp, PoolingParams("classify"), adapter=three)
        engine.add_request(f"w{i}", inp, PoolingParams("classify"), adapter=two)
        engine.add_request(f"e{i}", inp, PoolingParams("embed"))
    results = {r.request_id: r.data for r in engine.step()}
    assert len(results) == 3 * len(TEXTS)
    for i in range(len(TEXTS)):
        assert torch.allclose(results[f"t{i}"], alone["three"][i], atol=1e-5)
        assert torch.allclose(results[f"w{i}"], alone["two"][i], atol=1e-5)
        assert torch.allclose(results[f"e{i}"], torch.tensor(base[i].embedding), atol=1e-5)


def test_wrong_pairings_fail_clearly(bert, tiny_models, tmp_path, tmp_path_factory):
    data = _data(tmp_path / "train.txt")
    with pytest.raises(AdapterError, match="the mlm method trains encoder-only models"):
        train(model=str(tiny_models["llama"]), data=str(data), method="mlm", output=str(tmp_path / "x"))
    with pytest.raises(AdapterError, match=r"method 'lora' cannot train .* \(encoder model\)"):
        train(model=str(bert), data=str(data), task="classification", labels="a,b", output=str(tmp_path / "x"))
    with_head = tiny_encoder_path(tmp_path_factory, "bert-ForSequenceClassification")
    with pytest.raises(AdapterError, match="has no pooler"):
        train(model=str(with_head), data=str(data), method="head", task="classification", labels="a,b",
              output=str(tmp_path / "x"))
    _save_peft_head(bert, tmp_path / "head", 2, seed=1)
    decoder = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    with pytest.raises(ValueError, match=r"module 'bert\.encoder\.layer\.0\.\S+' is not a linear layer"):
        decoder.classify(TEXTS, adapter=AdapterRequest("head", tmp_path / "head"))  # an encoder's head
    off = LLM(str(bert), dtype="float32")
    with pytest.raises(ValueError, match="adapters are off"):
        off.classify(TEXTS, adapter=AdapterRequest("head", tmp_path / "head"))
    with pytest.raises(ValueError, match="does not support classify"):
        LLM(str(bert), dtype="float32", enable_adapters=True).classify(TEXTS)


@pytest.mark.parametrize("variant", ["bert-Model", "bert-ForMaskedLM"])
def test_mlm_pretraining_saves_a_masked_lm_transformers_loads(variant, tmp_path, tmp_path_factory):
    """Continued masked-LM training of a bare encoder (a new head) or a masked-LM one: the loss falls, a
    resumed run equals an uninterrupted one, and the saved checkpoint fills masks as transformers does."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    base = tiny_encoder_path(tmp_path_factory, variant)
    data = tmp_path / "text.txt"
    data.write_text("".join(f"the cat sat on the mat number {i % 4}\n" for i in range(16)))
    options = dict(model=str(base), data=str(data), eval_data=str(data), method="mlm", lr=1e-2, batch_size=4,
                   seed=3)
    whole = train(output=str(tmp_path / "whole"), epochs=3, **options)
    assert whole.losses[-1] < whole.losses[0] - 2 and whole.metrics[-1] < whole.metrics[0] - 1, whole
    train(output=str(tmp_path / "part"), epochs=1, **options)
    assert train(output=str(tmp_path / "part"), epochs=3, resume=True, **options).losses == whole.losses
    out = tmp_path / "whole"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    hf = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "the cat sat on the [MASK]"
    got = LLM(str(out), dtype="float32").fill_mask(text, top_k=3)[0].predictions[0]
    with torch.no_grad():
        enc = tok(text, return_tensors="pt")
        logits = hf(**enc).logits[0, enc.input_ids[0].tolist().index(tok.mask_token_id)]
    probs = torch.softmax(logits, -1)
    top = probs.topk(3)
    assert [c.token_id for c in got] == top.indices.tolist()
    assert max(abs(c.score - p) for c, p in zip(got, top.values.tolist())) <= 1e-4


def _decoder_peft_logits(base_path, adapter, texts: list[str], num_labels: int) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    with torch.no_grad():  # one text at a time: the head reads the last token (no padding to find)
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_decoder_head_on_the_last_token(arch, tiny_models, tmp_path):
    """`--method head` on a decoder: `score` on the last token with LoRA underneath; PEFT's
    ForSequenceClassification gives our logits; classification requests share steps with generation."""
    from tokenloom import SamplingParams

    data = _data(tmp_path / "train.txt")
    result = train(model=str(tiny_models[arch]), data=str(data), eval_data=str(data), method="head",
                   task="classification", labels="negative,positive", output=str(tmp_path / "head"), epochs=3,
                   lr=3e-3, batch_size=4, rank=4, seed=2)
    assert result.losses[-1] < result.losses[0] / 5 and result.metrics[-1] == 1.0, (result.losses, result.metrics)
    config = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "q_proj" in config["target_modules"]
    llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    head = AdapterRequest("head", tmp_path / "head")
    outs = llm.classify(TEXTS, adapter=head)
    assert outs[0].labels == ["negative", "positive"]
    want = _decoder_peft_logits(tiny_models[arch], tmp_path / "head", TEXTS, 2)
    assert torch.allclose(torch.tensor([o.logits for o in outs]), want, atol=1e-4)
    # One step: two classification requests and a generation, each as alone.
    engine = llm.engine
    prompt = [5, 17, 42, 99]
    alone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    for i, text in enumerate(TEXTS[:2]):
        engine.add_request(f"c{i}", engine.inputs.token_ids(text), PoolingParams("classify"), adapter=head)
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=4))
    results = {r.request_id: r for r in engine.run(["c0", "c1", "g"])}
    assert torch.allclose(results["c0"].data, want[0], atol=1e-4) and torch.allclose(results["c1"].data, want[1],
                                                                                         atol=1e-4)
    assert results["g"].outputs[0].token_ids == alone.outputs[0].token_ids
    with pytest.raises(ValueError, match="classify on it needs a classification-head adapter"):
        engine.add_request("x", [5, 6], PoolingParams("classify"))


def test_a_seed_starts_a_head_from_the_weights_transformers_and_peft_draw(bert, tmp_path):
    """Seeded alike, our head and LoRA start where AutoModelForSequenceClassification (the head drawn at load)
    plus PEFT's SEQ_CLS LoRA start, so a benchmark compares two runs from one point."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tokenloom.adapters.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(model=str(bert), data=str(_data(tmp_path / "d.txt")), method="head",
                                  task="classification", labels="a,b", rank=4, alpha=8, seed=3,
                                  output=str(tmp_path / "out")))
    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2, dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                 target_modules=["query", "value"]))
    state = peft_model.state_dict()
    assert torch.equal(trainer.adapter.classifier.weight.detach(),
                       state["base_model.model.classifier.modules_to_save.default.weight"])
    for name, update in trainer.adapter.lora.updates:
        assert torch.equal(update.a.detach(), state[f"base_model.model.{name}.lora_A.default.weight"]), name
