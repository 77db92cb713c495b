"""Adapter training and serving benchmark (LoRA, prompt tuning or an encoder's head): tokenloom against PEFT +
transformers on the same data, model, hyper-parameters and batch order, in one run. Run by hand (never in CI):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adapters.py --train-limit 512 --epochs 1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adapters.py --method prompt-tuning --lr 3e-2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adapters.py --method head --model all-minilm-l6-v2 --lr 1e-3

Training: SST-2 (../shared/data/sst2: train.txt, dev.txt; `LABEL text`) or TREC (`--dataset trec`: 6 question
types; 500 seeded rows of train.txt held out as dev), classification through the label words (" negative" /
" positive" after the template "{text} Sentiment:" for SST-2), LoRA r / alpha on every attention
and MLP projection (or N virtual tokens of prompt tuning, initialised from a text's embeddings; or, on an
encoder, a classification head on the pooled [CLS] token with LoRA on query/value), AdamW, the same seeded
batch order for both. Reports dev accuracy before training
(zero-shot label scoring), after training, and the training wall time of each side.

Serving: 16 concurrent greedy requests spread over 8 adapters (8 slots) against the same requests on the base
model, generated tokens per second: 8 copies of the trained adapter, or with `--serve-mix` mixed kinds (2
copies of it, 2 LoRAs r 8, 2 soft prompts and 2 prefixes of 20 virtual tokens, random weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# dataset → (label words in label order, prompt template, prompt tuning's initial text)
DATASETS = {
    "sst2": (("negative", "positive"), "{text} Sentiment:",
             "Classify the sentiment of this movie review as negative or positive"),
    "trec": (("description", "entity", "abbreviation", "person", "location", "number"), "{text} Question type:",
             "Classify the question as asking for a description, entity, abbreviation, person, location or number"),
}
TREC_DEV = 500  # TREC has no dev split here: a seeded 500 rows of train.txt are held out as dev


def _init_text(args: argparse.Namespace) -> str | None:
    return (args.init_text or None) if args.method == "prompt-tuning" else None


def read_split(path: Path, limit: int | None, seed: int) -> list[tuple[int, str]]:
    """(label, text) rows of a `LABEL text` file, a seeded random `limit` of them."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # TREC has one Latin-1 byte
        label, _, text = line.partition(" ")
        if text.strip():
            rows.append((int(label), text.strip()))
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def write_split(rows: list[tuple[int, str]], path: Path) -> Path:
    path.write_text("".join(f"{label} {text}\n" for label, text in rows))
    return path


def ours(model: str, train_file: Path, dev_file: Path, out: Path, args: argparse.Namespace) -> dict:
    """tokenloom: zero-shot accuracy, then train and evaluate; wall time of the training alone."""
    from tokenloom.adapters.train import TrainConfig, Trainer
    from tokenloom.models import ops

    trainer = Trainer(TrainConfig(model=model, data=str(train_file), eval_data=str(dev_file), output=str(out),
                                  task="classification", labels=",".join(args.labels), template=args.template,
                                  rank=args.rank, alpha=2 * args.rank, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, seed=args.seed, method=args.method,
                                  num_virtual_tokens=args.num_virtual_tokens, init_text=_init_text(args)))
    dev, trainer.dev_set = trainer.dev_set, []  # evaluated outside the timed training, as on the PEFT side
    with ops.use_level("torch"):
        zero_shot = trainer.evaluate(dev)
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    with ops.use_level("torch"):
        accuracy = trainer.evaluate(dev)
    return {"zero_shot": zero_shot, "accuracy": accuracy, "train_s": seconds, "losses": result.losses,
            "label_ids": trainer.label_ids}


def peft_side(model: str, train_rows: list, dev_rows: list, label_ids: list[int], args: argparse.Namespace) -> dict:
    """PEFT + transformers with the same hyper-parameters, label tokens and batch order."""
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tokenloom.loader.sources import resolve_model

    source = resolve_model(model)
    kwargs = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    folder = source.path.parent if source.kind == "gguf" else source.path
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    head = args.method == "head"
    torch.manual_seed(args.seed)  # a head is drawn at load (the only missing weights), as tokenloom draws it
    base = (AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, num_labels=len(args.labels))
            if head else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs))
    torch.manual_seed(args.seed)
    virtual = 0
    if head:
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                            target_modules=["query", "value"])
    elif args.method == "lora":
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    else:
        virtual = args.num_virtual_tokens
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual)
        # PEFT's TEXT init loads the tokenizer by name (a GGUF folder has none): the same init done here.
        init = _init_text(args)
        if init:
            ids = tok(init, add_special_tokens=False).input_ids
            ids = (ids * (virtual // len(ids) + 1))[:virtual]
    model_ = get_peft_model(base, config)
    if virtual and init:
        with torch.no_grad():
            model_.prompt_encoder.default.embedding.weight.copy_(base.get_input_embeddings()(torch.tensor(ids)))
    optimizer = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    targets = torch.tensor(label_ids)

    def label_logits(rows: list[tuple[int, str]]) -> torch.Tensor:
        if head:
            batch = tok([text for _, text in rows], padding=True, truncation=True, max_length=256, return_tensors="pt")
            return model_(**batch).logits.float()
        enc = [tok(args.template.format(text=text)).input_ids for _, text in rows]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        logits = model_(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([virtual + len(e) - 1 for e in enc])
        return logits[torch.arange(len(enc)), last][:, targets].float()

    def accuracy(rows: list) -> float:
        model_.eval()
        with torch.no_grad():
            correct = sum(int(p == label) for i in range(0, len(rows), args.batch_size)
                          for p, (label, _) in zip(label_logits(rows[i:i + args.batch_size]).argmax(-1).tolist(),
                                                   rows[i:i + args.batch_size]))
        return correct / len(rows)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model_.train()
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i in range(0, len(order), args.batch_size):
            batch = [train_rows[j] for j in order[i:i + args.batch_size].tolist()]
            loss = torch.nn.functional.cross_entropy(label_logits(batch), torch.tensor([label for label, _ in batch]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(dev_rows), "train_s": seconds}


def serving(model: str, adapter: Path, args: argparse.Namespace) -> dict:
    """Generated tok/s of 16 concurrent requests over 8 adapters against the same on the base model."""
    from tokenloom import AdapterRequest, SamplingParams
    from tokenloom.llm import LLM

    llm = LLM(model, enable_adapters=True, max_adapters=8)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = [f"Review {i}: the film was" for i in range(16)]
    copies = []
    for i in range(2 if args.serve_mix else 8):
        path = Path(tempfile.mkdtemp()) / f"copy{i}"
        shutil.copytree(adapter, path)
        copies.append(AdapterRequest(f"copy{i}", path))
    if args.serve_mix:
        copies += random_adapters(llm.engine.model, Path(tempfile.mkdtemp()))
    start = time.perf_counter()
    llm.engine.adapters.slot_for(copies[0], set())
    load_ms = (time.perf_counter() - start) * 1e3
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    rates = {}
    for name, adapters in (("base", None), ("8 adapters", [copies[i % 8] for i in range(16)])):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, adapter=adapters)
        rates[name] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    return {"base_tok_s": rates["base"], "adapters_tok_s": rates["8 adapters"], "adapter_load_ms": load_ms}


def random_adapters(model: torch.nn.Module, root: Path) -> list:
    """Two LoRAs (r 8 on every attention and MLP projection), two soft prompts and two prefixes (20 virtual
    tokens each), random weights, written in PEFT's format for `model`."""

    from tokenloom import AdapterRequest
    from tokenloom.adapters.lora import linear_targets
    from tokenloom.adapters.virtual import model_shape

    shape, out = model_shape(model), []
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for i in range(2):
        tensors = {}
        for name, (ours, _, width) in linear_targets(model).items():
            if name.rsplit(".", 1)[-1] in targets:
                module = model.get_submodule(ours)
                in_features = int(getattr(module, "in_features", 0) or module.base.in_features)
                tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, in_features) * 0.01
                tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(width, 8) * 0.01
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                  "target_modules": list(targets)}
        out.append(_write_adapter(root / f"lora{i}", config, tensors))
        for kind, width in (("PROMPT_TUNING", shape.hidden_size),
                            ("PREFIX_TUNING", shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim)):
            config = {"peft_type": kind, "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}
            out.append(_write_adapter(root / f"{kind.lower()}{i}", config,
                                      {"prompt_embeddings": torch.randn(20, width) * 0.02}))
    return [AdapterRequest(p.name, p) for p in out]


def _write_adapter(path: Path, config: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--train-limit", type=int, default=512, help="SST-2 training rows (a seeded sample)")
    p.add_argument("--dev-limit", type=int, default=None, help="dev rows (default: all 872)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--method", default="lora", choices=["lora", "prompt-tuning", "head"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--dataset", default="sst2", choices=sorted(DATASETS))
    p.add_argument("--init-text", default=None, help="prompt tuning's initial text (default: per dataset; '' for "
                                                    "random)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--serve-mix", action="store_true", help="serve adapters of mixed kinds (see above)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    args.labels, args.template, default_init = DATASETS[args.dataset]
    if args.init_text is None:
        args.init_text = default_init
    if args.dataset == "trec":
        rows = read_split(DATA / "trec" / "train.txt", None, 0)
        held = set(random.Random(1234).sample(range(len(rows)), TREC_DEV))
        pool = [r for i, r in enumerate(rows) if i not in held]
        train_rows = random.Random(args.seed).sample(pool, min(args.train_limit, len(pool)))
        dev_rows = [r for i, r in enumerate(rows) if i in held][:args.dev_limit]
    else:
        train_rows = read_split(DATA / "sst2" / "train.txt", args.train_limit, args.seed)
        dev_rows = read_split(DATA / "sst2" / "dev.txt", args.dev_limit, args.seed)
    train_file, dev_file = write_split(train_rows, work / "train.txt"), write_split(dev_rows, work / "dev.txt")
    ours_result = ours(args.model, train_file, dev_file, work / "adapter", args)
    peft_result = None if args.skip_peft else peft_side(args.model, train_rows, dev_rows, ours_result["label_ids"],
                                                         args)
    serve_result = serving(args.model, work / "adapter", args) if args.method != "head" else None
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    method = {"lora": f"LoRA r {args.rank} alpha {2 * args.rank}",
              "head": f"classification head + LoRA r {args.rank} alpha {2 * args.rank} on query/value",
              "prompt-tuning": f"prompt tuning, {args.num_virtual_tokens} virtual tokens from "
                               f"{_init_text(args)!r}"}[args.method]
    print(f"{args.dataset}: {len(train_rows)} training rows, {len(dev_rows)} dev rows, {args.epochs} epoch(s), "
          f"{method}, lr {args.lr}, batch {args.batch_size}")
    before = "the untrained head" if args.method == "head" else "zero-shot label scoring"
    print(f"{before} (tokenloom): dev accuracy {ours_result['zero_shot']:.4f}")
    print(f"tokenloom {args.method}: dev accuracy {ours_result['accuracy']:.4f}, "
          f"training {ours_result['train_s']:.1f} s")
    if peft_result:
        print(f"PEFT+transformers:  dev accuracy {peft_result['accuracy']:.4f}, "
              f"training {peft_result['train_s']:.1f} s")
        print(f"accuracy difference {100 * (ours_result['accuracy'] - peft_result['accuracy']):+.1f} points; "
              f"training time ratio {ours_result['train_s'] / peft_result['train_s']:.2f}x PEFT's")
    if serve_result:
        rate = serve_result["adapters_tok_s"] / serve_result["base_tok_s"]
        print(f"serving, 16 requests over 8 adapters: {serve_result['adapters_tok_s']:.1f} tok/s vs base "
              f"{serve_result['base_tok_s']:.1f} ({rate:.2f}x); adapter load {serve_result['adapter_load_ms']:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours_result, "peft": peft_result, "serving": serve_result},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
