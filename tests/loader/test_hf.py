"""HF folders: single, sharded and pytorch_model.bin checkpoints load to the same model."""

from __future__ import annotations

import shutil

import torch
from transformers import AutoModelForCausalLM

from tokenloom import SamplingParams
from tokenloom.llm import LLM
from tokenloom.loader.hf import weight_files

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = [[5, 17, 42, 99, 7, 3, 250]]


def _resave(src, dst, **save_kwargs):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, **save_kwargs)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


def _generate(path) -> list[int]:
    llm = LLM(str(path), dtype="float32", kv_cache_gib=0.01)
    return llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_and_bin_checkpoints_match_single_file(tiny_models, tmp_path):
    src = tiny_models["qwen3"]
    _resave(src, tmp_path / "sharded", max_shard_size="100KB")
    assert len(weight_files(tmp_path / "sharded")) > 1
    _resave(src, tmp_path / "bin", safe_serialization=False)
    if (tmp_path / "bin" / "model.safetensors").exists():  # transformers 5 may ignore the flag
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        (tmp_path / "bin" / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert [f.name for f in weight_files(tmp_path / "bin")] == ["pytorch_model.bin"]
    expected = _generate(src)
    assert _generate(tmp_path / "sharded") == expected
    assert _generate(tmp_path / "bin") == expected


def test_bfloat16_auto_dtype_and_explicit_dtype(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="bfloat16", kv_cache_gib=0.01)
    assert next(llm.engine.loaded.model.parameters()).dtype == torch.bfloat16
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    auto = LLM(str(tiny_models["llama"]), kv_cache_gib=0.01)  # saved in float32: auto keeps it
    assert next(auto.engine.loaded.model.parameters()).dtype == torch.float32
