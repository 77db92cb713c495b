"""Start-up cost of loading: what the loader must not drag in."""

from __future__ import annotations

import subprocess
import sys


def test_loading_imports_no_compiler_machinery(tiny_models):
    """Building a model on the meta device used to import torch._dynamo and sympy (~1.5 s of start-up)."""
    code = ("import sys, torch; from tokenloom.config import ModelConfig; from tokenloom.loader import load_model; "
            f"load_model(ModelConfig(model={str(tiny_models['gemma3'])!r}), torch.device('cpu')); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_loading_leaves_the_thread_count_alone(tiny_models):
    """Weights are copied on one thread; the caller's setting comes back afterwards."""
    import torch

    from tokenloom.config import ModelConfig
    from tokenloom.loader import load_model

    before = torch.get_num_threads()
    load_model(ModelConfig(model=str(tiny_models["llama"])), torch.device("cpu"))
    assert torch.get_num_threads() == before
