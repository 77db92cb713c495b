"""Engine configuration: every option and its default, in one place.

`EngineConfig` groups four sub-configs. Their field names are flat and unique across the groups, so
that `LLM(model=..., kv_cache_gib=...)` keyword arguments and `tokenloom generate --kv-cache-gib`
flags map one to one onto fields (see `EngineConfig.from_kwargs` and `cli.add_engine_flags`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenloom.cpus import physical_cores

DEFAULT_MODEL = "gemma-3-270m"


class ConfigError(ValueError):
    """An engine option has an invalid value; the message names the option."""


@dataclass(slots=True)
class ModelConfig:
    """What to load and in which numeric format."""

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str = "auto"

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None, bf16_fast: bool = True) -> torch.dtype:
        """Resolve `dtype` to a torch dtype. `auto` keeps a float32 checkpoint's float32; any other
        (bfloat16, float16, a GGUF file) runs in bfloat16 where the device multiplies it fast
        (`bf16_fast`: CUDA, AVX512_BF16), else in float32 (a CPU without native bf16 emulates it, ~6x
        slower than float32 at this model size)."""
        if self.dtype == "auto":
            if checkpoint_dtype == torch.float32 or not bf16_fast:
                return torch.float32
            return torch.bfloat16
        return _DTYPES[self.dtype]


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache."""

    kv_cache_gib: float = 1.0
    block_size: int = 16
    enable_prefix_caching: bool = True
    # auto: float16 under float32 activations with quantized weights on a CPU (the default on machines without
    # native bf16: llama.cpp's default f16 cache, twice the tokens in kv_cache_gib, half the bytes decode
    # attention reads); else the model's dtype (unquantized float32 keeps its float32 cache: its outputs are
    # compared with transformers'). float16 / bfloat16 / float32 choose explicitly.
    kv_cache_dtype: str = "auto"

    def torch_dtype(self, model_dtype: torch.dtype, quantized: bool, device: torch.device) -> torch.dtype:
        """The cache's element type for a model running in `model_dtype` on `device` (`quantized`: its weights
        are)."""
        if self.kv_cache_dtype == "auto":
            cpu_fp32_quantized = model_dtype == torch.float32 and quantized and device.type == "cpu"
            return torch.float16 if cpu_fp32_quantized else model_dtype
        dtype = _DTYPES[self.kv_cache_dtype]
        if dtype.itemsize > model_dtype.itemsize:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype} is wider than the model's "
                              f"{str(model_dtype).removeprefix('torch.')}; use auto")
        return dtype


@dataclass(slots=True)
class SchedulerConfig:
    """The token-budget scheduler."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True


@dataclass(slots=True)
class AdapterConfig:
    """Adapters (LoRAs, soft prompts, prefixes) served per request on the base model (tokenloom/adapters)."""

    enable_adapters: bool = False
    max_adapters: int = 4  # adapters loaded at once (slots); more are swapped in least recently used first
    max_adapter_rank: int = 64


@dataclass(slots=True)
class DecodingConfig:
    """How constrained requests are decoded (tokenloom/structured): the default constraint backend."""

    structured_outputs_backend: str = "llguidance"


SPECULATIVE_METHODS = ("ngram", "draft", "self")
# speculative_max_batch when unset, per method (benchmarks/speculative.py's sweeps)
DEFAULT_SPECULATIVE_MAX_BATCH = {"ngram": 64, "draft": 2, "self": 2}


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py): a decoding request's next tokens are guessed and the model
    verifies them in one step, keeping the ones it would have produced itself (exact outputs).

    `speculative_method` ngram (prompt lookup: the continuation of the longest recent n-gram match, of
    `prompt_lookup_min` to `prompt_lookup_max` tokens, in the request's own prompt and output), draft (the
    greedy guesses of `speculative_model`, a smaller model with the same tokenizer), self (the target's own
    weights at 4 bits, group-quantized, drafting for it) or None (off). A draft model has a KV cache of its
    own beside the target's, out of the same `kv_cache_gib`.
    Up to `num_speculative_tokens` guesses a request each step, fewer after misses. Speculation pauses for a step
    whose running requests number more than `speculative_max_batch`: there the step is compute-bound and every
    guessed row costs as much as a token (0: never pause; None: the method's default, measured on a 2-core CPU:
    64 for ngram, whose guesses cost only their rows, 2 for draft and self, whose draft steps cost on top;
    docs/benchmarks.md). `LLM(speculative_config={...})` takes vLLM's shape."""

    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    speculative_max_batch: int | None = None
    speculative_model: str | None = None


@dataclass(slots=True)
class DeviceConfig:
    """Where tensors live, how many CPU threads torch uses, and whether they are pinned (`cpu_bind`:
    none, cores = one per physical core, or CPU ids such as 0,2 or 0-3)."""

    device: str = "auto"
    num_threads: int | None = None
    cpu_bind: str = "none"

    def torch_device(self) -> torch.device:
        """`auto` picks CUDA when present, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# auto: a GGUF file's block-quantized matrices stay quantized (int4 when it stores 4/5-bit blocks, int8
# for 8-bit ones), repacked exactly; float checkpoints run unquantized.
QUANTIZATIONS = ("auto", "none", "int8", "int5", "int4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GROUPS = {"model_config": ModelConfig, "cache_config": CacheConfig,
           "scheduler_config": SchedulerConfig, "device_config": DeviceConfig, "adapter_config": AdapterConfig,
           "decoding_config": DecodingConfig, "speculative_config": SpeculativeConfig}
# vLLM's `speculative_config` keys → our flat options
_VLLM_SPECULATIVE_KEYS = {"method": "speculative_method", "num_speculative_tokens": "num_speculative_tokens",
                          "prompt_lookup_min": "prompt_lookup_min", "prompt_lookup_max": "prompt_lookup_max",
                          "model": "speculative_model"}
CONFIG_GROUPS = tuple(_GROUPS.values())  # the option groups, in flag order


@dataclass(slots=True)
class EngineConfig:
    """All engine options, grouped; build it from flat keyword arguments with `from_kwargs`."""

    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    adapter_config: AdapterConfig = field(default_factory=AdapterConfig)
    decoding_config: DecodingConfig = field(default_factory=DecodingConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Dispatch each flat option to the sub-config that owns it; unknown names are an error."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        kwargs = {**_speculative_options(kwargs.pop("speculative_config", None)), **kwargs}
        for key, value in kwargs.items():
            group = option_owner(key)
            if group is None:
                raise ConfigError(f"unknown engine option {key!r}; known options: {', '.join(option_names())}")
            parts[group][key] = value
        return cls(**{name: _GROUPS[name](**values) for name, values in parts.items()})

    def validate(self) -> None:
        """Raise `ConfigError` naming the first option that is out of range."""
        m, c, s = self.model_config, self.cache_config, self.scheduler_config
        if m.dtype != "auto" and m.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {m.dtype!r}")
        if m.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {m.quantization!r}")
        if m.max_model_len is not None and m.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1; got {m.max_model_len}")
        if c.kv_cache_dtype != "auto" and c.kv_cache_dtype not in _DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of auto, {', '.join(_DTYPES)}; got {c.kv_cache_dtype!r}")
        if c.kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be > 0; got {c.kv_cache_gib}")
        if c.block_size < 1 or c.block_size & (c.block_size - 1):
            raise ConfigError(f"block_size must be a power of two; got {c.block_size}")
        if s.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1; got {s.max_num_batched_tokens}")
        if s.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1; got {s.max_num_seqs}")
        a = self.adapter_config
        if a.max_adapters < 1 or a.max_adapter_rank < 1:
            raise ConfigError(f"max_adapters and max_adapter_rank must be >= 1; got {a.max_adapters}, "
                              f"{a.max_adapter_rank}")
        parse_cpu_bind(self.device_config.cpu_bind)
        self.speculative_config_check()

    def speculative_config_check(self) -> None:
        """Raise `ConfigError` for an unknown speculative method or lookup sizes out of range."""
        sp = self.speculative_config
        if sp.speculative_method is not None and sp.speculative_method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} (or unset); "
                              f"got {sp.speculative_method!r}")
        if not 1 <= sp.num_speculative_tokens <= 64:
            raise ConfigError(f"num_speculative_tokens must be between 1 and 64; got {sp.num_speculative_tokens}")
        if not 1 <= sp.prompt_lookup_min <= sp.prompt_lookup_max:
            raise ConfigError(f"prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max; got "
                              f"{sp.prompt_lookup_min}, {sp.prompt_lookup_max}")
        if sp.speculative_max_batch is not None and sp.speculative_max_batch < 0:
            raise ConfigError(f"speculative_max_batch must be >= 0; got {sp.speculative_max_batch}")
        if (sp.speculative_method == "draft") != (sp.speculative_model is not None):
            raise ConfigError("speculative_model names the draft model of speculative_method draft, and only of "
                              f"it; got method {sp.speculative_method!r} and model {sp.speculative_model!r}")


def _speculative_options(spec: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's `speculative_config` dict as our flat options; an unknown key is an error naming it."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                          f"'num_speculative_tokens': 4}}; got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_VLLM_SPECULATIVE_KEYS))
    if unknown:
        raise ConfigError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(_VLLM_SPECULATIVE_KEYS)}")
    options = {_VLLM_SPECULATIVE_KEYS[k]: v for k, v in spec.items()}
    if "speculative_model" in options and "speculative_method" not in options:  # vLLM: a model means a draft
        options["speculative_method"] = "draft"
    return options


def parse_cpu_bind(spec: str) -> list[int] | None:
    """`none` → None; `cores` → one CPU per physical core; `0,2,4` or `0-3` → those CPUs."""
    spec = spec.strip().lower()
    if spec == "none":
        return None
    if spec == "cores":
        return physical_cores()
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            low, dash, high = part.partition("-")
            cpus.extend(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        cpus = []
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"cpu_bind must be none, cores, or CPU ids such as 0,2 or 0-3; got {spec!r}")
    return cpus


def option_names() -> list[str]:
    """Every flat engine option name, in declaration order."""
    return [f.name for group in _GROUPS.values() for f in dataclasses.fields(group)]


def option_owner(name: str) -> str | None:
    """The EngineConfig attribute holding option `name`, or None."""
    for group, klass in _GROUPS.items():
        if any(f.name == name for f in dataclasses.fields(klass)):
            return group
    return None
