"""Random prompt-learning adapters saved by PEFT (the oracle and the file format), and PEFT's own scoring of
a sequence under one: its forward pass (PEFT's `generate` with prompt learning goes wrong on transformers 5:
it drifts from its own forward pass after the first token, so greedy equality is checked step by step against
the forward pass, which is what greedy decoding means)."""

from __future__ import annotations

from pathlib import Path

import torch

METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")


def save_peft_prompt(base_path: Path, out_dir: Path, method: str, seed: int, num_virtual_tokens: int = 5):
    """A random adapter of `method` saved by PEFT; returns the PeftModel (eval mode)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    kind = {"prompt-tuning": PromptTuningConfig, "p-tuning": PromptEncoderConfig,
            "prefix-tuning": PrefixTuningConfig}[method]
    extra = {"encoder_hidden_size": 32} if method == "p-tuning" else {}
    model = get_peft_model(base, kind(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens, **extra))
    with torch.no_grad():  # PEFT's inits are small or zero; random tables make every position matter
        for p in model.prompt_encoder.parameters():
            p.normal_()
    model.eval().save_pretrained(out_dir)
    return model


def peft_logprobs(model, sequence: list[int]) -> torch.Tensor:
    """log-softmax of PEFT's logits for each position of `sequence` (the virtual tokens' dropped)."""
    ids = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(sequence):]
    return torch.log_softmax(logits.float(), -1)
