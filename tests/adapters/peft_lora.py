"""Random LoRA adapters saved by PEFT (the oracle and the file format) for the tiny test models."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_lora(base_path: Path, out_dir: Path, seed: int, rank: int, arch: str):
    """A random LoRA adapter (B non-zero, unlike PEFT's default init) saved by PEFT; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS.get(arch, DEFAULT_TARGETS),
                        init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(out_dir)
    return model
