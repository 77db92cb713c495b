"""Sentence-embedding throughput: tokenloom's pooling engine against sentence-transformers and plain HF
transformers (AutoModel + the model's mean pooling + normalization) on the same model, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embeddings.py [--model all-minilm-l6-v2] [--n 2000]

Inputs are sentences of mixed length (4 to 120 words, fixed seed). Every system embeds all of them once
to warm up, then three timed passes; the best pass counts. Printed: sentences/s, tokens/s, the ratio to
each reference, the largest cosine distance to the reference vectors, and the fp32 GEMM bound
(2 FLOPs per linear-layer weight per token at the measured GEMM rate; embeddings and attention not counted).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cpu_model, gemm_flops, timed  # noqa: E402

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "paged",
         "attention", "keeps", "keys", "and", "values", "in", "blocks", "continuous", "batching"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of 4 to 120 words (mostly short, as search queries and passages mix)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.8, 0.8, n).astype(int), 4, 120)
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


def best_of(fn, reps: int = 3) -> tuple[object, float]:
    """The result and the fastest of `reps` timed runs (after one untimed warm-up)."""
    fn()
    runs = [timed(fn) for _ in range(reps)]
    return runs[0][0], min(t for _, t in runs)


def hf_embed(model, tokenizer, texts: list[str], batch_size: int, max_len: int) -> np.ndarray:
    """transformers' AutoModel with mean pooling over the attention mask and L2 normalization."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--n", type=int, default=2000, help="sentences")
    parser.add_argument("--batch-size", type=int, default=32, help="the references' batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    from tokenloom.llm import LLM

    texts = sentences(args.n)
    llm = LLM(args.model, dtype="float32", num_threads=args.threads)
    path = str(llm.engine.loaded.path)
    max_len = llm.engine.max_model_len
    ours, t_ours = best_of(lambda: np.array([o.embedding for o in llm.embed(texts, truncate=True)]))
    tokens = sum(o.num_prompt_tokens for o in llm.embed(texts, truncate=True))
    params = sum(p.numel() for p in llm.engine.model.parameters())
    # Per token, every linear layer's weights multiply once (2 FLOPs each); embeddings are lookups.
    matmul_params = sum(m.weight.numel() for m in llm.engine.model.modules() if isinstance(m, torch.nn.Linear))

    results = {"tokenloom": (ours, t_ours)}
    hf_model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    results["transformers"] = best_of(lambda: hf_embed(hf_model, hf_tok, texts, args.batch_size, max_len))
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
        results["sentence-transformers"] = best_of(
            lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True))
    except ImportError:
        print("sentence-transformers not installed: skipped")

    bound = gemm_flops(torch.float32) / (2 * matmul_params)
    print(f"machine: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"model: {args.model} ({params / 1e6:.1f} M parameters, {matmul_params / 1e6:.1f} M in linear layers), "
          f"{args.n} sentences, {tokens} tokens "
          f"(mean {tokens / args.n:.1f}); fp32 GEMM bound {bound:,.0f} tokens/s")
    print(f"{'system':<24}{'sentences/s':>12}{'tokens/s':>10}{'% bound':>9}{'tokenloom x':>13}{'max cos dist':>14}")
    for name, (vectors, seconds) in results.items():
        cos = np.sum(ours * vectors, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(vectors, axis=1))
        print(f"{name:<24}{args.n / seconds:>12,.0f}{tokens / seconds:>10,.0f}{100 * tokens / seconds / bound:>8.0f}%"
              f"{seconds / t_ours:>12.2f}x{float(np.max(1 - cos)):>14.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
