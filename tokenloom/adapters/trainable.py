"""What `tokenloom train` optimises, one class per method, each installed on our own model code and saved in
PEFT's format:
- `LoRATrainable`: a low-rank update (A kaiming-uniform, B zero: PEFT's init) per target projection, in a
  `LoRALinear` around each layer it adapts (fused q|k|v and gate|up shard by shard);
- `HeadTrainable`: a classification head (an encoder's `classifier` on its pooled first token, a decoder's
  `score` on its last token) with LoRA underneath: PEFT's SEQ_CLS LoRA adapter;
- `FullTrainable`: the model's own weights, all of them or the top N layers (saved as a whole checkpoint);
- `MLMTrainable`: continued masked-language-model pre-training of an encoder (BERT's 15% masking, 80/10/10),
  every weight and the MLM head (a new one on a bare encoder), saved as a whole ForMaskedLM checkpoint;
- `PromptTrainable`: N virtual tokens before every sequence, given by a table: input embeddings (prompt
  tuning, initialised from a text's embeddings or randomly), the same through a prompt encoder (P-tuning,
  PEFT's MLP or LSTM), or per-layer keys and values (prefix tuning, optionally projected). The serving path
  (virtual.py) is the training path: the table's rows replace the placeholders' embeddings or keys and values.
A batch is whole sequences packed end to end; `begin` tells the adapter where each one's rows are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenloom.adapters import AdapterError
from tokenloom.adapters.lora import LoRABatch, LoRALinear, LoRAUpdate, linear_targets
from tokenloom.adapters.virtual import PROMPT_METHODS, ModelShape, VirtualTokens, model_shape, split_prefix
from tokenloom.models.layers.attention import VirtualKV, index_attention_layers

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PROMPT_PEFT_TYPES = {method: peft_type for peft_type, method in PROMPT_METHODS.items()}
ENCODER_TARGETS = ("query", "value")  # PEFT's default LoRA targets for BERT
METHODS = ("lora", *PROMPT_PEFT_TYPES, "full", "head", "mlm")
ENCODER_METHODS = ("mlm",)  # head trains either kind


def peft_lora_a(rank: int, in_features: int, out_features: int) -> torch.Tensor:
    """A LoRA's A [rank, in] drawn from the global RNG as PEFT draws it: PEFT builds lora_A and lora_B as
    nn.Linear layers (each drawing its default init), then draws A again (kaiming-uniform, a=√5) and zeroes B.
    The same draws in the same module order make a run seeded alike start from PEFT's very weights."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, rank)'s own init
    nn.init.kaiming_uniform_(torch.empty(out_features, rank), a=math.sqrt(5))  # nn.Linear(rank, out)'s
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRATrainable:
    """Trainable LoRA updates on `model`'s target projections."""

    num_virtual_tokens = 0

    def __init__(self, model: nn.Module, rank: int, alpha: float, target_modules: str | None, gpt2: bool,
                 model_name: str, default_targets: tuple[str, ...] | None = None, dropout: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1); got {dropout}")
        self.rank, self.alpha, self.gpt2, self.dropout = rank, alpha, gpt2, dropout
        wanted = tuple(t.strip() for t in target_modules.split(",")) if target_modules else (
            default_targets or (GPT2_TARGETS if gpt2 else DEFAULT_TARGETS))
        # An encoder's checkpoint names its modules otherwise (bert.encoder...): saved under those names.
        checkpoint_name = getattr(model, "checkpoint_module_name", lambda name: name)
        self.targets = sorted(wanted)
        self.batch = LoRABatch()
        found: dict[str, list[LoRAUpdate]] = {}
        self.updates: list[tuple[str, LoRAUpdate]] = []  # (checkpoint module name, its update)
        for hf_name, (ours, offset, width) in linear_targets(model).items():  # module order: PEFT's init order
            if hf_name.rsplit(".", 1)[-1] not in wanted or "lm_head" in hf_name or hf_name.startswith("pooler"):
                continue
            base = model.get_submodule(ours)
            a = nn.Parameter(peft_lora_a(rank, int(base.in_features), width))
            update = LoRAUpdate(a, nn.Parameter(torch.zeros(width, rank)), offset, alpha / rank, dropout)
            found.setdefault(ours, []).append(update)
            self.updates.append((checkpoint_name(hf_name), update))
        if not found:
            raise AdapterError(f"target_modules {list(wanted)} match no linear layer of {model_name}")
        for ours, updates in found.items():
            parent_name, _, leaf = ours.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = LoRALinear(getattr(parent, leaf), self.batch, 1)
            layer.set_updates(0, updates)
            setattr(parent, leaf, layer)
        self.params = [p for _, u in self.updates for p in (u.a, u.b)]

    def begin(self, starts: list[int], total: int) -> VirtualKV | None:
        """Every packed row runs with the update."""
        self.batch.groups = [(0, torch.arange(total))]
        return None

    def end(self) -> None:
        """After the forward pass."""
        self.batch.groups = []

    def tensors(self) -> dict[str, torch.Tensor]:
        """adapter_model.safetensors' tensors."""
        out = {}
        for name, u in self.updates:
            out[f"base_model.model.{name}.lora_A.weight"] = u.a.detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = u.b.detach().contiguous()
        return out

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json's method fields."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets, "bias": "none", "fan_in_fan_out": self.gpt2, "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "init_lora_weights": True}


class PromptTrainable:
    """A trainable table of N virtual tokens (prompt tuning, P-tuning or prefix tuning) before each sequence."""

    def __init__(self, model: nn.Module, method: str, num_virtual_tokens: int, encoder_hidden_size: int | None,
                 init: tuple[str, list[int], str] | None = None, encoder: str = "mlp") -> None:
        """`init`: prompt tuning's initial text, its token ids and the tokenizer's folder (PEFT records both);
        `encoder`: P-tuning's prompt encoder (mlp or lstm, as PEFT's), prefix tuning's (none, or mlp: PEFT's
        prefix projection)."""
        if num_virtual_tokens < 1:
            raise AdapterError(f"num_virtual_tokens must be at least 1; got {num_virtual_tokens}")
        self.method, self.num_virtual_tokens = method, num_virtual_tokens
        self.shape: ModelShape = model_shape(model)
        index_attention_layers(model)
        self.init = init
        kv_width = self.shape.num_kv_heads * self.shape.head_dim
        width = self.shape.num_layers * 2 * kv_width if method == "prefix-tuning" else self.shape.hidden_size
        allowed = {"p-tuning": ("mlp", "lstm"), "prefix-tuning": ("none", "mlp")}.get(method, ("none",))
        if encoder not in allowed:
            raise AdapterError(f"prompt_encoder for {method} must be one of {', '.join(allowed)}; got {encoder!r}")
        self.encoder_kind = encoder
        projected = method == "prefix-tuning" and encoder == "mlp"
        # N(0, 1), as PEFT's tables start; a projected prefix starts from one vector a token, as PEFT's
        self.embedding = nn.Embedding(num_virtual_tokens, kv_width if projected else width)
        if init is not None:
            if method != "prompt-tuning":
                raise AdapterError(f"init_text initialises prompt tuning only, not {method}")
            if not init[1]:
                raise AdapterError(f"init_text {init[0]!r} has no tokens")
            ids = (init[1] * math.ceil(num_virtual_tokens / len(init[1])))[:num_virtual_tokens]
            with torch.no_grad():
                self.embedding.weight.copy_(model.input_embeddings()(torch.tensor(ids)))
        self.encoder_hidden_size = encoder_hidden_size or (kv_width if method == "prefix-tuning" else
                                                           self.shape.hidden_size)
        self.encoder = self.lstm = None
        h = self.encoder_hidden_size
        if method == "p-tuning" and encoder == "mlp":  # PEFT's MLP prompt encoder
            self.encoder = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                         nn.Linear(h, width))
        elif method == "p-tuning":  # PEFT's LSTM prompt encoder: a bidirectional LSTM, then an MLP
            self.lstm = nn.LSTM(width, h, num_layers=2, bidirectional=True, batch_first=True)
            self.encoder = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, width))
        elif projected:  # PEFT's prefix projection
            self.encoder = nn.Sequential(nn.Linear(kv_width, h), nn.Tanh(), nn.Linear(h, width))
        self.virtual = VirtualTokens()
        if method != "prefix-tuning":
            self.virtual.hook(model.input_embeddings())
        self.params = [self.embedding.weight, *(self.lstm.parameters() if self.lstm is not None else ()),
                       *(self.encoder.parameters() if self.encoder is not None else ())]

    def table(self) -> torch.Tensor:
        """The N virtual tokens' vectors [N, width] (after the prompt encoder, where there is one)."""
        weight = self.embedding.weight
        if self.lstm is not None:
            weight = self.lstm(weight.unsqueeze(0))[0].squeeze(0)
        return self.encoder(weight) if self.encoder is not None else weight

    def begin(self, starts: list[int], total: int) -> VirtualKV | None:
        """The virtual rows of each packed sequence (its first N) take the table's vectors."""
        n = self.num_virtual_tokens
        rows = torch.cat([torch.arange(s, s + n) for s in starts])
        table = self.table()
        if self.method != "prefix-tuning":
            self.virtual.set(rows, table.repeat(len(starts), 1))
            return None
        keys, values = split_prefix(table, self.shape)
        return VirtualKV(rows, keys.repeat(1, len(starts), 1, 1), values.repeat(1, len(starts), 1, 1))

    def end(self) -> None:
        """After the forward pass."""
        self.virtual.set(None, None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """adapter_model.safetensors' tensor: the table as served (PEFT saves P-tuning's encoder output)."""
        with torch.no_grad():
            return {"prompt_embeddings": self.table().detach().contiguous()}

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json's method fields."""
        s = self.shape
        prefix = self.method == "prefix-tuning"
        config = {"peft_type": PROMPT_PEFT_TYPES[self.method], "num_virtual_tokens": self.num_virtual_tokens,
                  "token_dim": s.num_kv_heads * s.head_dim if prefix else s.hidden_size,
                  "num_transformer_submodules": 1, "num_layers": s.num_layers,
                  "num_attention_heads": s.num_kv_heads if prefix else None}
        if self.method == "prompt-tuning":
            config.update(prompt_tuning_init="RANDOM")
            if self.init is not None:
                config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.init[0],
                              tokenizer_name_or_path=self.init[2])
        elif self.method == "p-tuning":
            config.update(encoder_reparameterization_type=self.encoder_kind.upper(),
                          encoder_hidden_size=self.encoder_hidden_size, encoder_num_layers=2, encoder_dropout=0.0)
        else:
            config.update(prefix_projection=self.encoder_kind == "mlp", encoder_hidden_size=self.encoder_hidden_size)
        return config


class HeadTrainable:
    """A new classification head, HF's init, with LoRA updates on the layers under it (PEFT's format has no
    head-only adapter): on an encoder `classifier` [labels, hidden] + bias on the pooled first token, on a
    decoder `score` [labels, hidden] on the last token (as transformers' ForSequenceClassification)."""

    num_virtual_tokens = 0

    def __init__(self, model: nn.Module, num_labels: int, rank: int, alpha: float, target_modules: str | None,
                 model_name: str, dropout: float = 0.0, seed: int | None = None) -> None:
        self.encoder = hasattr(model, "pooled")
        if self.encoder and getattr(model, "pooler", None) is None:
            raise AdapterError(f"{model_name} has no pooler (pooler.dense) for a classification head: the head "
                               f"method needs a bare BERT-family encoder checkpoint that carries one")
        if rank < 1:
            raise AdapterError(f"the head method trains LoRA under the head (a PEFT SEQ_CLS adapter): rank must be "
                               f">= 1; got {rank}")
        hidden = int(model.spec.hidden_size if self.encoder else model.config.hidden_size)
        self.model, self.name = model, "classifier" if self.encoder else "score"
        gpt2 = getattr(model.config, "model_type", "") == "gpt2"
        # Drawn as transformers and PEFT draw them from a seed: the head alone at model load (normal, bias
        # zero), then, seeded again, the LoRA matrices.
        self.classifier = nn.utils.skip_init(nn.Linear, hidden, num_labels, bias=self.encoder)
        nn.init.normal_(self.classifier.weight, std=float(getattr(model.config, "initializer_range", 0.02)))
        if self.encoder:
            nn.init.zeros_(self.classifier.bias)
        if seed is not None:
            torch.manual_seed(seed)
        self.lora = LoRATrainable(model, rank, alpha, target_modules, gpt2, model_name,
                                  ENCODER_TARGETS if self.encoder else None, dropout)
        self.params = [*self.lora.params, *self.classifier.parameters()]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows the head reads (an encoder's first tokens, a decoder's last) → [seqs, labels] logits."""
        return self.classifier(self.model.pooled(rows) if self.encoder else rows)

    def begin(self, starts: list[int], total: int) -> VirtualKV | None:
        """Every packed row runs with the LoRA updates."""
        return self.lora.begin(starts, total)

    def end(self) -> None:
        """After the forward pass."""
        self.lora.end()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA matrices and the head, under PEFT's names."""
        out = self.lora.tensors()
        for leaf, p in self.classifier.named_parameters():
            out[f"base_model.model.{self.name}.{leaf}"] = p.detach().contiguous()
        return out

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json's method fields: a SEQ_CLS LoRA whose classifier is a module to save."""
        return {**self.lora.peft_config(), "task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score"]}


class CheckpointTrainable:
    """A method that trains the model's own weights and saves a whole checkpoint (config.json,
    model.safetensors under the checkpoint's names, the tokenizer), which tokenloom and transformers load."""

    num_virtual_tokens = 0
    model: nn.Module

    def begin(self, starts: list[int], total: int) -> VirtualKV | None:
        """Nothing to set: the model's own weights train."""
        return None

    def end(self) -> None:
        """After the forward pass."""

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The model's tensors under the checkpoint's names."""
        from tokenloom.models.loading import checkpoint_tensors

        return checkpoint_tensors(self.model)

    def save(self, out: Any, loaded: Any) -> None:
        """config.json, model.safetensors and the tokenizer files in `out`."""
        from safetensors.torch import save_file

        save_file(self.checkpoint(), str(out / "model.safetensors"), metadata={"format": "pt"})
        loaded.hf_config.save_pretrained(out)
        loaded.tokenizer.hf.save_pretrained(out)


class FullTrainable(CheckpointTrainable):
    """Fine-tuning of the model's own weights: the top `train_layers` decoder layers and the final norm, or
    (None) every parameter, embeddings included."""

    def __init__(self, model: nn.Module, train_layers: int | None, model_name: str) -> None:
        layers = _decoder_layers(model)
        if train_layers is not None and not 1 <= train_layers <= len(layers):
            raise AdapterError(f"train_layers must be in [1, {len(layers)}] ({model_name} has {len(layers)} layers); "
                               f"got {train_layers}")
        if train_layers is None:
            chosen = list(model.parameters())
        else:
            top = [p for layer in layers[len(layers) - train_layers:] for p in layer.parameters()]
            norm = [p for name, p in model.named_parameters() if name.startswith(_FINAL_NORMS)]
            chosen = top + norm
        for p in chosen:
            p.requires_grad_(True)
        self.model, self.params = model, chosen


_FINAL_NORMS = ("model.norm.", "transformer.ln_f.")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as the config's layer count)."""
    count = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise AdapterError(f"{type(model).__name__}: no list of {count} decoder layers found to fine-tune")


class MLMTrainable(CheckpointTrainable):
    """An encoder trained on masked tokens: the body and its masked-LM head (BERT's dense, GELU, LayerNorm and
    the tied vocabulary projection; a bare encoder gets a new one, initialised as transformers does), saved as
    a ForMaskedLM checkpoint."""

    mask_prob = 0.15

    def __init__(self, loaded: Any) -> None:
        from tokenloom.models.encoder_heads import EncoderForMaskedLM, EncoderModel

        model = loaded.model
        if model.spec.family == "distilbert":
            raise AdapterError("the mlm method trains BERT and RoBERTa checkpoints (DistilBERT's names differ)")
        if not isinstance(model, EncoderForMaskedLM):
            if type(model) is not EncoderModel:
                raise AdapterError(f"the mlm method needs a bare encoder or a masked-LM one; {loaded.name} is "
                                   f"{type(model).__name__}")
            body = model.model
            model = EncoderForMaskedLM(loaded.hf_config)
            std = float(getattr(loaded.hf_config, "initializer_range", 0.02))
            nn.init.normal_(model.lm_head.dense.weight, std=std)
            nn.init.zeros_(model.lm_head.dense.bias)
            model.model = body
            if model.tied:  # the vocabulary projection is the pre-trained word embedding table
                model.lm_head.decoder.embedding = body.embeddings.word_embeddings
            arch = (loaded.hf_config.architectures or [f"{type(loaded.hf_config).__name__[:-6]}Model"])[0]
            loaded.hf_config.architectures = [arch.replace("Model", "ForMaskedLM")]
            loaded.model = model
        self.model, self.loaded = model, loaded
        tok = loaded.tokenizer.hf
        self.mask_id, self.special = tok.mask_token_id, set(tok.all_special_ids)
        if self.mask_id is None:
            raise AdapterError(f"{loaded.name}'s tokenizer has no mask token")
        self.vocab = int(model.spec.vocab_size)
        model.requires_grad_(True)
        self.params = list(model.parameters())

    def mask(self, sequences: list[list[int]], generator: torch.Generator) -> tuple[list[list[int]], list[int],
                                                                                   list[int]]:
        """BERT's masking: 15% of each sequence's ordinary tokens (at least one) chosen; of those 80% become
        the mask token, 10% a random token, 10% stay. Returns the inputs, the chosen packed rows and their
        original tokens."""
        inputs, rows, targets, offset = [], [], [], 0
        for seq in sequences:
            seq = list(seq)
            ordinary = [i for i, t in enumerate(seq) if t not in self.special]
            if ordinary:
                draw = torch.rand(len(ordinary), generator=generator)
                chosen = [p for p, r in zip(ordinary, draw.tolist()) if r < self.mask_prob]
                if not chosen:
                    chosen = [ordinary[int(draw.argmin())]]
                for p in chosen:
                    rows.append(offset + p)
                    targets.append(seq[p])
                    kind = float(torch.rand(1, generator=generator))
                    if kind < 0.8:
                        seq[p] = self.mask_id
                    elif kind < 0.9:
                        seq[p] = int(torch.randint(self.vocab, (1,), generator=generator))
            inputs.append(seq)
            offset += len(seq)
        return inputs, rows, targets

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The encoder's and its head's tensors under the checkpoint's names (`bert.`..., `cls.predictions.`...)."""
        return self.model.checkpoint_state()
