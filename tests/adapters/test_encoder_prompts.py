"""Prompt learning on an encoder (a tiny BERT), PEFT the oracle: a soft prompt's or a prefix's embeddings equal
PEFT's FEATURE_EXTRACTION model's hidden states pooled alike; a prompt-tuning SEQ_CLS adapter classifies with
PEFT's logits (its classifier on the pooled first row, the first virtual token, as PEFT's forward has it); a
prefix with a classifier gives PEFT's prefixed pooler output through that classifier (PEFT's own SEQ_CLS prefix
forward refuses BERT on transformers 5); all of them and the base model in one step equal each alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapters.test_heads import TEXTS, _save_peft_head
from tests.encoder_models import tiny_encoder_path
from tokenloom import AdapterRequest
from tokenloom.adapters import AdapterError
from tokenloom.engine.pooling import PoolingParams
from tokenloom.llm import LLM

NUM_VIRTUAL = 4


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random bare BERT (BertModel, with its pooler)."""
    return tiny_encoder_path(tmp_path_factory, "bert-Model")


def _peft(base_path, method: str, task: str, seed: int, num_labels: int = 3):
    """A random PEFT prompt-tuning or prefix-tuning model (tables and classifier random, not PEFT's init)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = (AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels, dtype=torch.float32)
            if task == "SEQ_CLS" else AutoModel.from_pretrained(base_path, dtype=torch.float32))
    kind = PromptTuningConfig if method == "prompt-tuning" else PrefixTuningConfig
    model = get_peft_model(base, kind(task_type=task, num_virtual_tokens=NUM_VIRTUAL))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_()
        if task == "SEQ_CLS":
            model.base_model.classifier.modules_to_save.default.weight.normal_()
    return model.eval()


def _tokens(base_path, text: str) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)(text, return_tensors="pt")


def _peft_embeddings(model, base_path) -> torch.Tensor:
    """PEFT's last hidden states (a soft prompt's virtual rows included, as its forward returns them),
    mean-pooled and normalised: the tiny BERT's pooling (no sentence-transformers files)."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            hidden = model(**_tokens(base_path, text)).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_embeddings_through_a_soft_prompt_or_prefix_equal_peft(bert, tmp_path, method):
    model = _peft(bert, method, "FEATURE_EXTRACTION", seed=3)
    model.save_pretrained(tmp_path / "a")
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    assert llm.engine.pooling_config.mode == "mean" and llm.engine.pooling_config.normalize
    got = llm.embed(TEXTS, adapter=AdapterRequest("a", tmp_path / "a"))
    assert torch.allclose(torch.tensor([o.embedding for o in got]), _peft_embeddings(model, bert), atol=1e-4)
    base = torch.tensor([o.embedding for o in llm.embed(TEXTS)])
    assert (base - torch.tensor([o.embedding for o in got])).abs().max() > 1e-2  # the adapter mattered
    assert [o.num_prompt_tokens for o in got] == [len(_tokens(bert, t)["input_ids"][0]) for t in TEXTS]


def test_a_prompt_tuning_head_classifies_with_peft_logits(bert, tmp_path):
    model = _peft(bert, "prompt-tuning", "SEQ_CLS", seed=4)
    model.save_pretrained(tmp_path / "pt")
    with torch.no_grad():
        want = torch.stack([model(**_tokens(bert, t)).logits[0] for t in TEXTS])
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    got = llm.classify(TEXTS, adapter=AdapterRequest("pt", tmp_path / "pt"))
    assert torch.allclose(torch.tensor([o.logits for o in got]), want, atol=1e-4)
    assert got[0].labels == ["LABEL_0", "LABEL_1", "LABEL_2"]


def _prefix_head(bert, tmp_path, seed: int):
    """A prefix-tuning SEQ_CLS adapter (PEFT's prefix with a random classifier beside it) and the logits PEFT's
    prefixed BertModel gives through that classifier: pooler output of the real [CLS] row."""
    model = _peft(bert, "prefix-tuning", "FEATURE_EXTRACTION", seed=seed)
    out = tmp_path / f"prefix-head-{seed}"
    model.save_pretrained(out)
    weight, bias = torch.randn(2, 32), torch.randn(2)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({**tensors, "base_model.classifier.weight": weight, "base_model.classifier.bias": bias},
              out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with torch.no_grad():
        pooled = torch.stack([model(**_tokens(bert, t)).pooler_output[0] for t in TEXTS])
    return out, pooled @ weight.t() + bias


def test_a_prefix_head_reads_the_real_cls_row(bert, tmp_path):
    out, want = _prefix_head(bert, tmp_path, seed=5)
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    got = llm.classify(TEXTS, adapter=AdapterRequest("ph", out))
    assert torch.allclose(torch.tensor([o.logits for o in got]), want, atol=1e-4)


def test_soft_prompts_prefixes_lora_heads_and_the_base_in_one_step_equal_each_alone(bert, tmp_path):
    _peft(bert, "prompt-tuning", "SEQ_CLS", seed=6).save_pretrained(tmp_path / "pt")
    _peft(bert, "prefix-tuning", "FEATURE_EXTRACTION", seed=7).save_pretrained(tmp_path / "px")
    prefix_head, _ = _prefix_head(bert, tmp_path, seed=8)
    _save_peft_head(bert, tmp_path / "lora", 2, seed=9)
    adapters = {"pt": (AdapterRequest("pt", tmp_path / "pt"), "classify"),
                "px": (AdapterRequest("px", tmp_path / "px"), "embed"),
                "ph": (AdapterRequest("ph", prefix_head), "classify"),
                "lora": (AdapterRequest("lora", tmp_path / "lora"), "classify"),
                "base": (None, "embed")}
    llm = LLM(str(bert), dtype="float32", enable_adapters=True, max_adapters=4)
    engine = llm.engine
    alone = {}
    for name, (adapter, task) in adapters.items():
        for i, text in enumerate(TEXTS):
            engine.add_request(f"{name}{i}", engine.tokenize(text), PoolingParams(task), adapter=adapter)
            alone[f"{name}{i}"], = [r.data for r in engine.step()]
    for name, (adapter, task) in adapters.items():
        for i, text in enumerate(TEXTS):
            engine.add_request(f"{name}{i}", engine.tokenize(text), PoolingParams(task), adapter=adapter)
    together = {r.request_id: r.data for r in engine.step()}
    assert together.keys() == alone.keys()
    for rid, data in together.items():
        assert torch.allclose(data, alone[rid], atol=1e-5), rid


def test_bad_encoder_prompt_adapters_fail_naming_the_file(bert, tmp_path):
    model = _peft(bert, "prompt-tuning", "SEQ_CLS", seed=10)
    model.save_pretrained(tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    save_file({**tensors, "base_model.classifier.weight": torch.randn(3, 16)},
              tmp_path / "bad" / "adapter_model.safetensors")
    llm = LLM(str(bert), dtype="float32", enable_adapters=True)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: classifier\.weight is \(3, 16\); this model "
                                           r"needs \(num_labels, 32\)"):
        llm.classify(TEXTS, adapter=AdapterRequest("bad", tmp_path / "bad"))
    long_text = " ".join(["word"] * 600)
    model = _peft(bert, "prompt-tuning", "FEATURE_EXTRACTION", seed=11)
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(Exception, match=r"virtual tokens that is more than the model's limit"):
        llm.embed([long_text], truncate=True, adapter=AdapterRequest("ok", tmp_path / "ok"))
    assert len(llm.embed(TEXTS, adapter=AdapterRequest("ok", tmp_path / "ok"))) == len(TEXTS)
