"""`tokenloom train`: adapters trained on our own model code, saved in PEFT's format.

The base model is loaded as for inference (float32) and frozen; the method (trainable.py) adds what is
trained: LoRA updates, the table of N virtual tokens of prompt tuning, P-tuning or prefix tuning (decoders),
or a classification head with LoRA underneath (encoders, `method="head"`: the text's label from the pooled
[CLS] token, labels named by `labels`).
A step packs a batch of whole sequences without the paged cache and runs the torch paths of every op
(autograd; the native kernels serve inference only). Tasks:
- generation: jsonl lines {"prompt": ..., "completion": ...}; the loss is on the completion's tokens only;
- classification: lines `LABEL text` (SST-2 / TREC files) or jsonl {"text": ..., "label": ...} with
  `labels` naming the label words (a verbalizer): the loss is the cross-entropy over the label words'
  first tokens after the prompt template, the metric accuracy.
A run is repeatable for a seed (the data order of epoch e is a function of seed and e), checkpoints after
each epoch, and `resume=True` continues from the last checkpoint exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenloom.adapters import AdapterError
from tokenloom.adapters.trainable import (
    ENCODER_METHODS,
    METHODS,
    CheckpointTrainable,
    FullTrainable,
    HeadTrainable,
    LoRATrainable,
    MLMTrainable,
    PromptTrainable,
)
from tokenloom.adapters.virtual import PLACEHOLDER_TOKEN


@dataclass(slots=True)
class TrainConfig:
    """One training run (every field is also a `tokenloom train` flag)."""

    model: str
    data: str
    output: str
    method: str = "lora"  # lora, prompt-tuning, p-tuning, prefix-tuning, full (decoders) or head (encoders)
    task: str = "generation"
    eval_data: str | None = None
    labels: str | None = None  # classification: the label words (a head's label names), comma-separated
    template: str = "{text}\nAnswer:"  # classification on a decoder: the prompt a text becomes
    rank: int = 8  # LoRA (also under a head)
    alpha: float = 16.0
    target_modules: str | None = None  # comma-separated; default: every attention and MLP projection
    lora_dropout: float = 0.0  # dropout on the LoRA updates' inputs while training
    num_virtual_tokens: int = 20  # prompt, P- and prefix tuning
    init_text: str | None = None  # prompt tuning: start from this text's embeddings (else random)
    # P-tuning: mlp (default) or lstm; prefix tuning: none (default), or mlp (PEFT's prefix projection)
    prompt_encoder: str | None = None
    encoder_hidden_size: int | None = None  # the prompt encoder's width (default: the table's)
    train_layers: int | None = None  # full fine-tuning: only the top N layers (and the final norm); None: all
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    dtype: str = "float32"  # float32, or bfloat16 autocast (the trained weights stay float32)
    patience: int | None = None  # early stopping: epochs without a better dev metric
    resume: bool = False


@dataclass(slots=True)
class Example:
    """One training example as token ids: the prompt, and the completion or the label index."""

    prompt: list[int]
    completion: list[int] = field(default_factory=list)
    label: int | None = None


@dataclass(slots=True)
class TrainResult:
    """What a run did: the mean training loss and the dev metric of each epoch, and where it saved."""

    losses: list[float]
    metrics: list[float]
    output: Path
    stopped_early: bool = False


def train(config: str | Path | None = None, **options: Any) -> TrainResult:
    """Train an adapter and save it in PEFT's format under `output`: the options are TrainConfig's fields,
    from a YAML file `config` (its keys those fields, `-` or `_` alike) and/or keywords (which win)."""
    return Trainer(make_config(config, options)).run()


def make_config(path: str | Path | None, options: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a YAML file's keys overridden by `options`; AdapterError names a wrong key or value."""
    values = read_train_yaml(Path(path)) if path is not None else {}
    values.update(options)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
    if missing:
        raise AdapterError(f"training needs {', '.join(missing)} (in the YAML file or as options)")
    return TrainConfig(**values)


def read_train_yaml(path: Path) -> dict[str, Any]:
    """A training YAML: a mapping of TrainConfig fields (`num-virtual-tokens` or `num_virtual_tokens`)."""
    import yaml

    from tokenloom.yamlio import compose_file

    node = compose_file(path, AdapterError, "training configuration")
    if not isinstance(node, yaml.MappingNode):
        raise AdapterError(f"{path}: a training configuration is a mapping of options (model, data, method, ...)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key_node, value_node in node.value:
        key = str(key_node.value).replace("-", "_")
        where = f"{path} line {key_node.start_mark.line + 1}"
        if key not in fields:
            raise AdapterError(f"{where}: unknown option {key_node.value!r}; options are {', '.join(fields)}")
        value = yaml.safe_load(yaml.serialize(value_node))
        kind = str(fields[key].type).split("|")[0].strip()
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[kind]
        if value is None and "None" in str(fields[key].type):
            values[key] = None
            continue
        if not isinstance(value, expected) or (kind in ("int", "float") and isinstance(value, bool)):
            raise AdapterError(f"{where}: {key_node.value} must be {kind}; got {value!r}")
        values[key] = float(value) if kind == "float" else value
    return values


class Trainer:
    """Loads the base model, the data and the trainable updates; runs the epochs."""

    def __init__(self, config: TrainConfig) -> None:
        from tokenloom.config import ModelConfig
        from tokenloom.loader import load_model

        if config.dtype not in ("float32", "bfloat16"):
            raise AdapterError(f"dtype must be float32 or bfloat16 (autocast); got {config.dtype!r}")
        if config.method not in METHODS:
            raise AdapterError(f"method must be one of {', '.join(METHODS)}; got {config.method!r}")
        if config.task not in ("generation", "classification"):
            raise AdapterError(f"task must be generation or classification; got {config.task!r}")
        self.config = config
        torch.manual_seed(config.seed)
        # Loaded without an engine: no paged cache is bound, so attention runs on whole packed sequences.
        self.loaded = load_model(ModelConfig(model=config.model, dtype="float32", quantization="none",
                                             seed=config.seed), torch.device("cpu"))
        self.encoder = self.loaded.kind == "encoder"
        if config.method != "head" and (config.method in ENCODER_METHODS) != self.encoder:
            raise AdapterError(f"method {config.method!r} cannot train {self.loaded.name} ({self.loaded.kind} "
                               f"model): the mlm method trains encoder-only models, the head method either kind, "
                               f"the other methods decoder-only ones")
        if config.method == "head" and config.task != "classification":
            raise AdapterError("the head method trains a classification head: use task='classification'")
        if config.method == "mlm" and config.task != "generation":
            raise AdapterError("the mlm method trains on raw text: leave task unset")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.label_words = [w.strip() for w in (config.labels or "").split(",") if w.strip()]
        self.label_ids = self._label_token_ids()
        self.train_set = read_examples(Path(config.data), self)
        self.dev_set = read_examples(Path(config.eval_data), self) if config.eval_data else []
        torch.manual_seed(config.seed)  # the adapter's init draws start here, as PEFT's do after seeding
        if config.method == "mlm":
            self.adapter = MLMTrainable(self.loaded)
            self.model = self.adapter.model
        elif config.method == "head":
            self.adapter = HeadTrainable(self.model, len(self.label_words), config.rank, config.alpha,
                                         config.target_modules, config.model, config.lora_dropout, config.seed)
        elif config.method == "full":
            self.adapter = FullTrainable(self.model, config.train_layers, config.model)
        elif config.method == "lora":
            gpt2 = self.loaded.hf_config.model_type == "gpt2"  # HF's Conv1D layers: PEFT's fan_in_fan_out
            self.adapter = LoRATrainable(self.model, config.rank, config.alpha, config.target_modules, gpt2,
                                         config.model, dropout=config.lora_dropout)
        else:
            init = None
            if config.init_text:
                init = (config.init_text, self.tokenizer.encode(config.init_text, add_special_tokens=False),
                        str(self.loaded.path))
            encoder = config.prompt_encoder or ("mlp" if config.method == "p-tuning" else "none")
            self.adapter = PromptTrainable(self.model, config.method, config.num_virtual_tokens,
                                           config.encoder_hidden_size, init, encoder)
        self.params = self.adapter.params
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)

    # ---- set-up ----

    def _label_token_ids(self) -> list[int]:
        if self.config.task != "classification":
            return []
        if len(self.label_words) < 2:
            raise AdapterError("classification needs labels: two or more label words, e.g. labels='negative,positive'")
        if self.config.method == "head":  # a head scores the labels itself
            return []
        ids = [self._first_token(w) for w in self.label_words]
        if len(set(ids)) != len(ids):
            raise AdapterError(f"label words {self.label_words} share their first token; pick distinct words")
        return ids

    def _first_token(self, word: str) -> int:
        """The token a label word starts with after the prompt: of " word", past a bare space token (a small
        vocabulary may split " word" into the space and the word)."""
        ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
        if len(ids) > 1 and not self.tokenizer.decode(ids[:1], skip_special_tokens=False).strip():
            return ids[1]
        return ids[0]

    # ---- the loop ----

    def run(self) -> TrainResult:
        """Every epoch (from the checkpoint when resuming): train, evaluate, checkpoint, stop early."""
        from tokenloom.models import ops

        c, out = self.config, Path(self.config.output)
        out.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint(out) if c.resume else {"epoch": 0, "losses": [], "metrics": []}
        best, stale, stopped = None, 0, False
        with ops.use_level("torch"):
            for epoch in range(state["epoch"], c.epochs):
                state["losses"].append(self._epoch(epoch))
                if self.dev_set:
                    state["metrics"].append(self.evaluate(self.dev_set))
                state["epoch"] = epoch + 1
                self._save_checkpoint(out, state)
                if c.patience is not None and state["metrics"]:
                    metric = state["metrics"][-1]
                    better = best is None or (metric > best if c.task == "classification" else metric < best)
                    best, stale = (metric, 0) if better else (best, stale + 1)
                    if stale >= c.patience:
                        stopped = True
                        break
        self.save(out)
        return TrainResult(state["losses"], state["metrics"], out, stopped)

    def _epoch(self, epoch: int) -> float:
        c = self.config
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(c.seed * 1000 + epoch))
        batches = [order[i:i + c.batch_size].tolist() for i in range(0, len(order), c.batch_size)]
        total, count, tokens, start = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch")
        self._mask_draws = torch.Generator().manual_seed(c.seed * 1000 + epoch)  # mlm: this epoch's masks
        self.optimizer.zero_grad()
        for step, idx in enumerate(bar):
            examples = [self.train_set[i] for i in idx]
            with self._autocast():
                loss = self._loss(examples)
            (loss / c.grad_accum).backward()
            if (step + 1) % c.grad_accum == 0 or step + 1 == len(batches):
                self.optimizer.step()
                self.optimizer.zero_grad()
            total, count = total + loss.item() * len(examples), count + len(examples)
            tokens += sum(len(e.prompt) + len(e.completion) for e in examples)
            bar.set_postfix(loss=f"{total / count:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        return total / max(count, 1)

    def _autocast(self) -> Any:
        """bfloat16 autocast around the forward pass and the loss when asked for (the weights stay float32)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")

    def _loss(self, examples: list[Example]) -> torch.Tensor:
        if isinstance(self.adapter, MLMTrainable):
            inputs, rows, targets = self.adapter.mask([e.prompt for e in examples], self._mask_draws)
            hidden, _ = self._encode(inputs)
            logits = self.model.compute_head(hidden[torch.tensor(rows)])
            return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        hidden, starts = self._forward([e.prompt + e.completion for e in examples])
        if self.config.task == "classification":
            logits = self._label_logits(hidden, starts, examples)
            return torch.nn.functional.cross_entropy(logits, torch.tensor([e.label for e in examples]))
        rows, targets = [], []
        for e, s in zip(examples, starts):
            first = s + len(e.prompt) - 1  # the position that predicts the completion's first token
            rows += range(first, first + len(e.completion))
            targets += e.completion
        logits = self.model.compute_logits(hidden[torch.tensor(rows)]).float()
        return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))

    def _label_logits(self, hidden: torch.Tensor, starts: list[int], examples: list[Example]) -> torch.Tensor:
        if self.encoder:
            return self.adapter.logits(hidden[torch.tensor(starts)])
        last = torch.tensor([s + len(e.prompt) - 1 for e, s in zip(examples, starts)])
        if self.config.method == "head":  # a decoder's head reads the last token
            return self.adapter.logits(hidden[last])
        return self.model.compute_logits(hidden[last]).float()[:, self.label_ids]

    def _forward(self, sequences: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of whole sequences packed end to end (no cache), each after the adapter's virtual
        tokens, and where each sequence's own tokens start."""
        from tokenloom.models.layers.attention import AttentionMetadata, PrefillSpan

        if self.encoder:
            return self._encode(sequences)
        virtual = [PLACEHOLDER_TOKEN] * self.adapter.num_virtual_tokens
        sequences = [virtual + s for s in sequences]
        lens = [len(s) for s in sequences]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        ids = torch.tensor([t for s in sequences for t in s])
        positions = torch.cat([torch.arange(n) for n in lens])
        meta = AttentionMetadata(torch.empty(0, dtype=torch.long), [PrefillSpan(s, n, 0) for s, n in zip(starts, lens)],
                                 sum(lens))
        meta.virtual_kv = self.adapter.begin(starts, sum(lens))
        try:
            return self.model(ids, positions, meta), [s + len(virtual) for s in starts]
        finally:
            self.adapter.end()

    def _encode(self, sequences: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """An encoder's hidden states of whole sequences packed end to end, and where each starts."""
        from tokenloom.models.layers.encoder_attention import EncoderMetadata

        lens = [len(s) for s in sequences]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        ids = torch.tensor([t for s in sequences for t in s])
        positions = torch.cat([torch.arange(n) for n in lens])
        self.adapter.begin(starts, sum(lens))
        try:
            return self.model(ids, positions, EncoderMetadata.from_lens(lens)), starts
        finally:
            self.adapter.end()

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> float:
        """Accuracy (classification) or mean loss per completion token (generation) on `examples`."""
        c = self.config
        correct, loss, n = 0, 0.0, 0
        self._mask_draws = torch.Generator().manual_seed(c.seed)  # mlm: the same masks at every evaluation
        for i in range(0, len(examples), c.batch_size):
            part = examples[i:i + c.batch_size]
            with self._autocast():
                if c.task == "classification":
                    hidden, starts = self._forward([e.prompt for e in part])
                    predicted = self._label_logits(hidden, starts, part).argmax(-1).tolist()
                    correct += sum(p == e.label for p, e in zip(predicted, part))
                    n += len(part)
                else:
                    tokens = sum(len(e.completion) for e in part) or len(part)  # mlm: per sequence
                    loss += self._loss(part).item() * tokens
                    n += tokens
        return correct / n if c.task == "classification" else loss / max(n, 1)

    # ---- saving ----

    def save(self, out: Path) -> None:
        """adapter_config.json + adapter_model.safetensors, as PEFT writes them (full fine-tuning: a whole
        checkpoint), and the run's options (tokenloom_train.json)."""
        from safetensors.torch import save_file

        c = self.config
        (out / "tokenloom_train.json").write_text(json.dumps(asdict(c), indent=2))
        if isinstance(self.adapter, CheckpointTrainable):
            self.adapter.save(out, self.loaded)
            return
        save_file(self.adapter.tensors(), str(out / "adapter_model.safetensors"))
        peft_config = {"task_type": "CAUSAL_LM", **self.adapter.peft_config(),
                       "base_model_name_or_path": str(self.loaded.path), "inference_mode": True}
        (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))

    def _save_checkpoint(self, out: Path, state: dict[str, Any]) -> None:
        torch.save({"state": state, "params": [p.detach().clone() for p in self.params],
                    "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}, out / "checkpoint.pt")

    def _load_checkpoint(self, out: Path) -> dict[str, Any]:
        path = out / "checkpoint.pt"
        if not path.is_file():
            raise AdapterError(f"resume: {path} does not exist; run without resume first")
        saved = torch.load(path, weights_only=False)
        with torch.no_grad():
            for p, value in zip(self.params, saved["params"]):
                p.copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])  # dropout draws on as the uninterrupted run's would
        return saved["state"]


def read_examples(path: Path, trainer: Trainer) -> list[Example]:
    """The examples of a data file (jsonl, or `LABEL text` lines for classification); errors name the file
    and the line."""
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    c, tok = trainer.config, trainer.tokenizer
    examples = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                               f"re-encode the file as UTF-8") from exc
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AdapterError(f"{where}: not a JSON object: {exc}") from exc
            if not isinstance(row, dict):
                raise AdapterError(f"{where}: not a JSON object")
        elif c.method == "mlm":
            row = {"text": line}
        else:
            label, _, text = line.partition(" ")
            row = {"label": label, "text": text}
        examples.append(_example(row, where, c, tok, trainer.label_words))
    if not examples:
        raise AdapterError(f"{path} holds no examples")
    return examples


def _example(row: dict[str, Any], where: str, c: TrainConfig, tok: Any, label_words: list[str]) -> Example:
    if c.method == "mlm":  # raw text: a line of a .txt file, or {"text": ...}
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise AdapterError(f"{where}: an mlm example needs a non-empty 'text'")
        ids = tok.encode(text.strip())
        return Example(ids if len(ids) <= c.max_length else ids[:c.max_length - 1] + ids[-1:])
    if c.task == "generation":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise AdapterError(f"{where}: a generation example needs 'prompt' and a non-empty 'completion' string")
        p = tok.encode(prompt)
        eos = tok.hf.eos_token_id
        done = tok.encode(completion, add_special_tokens=False) + ([eos] if eos is not None else [])
        p = p[-max(1, c.max_length - len(done)):]  # keep the prompt's end when too long
        return Example(p, done[:c.max_length - 1])
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text.strip():
        raise AdapterError(f"{where}: a classification example needs a non-empty 'text'")
    if label is None or label == "":
        raise AdapterError(f"{where}: missing label")
    index = label_words.index(label) if label in label_words else None
    if index is None:
        try:
            index = int(label)
        except (TypeError, ValueError):
            index = -1
    if not 0 <= index < len(label_words):
        raise AdapterError(f"{where}: unknown label {label!r}; labels are 0..{len(label_words) - 1} or {label_words}")
    if c.method == "head":  # the text itself: an encoder's [CLS] ... [SEP] (the last kept when cut), a prompt
        ids = tok.encode(text.strip())
        return Example(ids if len(ids) <= c.max_length else ids[:c.max_length - 1] + ids[-1:], [], index)
    prompt = tok.encode(c.template.format(text=text.strip()))[-c.max_length:]
    return Example(prompt, [], index)
