"""Encoder models (BERT, RoBERTa, DistilBERT with every head; all-MiniLM-L6-v2) against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.encoder_models import FAMILIES, HEADS, SENTENCES, hf_reference, minilm_path, tiny_encoder_path
from tokenloom.config import ModelConfig
from tokenloom.loader import load_model
from tokenloom.models.layers.encoder_attention import EncoderMetadata
from tokenloom.models.loading import WeightLoadError
from tokenloom.models.pooling import PoolingConfig, PoolingConfigError, pool, read_pooling_config

LENS = [7, 12, 3, 1]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """name → folder of a tiny random encoder checkpoint (built on first use)."""
    return lambda name: tiny_encoder_path(tmp_path_factory, name)


def _ours(path):
    return load_model(ModelConfig(model=str(path), dtype="float32"), torch.device("cpu")).model


def _batch(family: str, lens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    gen = torch.Generator().manual_seed(sum(lens))
    ids = [torch.randint(5, 30522, (n,), generator=gen) for n in lens]  # never a pad id (0 or 1)
    types = [(torch.arange(n) >= n // 2).long() for n in lens] if family == "bert" else None
    return ids, types


def _reference(ref: torch.nn.Module, family: str, ids: list[torch.Tensor], types: list[torch.Tensor] | None):
    """Padded batch through transformers: its last hidden states and head output, unpadded."""
    pad = 1 if family == "roberta" else 0
    width = max(len(x) for x in ids)
    padded = torch.full((len(ids), width), pad)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    kwargs = {}
    for i, x in enumerate(ids):
        padded[i, :len(x)], mask[i, :len(x)] = x, 1
    if types is not None:
        kwargs["token_type_ids"] = torch.nn.utils.rnn.pad_sequence(types, batch_first=True)
    with torch.no_grad():
        out = ref(input_ids=padded, attention_mask=mask, output_hidden_states=True, **kwargs)
    hidden = torch.cat([out.hidden_states[-1][i, :len(x)] for i, x in enumerate(ids)])
    if hasattr(out, "start_logits"):
        head = torch.cat([torch.stack([out.start_logits[i, :len(x)], out.end_logits[i, :len(x)]], -1)
                          for i, x in enumerate(ids)])
    elif getattr(out, "logits", None) is not None and out.logits.dim() == 3:
        head = torch.cat([out.logits[i, :len(x)] for i, x in enumerate(ids)])
    else:
        head = getattr(out, "logits", None)
    return hidden, head


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(tiny_encoder, family, head):
    path = tiny_encoder(f"{family}-{head}")
    ours, ref = _ours(path), hf_reference(path)
    ids, types = _batch(family, LENS)
    ref_hidden, ref_head = _reference(ref, family, ids, types)
    meta = EncoderMetadata.from_lens(LENS)
    with torch.no_grad():
        hidden = ours(torch.cat(ids), torch.cat([torch.arange(n) for n in LENS]), meta,
                      None if types is None else torch.cat(types))
        assert (hidden - ref_hidden).abs().max().item() <= 1e-4
        if head == "Model":
            return
        rows = hidden[meta.first_rows()] if head == "ForSequenceClassification" else hidden
        out = ours.compute_head(rows)
    assert out.shape == ref_head.shape
    assert (out - ref_head).abs().max().item() <= 1e-4


def test_packed_sequences_do_not_see_each_other(tiny_encoder):
    ours = _ours(tiny_encoder("bert-Model"))
    ids, _ = _batch("bert", LENS)
    with torch.no_grad():
        together = ours(torch.cat(ids), torch.cat([torch.arange(n) for n in LENS]), EncoderMetadata.from_lens(LENS))
        alone = torch.cat([ours(x, torch.arange(len(x)), EncoderMetadata.from_lens([len(x)])) for x in ids])
    assert (together - alone).abs().max().item() <= 1e-5


def test_old_style_checkpoint_names_load(tiny_encoder, tmp_path):
    """LayerNorm gamma/beta names, an explicit tied decoder weight and decoder bias (older BERT files)."""
    src = tiny_encoder("bert-ForMaskedLM")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items()}
    renamed["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"].clone()
    renamed["cls.predictions.decoder.bias"] = weights["cls.predictions.bias"].clone()
    renamed["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, ref = _ours(tmp_path), _ours(src)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


def test_missing_head_weight_is_an_error(tiny_encoder, tmp_path):
    src = tiny_encoder("distilbert-ForSequenceClassification")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    del weights["pre_classifier.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match="lacks 1 tensors"):
        _ours(tmp_path)


def test_pooling_config_from_sentence_transformers_files(tmp_path):
    assert read_pooling_config(minilm_path()) == PoolingConfig("mean", True, 256)
    assert read_pooling_config(tmp_path) == PoolingConfig()  # no files: the defaults
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling_config(tmp_path) == PoolingConfig("cls", False, None)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                    "pooling_mode_mean_tokens": True}))
    with pytest.raises(PoolingConfigError, match="exactly one"):
        read_pooling_config(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 2, "path": "2_Dense",
                                                        "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(PoolingConfigError, match="Dense"):
        read_pooling_config(tmp_path)


def test_pooling_modes():
    meta = EncoderMetadata.from_lens([2, 3])
    hidden = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [2.0, -2.0], [4.0, 6.0]])
    def run(mode, normalize=False):
        return pool(hidden, meta, PoolingConfig(mode, normalize)).tolist()
    assert run("mean") == [[2.0, 2.0], [2.0, 2.0]]
    assert run("cls") == [[1.0, 0.0], [0.0, 2.0]]
    assert run("last") == [[3.0, 4.0], [4.0, 6.0]]
    assert run("max") == [[3.0, 4.0], [4.0, 6.0]]
    assert run("mean_sqrt_len")[1] == pytest.approx([6 / 3 ** 0.5, 6 / 3 ** 0.5])
    assert run("last", normalize=True)[0] == pytest.approx([0.6, 0.8])


def test_minilm_hidden_states_match_transformers():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok, ref = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = ref(**enc).last_hidden_state
    lens = enc["attention_mask"].sum(1).tolist()
    ids = torch.cat([enc["input_ids"][i, :n] for i, n in enumerate(lens)])
    with torch.no_grad():
        ours = _ours(path)(ids, torch.cat([torch.arange(n) for n in lens]), EncoderMetadata.from_lens(lens))
    expected = torch.cat([states[i, :n] for i, n in enumerate(lens)])
    assert (ours - expected).abs().max().item() <= 1e-4
