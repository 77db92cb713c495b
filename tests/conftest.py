"""Shared fixtures: tiny random-weight checkpoints of every decoder architecture, built offline."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 384
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world! Numbers 0123456789.",
    "Paged attention keeps keys and values in fixed-size blocks; continuous batching fills them.",
    "Ünïcödé text, 中文字符, emoji 🙂🚀 and accents: café, naïve, résumé.",
    "user: What is the capital of France? assistant: Paris is the capital of France.",
] * 20


def _tiny_configs() -> dict:
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": LlamaConfig(**common, rope_parameters=llama3_rope, tie_word_embeddings=False),
        "mistral": MistralConfig(**common, sliding_window=24, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**common, head_dim=32, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   query_pre_attn_scalar=16, rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                           bos_token_id=1, eos_token_id=2),
    }


ARCHITECTURES = list(_tiny_configs())


def _train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with config.json, tokenizer and safetensors of a tiny random model per architecture."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok_dir = root / "_tokenizer"
    _train_tokenizer(tok_dir)
    paths = {}
    for name, config in _tiny_configs().items():
        torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # hash() is salted per process
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb_norms(model)
        path = root / name
        model.save_pretrained(path)
        for f in tok_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        paths[name] = path
    return paths


def _perturb_norms(model: torch.nn.Module) -> None:
    """Random init leaves norm weights at 1 (or 0 for Gemma); perturb them so a wrong convention shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="session")
def hf_reference():
    """Load a tiny checkpoint with transformers (the oracle), cached per path."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, torch.nn.Module] = {}

    def load(path: Path) -> torch.nn.Module:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        return cache[path]
    return load
