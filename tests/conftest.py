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


def _train_seq2seq_tokenizer(path: Path, specials: list[str], template: str, bos: str | None) -> None:
    """A tiny byte-level BPE with an encoder–decoder model's special tokens (ids in `specials` order) and
    a post-processor that adds them as `template` says (T5: `$A </s>`; BART: `<s> $A </s>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    used = [s for s in specials if s in template.split()]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        (s, specials.index(s)) for s in used])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)


def _tiny_seq2seq_configs() -> dict:
    from transformers import BartConfig, T5Config

    t5 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=16, relative_attention_max_distance=32, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0, n_positions=512)
    return {
        "t5": T5Config(**t5, feed_forward_proj="relu"),
        # v1.1 / flan-t5: gated-GELU feed-forward and an untied head (no output rescale)
        "t5_gated": T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "bart": BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=3,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=96, max_position_embeddings=256, scale_embedding=True,
                           bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                           forced_eos_token_id=None),
    }


SEQ2SEQ_ARCHITECTURES = list(_tiny_seq2seq_configs())


def _spread_weights(model: torch.nn.Module) -> None:
    """Re-draw the weights wider than HF's init, under which a tiny random T5 or BART predicts its own input
    token forever; this way greedy paths depend on the position and the encoder input."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            if "shared" in name:
                p.normal_(0.0, 0.5)
            elif "embed_positions" in name or "relative_attention_bias" in name:
                p.normal_(0.0, 2.0)
            elif p.dim() == 2:  # wider still and fp32 rounding is amplified past 1e-4 by the output
                p.normal_(0.0, 0.1)
            else:  # BART's biases, zero at init
                p.normal_(0.0, 0.05)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0.0, 0.1)


@pytest.fixture(scope="session")
def tiny_seq2seq_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with config.json, tokenizer and safetensors of tiny random T5 (relu; gated-gelu with an
    untied head) and BART checkpoints."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSeq2SeqLM

    root = tmp_path_factory.mktemp("tiny_seq2seq")
    tokenizers = {"t5": root / "_t5_tokenizer", "bart": root / "_bart_tokenizer"}
    _train_seq2seq_tokenizer(tokenizers["t5"], ["<pad>", "</s>", "<unk>"], "$A </s>", bos=None)
    _train_seq2seq_tokenizer(tokenizers["bart"], ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos="<s>")
    paths = {}
    for name, config in _tiny_seq2seq_configs().items():
        torch.manual_seed(zlib.crc32(name.encode()) % 1000)
        model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
        _spread_weights(model)
        _perturb_norms(model)
        path = root / name
        model.save_pretrained(path)
        if name == "t5_gated":  # write the head as flan-t5 checkpoints have it: its own matrix, untied config
            weights = load_file(path / "model.safetensors")
            weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"]) * 0.2
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
            cfg = json.loads((path / "config.json").read_text())
            cfg.pop("scale_decoder_outputs", None)
            (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
        for f in tokenizers["bart" if name == "bart" else "t5"].iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        paths[name] = path
    return paths
