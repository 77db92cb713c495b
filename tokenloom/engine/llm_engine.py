"""The engine loop: schedule → execute → sample (or pool) → update → emit outputs.

One engine for every model kind: decoder-only and encoder–decoder models generate (sampling params),
encoder-only models pool (pooling params: embeddings and task heads, engine/pooling.py). Both kinds of
request travel the same path: the scheduler's queue and token budget, the runner's step, the outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.adapters import AdapterRequest
from tokenloom.adapters.manager import AdapterManager
from tokenloom.adapters.virtual import PLACEHOLDER_TOKEN
from tokenloom.config import CacheConfig, ConfigError, EngineConfig
from tokenloom.engine.draft_model import DraftModelProposer
from tokenloom.engine.input_processor import AdapterBinding, InputProcessor
from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.model_runner import ModelRunner, RunnerOutput, kv_bytes_per_block
from tokenloom.engine.output_processor import OutputProcessor, ParentState
from tokenloom.engine.pooling import (
    EncoderInput,
    EncoderTokenizer,
    PoolingParams,
    PoolingResult,
    PoolingRunner,
    encoder_max_len,
    pooling_tasks,
)
from tokenloom.engine.request import InvalidRequestError, Request, RequestStatus
from tokenloom.engine.scheduler import Scheduler, SchedulerOutput
from tokenloom.engine.speculative import SpeculativeStats, Speculator
from tokenloom.engine.threads import ThreadBinder
from tokenloom.loader import LoadedModel, load_model
from tokenloom.models.layers.quantized import has_tiled_layers
from tokenloom.models.pooling import PoolingConfig, read_pooling_config
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import SamplingParams
from tokenloom.structured import StructuredOutputs, TokenizerInfo
from tokenloom.structured.backend import backend_factory

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """Counters for monitoring."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    speculative: SpeculativeStats | None = None  # with speculative decoding on


GENERATIVE_TASKS = ("generate", "chat")


def kv_cache_dtype(cache: CacheConfig, loaded: LoadedModel, device: torch.device) -> torch.dtype:
    """The element type of `loaded`'s KV cache under `cache` (its `auto` depends on the weights' format)."""
    return cache.torch_dtype(loaded.dtype, loaded.quantization != "none", device)


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the per-request output state."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        device = config.device_config.torch_device()
        if config.device_config.num_threads:
            torch.set_num_threads(config.device_config.num_threads)
        torch.manual_seed(config.model_config.seed)
        self._threads = ThreadBinder.for_config(config)
        self.loaded = loaded or load_model(config.model_config, device)
        self.tokenizer = self.loaded.tokenizer
        cache = config.cache_config
        self.kv_dtype = kv_cache_dtype(cache, self.loaded, device)
        self.adapters = None
        if config.adapter_config.enable_adapters:
            if self.loaded.kind not in ("decoder", "encoder"):
                raise ConfigError(f"enable_adapters: adapters run on decoder-only and encoder-only models; "
                                  f"{self.loaded.name} is {self.loaded.kind}")
            a = config.adapter_config
            self.adapters = AdapterManager(self.loaded.model, device, a.max_adapters, a.max_adapter_rank)
        pooling = encoder_inputs = None
        draft = self._load_draft(config)
        if self.loaded.kind == "encoder":  # no KV cache: inputs run whole, in one step
            num_blocks = 0
            self.pooling_config = read_pooling_config(self.loaded.path)
            self.max_model_len = encoder_max_len(self.loaded, self.pooling_config, config.model_config.max_model_len)
            encoder_inputs = EncoderTokenizer(self.loaded, self.max_model_len)
            pooling = PoolingRunner(self.loaded.model, self.pooling_config, self.tokenizer.hf.mask_token_id, device,
                                    self.adapters)
        else:
            block_bytes = kv_bytes_per_block(self.loaded.model, cache.block_size, self.kv_dtype) + (
                kv_bytes_per_block(draft.model, cache.block_size, kv_cache_dtype(cache, draft, device)) if draft else 0)
            num_blocks = int(cache.kv_cache_gib * 2**30 // block_bytes)
            if num_blocks < 1:
                raise ConfigError(f"kv_cache_gib={cache.kv_cache_gib} holds no block of {block_bytes} bytes")
            # A request must always fit alone, or it could neither run nor be preempted away.
            self.max_model_len = min(self.loaded.max_model_len, num_blocks * cache.block_size,
                                     draft.max_model_len if draft is not None else num_blocks * cache.block_size)
            logger.info("KV cache: %d blocks of %d tokens in %s (%.2f GiB)", num_blocks, cache.block_size,
                        str(self.kv_dtype).removeprefix("torch."), cache.kv_cache_gib)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.runner = ModelRunner(self.loaded.model, num_blocks, cache.block_size, self.kv_dtype, device, pooling,
                                  self.adapters)
        self.inputs = InputProcessor(self.loaded, self.max_model_len, device, encoder_inputs)
        self.vocab_size = self.inputs.vocab_size
        self.speculator = None
        if config.speculative_config.speculative_method is not None:
            drafter = DraftModelProposer(draft, num_blocks, cache.block_size, kv_cache_dtype(cache, draft, device),
                                         device, self.vocab_size) if draft is not None else None
            self.speculator = Speculator(config.speculative_config, self.max_model_len, drafter,
                                         tiled_target=has_tiled_layers(self.loaded.model))
        self.scheduler = Scheduler(config.scheduler_config, self.kv, self.max_model_len, self.speculator)
        self.structured = None  # constraints (JSON schema, regex, choice, grammar): generative models only
        if self.loaded.kind != "encoder":
            backend = config.decoding_config.structured_outputs_backend
            backend_factory(backend)  # an unknown backend fails at start, not at the first request
            self.structured = StructuredOutputs(TokenizerInfo(self.tokenizer.hf, self.vocab_size,
                                                              tuple(sorted(self.inputs.eos_token_ids))), backend)
            self.runner.structured = self.structured
        self.outputs = OutputProcessor(self.tokenizer)
        self.device = device
        self._pooling: dict[str, Request] = {}  # pooling requests in flight, by id
        self._run_ids = itertools.count()

    def _load_draft(self, config: EngineConfig) -> LoadedModel | None:
        """The draft model speculative decoding asks for: `speculative_model` (method draft), or the target
        loaded again with 4-bit weights (method self); None for ngram or none. Decoder-only targets only."""
        sp = config.speculative_config
        if sp.speculative_method is None:
            return None
        if self.loaded.kind != "decoder":
            raise ConfigError(f"speculative_method: speculative decoding runs on decoder-only models; "
                              f"{self.loaded.name} is {self.loaded.kind}")
        if sp.speculative_method == "ngram":
            return None
        m = config.model_config
        if sp.speculative_method == "self":
            if self.loaded.quantization == "int4":
                logger.warning("speculative_method self: the target already runs 4-bit weights, so its draft is "
                               "as slow as itself; speculation will not pay (use --quantization none)")
            draft_config = dataclasses.replace(m, quantization="int4")
        else:
            draft_config = dataclasses.replace(m, model=sp.speculative_model, tokenizer=None, quantization="auto")
        try:
            draft = load_model(draft_config, self.loaded.device)
        except Exception as exc:
            raise ConfigError(f"speculative_model: cannot load draft model {draft_config.model!r}: {exc}") from exc
        if draft.kind != "decoder":
            raise ConfigError(f"speculative_model: the draft must be a decoder-only model; {draft.name} is "
                              f"{draft.kind}")
        if sp.speculative_method == "draft" and draft.tokenizer.hf.get_vocab() != self.tokenizer.hf.get_vocab():
            raise ConfigError(f"speculative_model: {draft.name} does not share {self.loaded.name}'s tokenizer; a "
                              f"draft model must (its tokens are the target's guesses)")
        logger.info("speculative decoding: %s drafts with %s (%s, quantization %s)", sp.speculative_method,
                    draft.name, str(draft.dtype).removeprefix("torch."), draft.quantization)
        return draft

    @property
    def model(self) -> torch.nn.Module:
        """The model the engine runs."""
        return self.loaded.model

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """generate and chat, or what an encoder-only model's head allows (embed, classify, score,
        token_classify, qa, fill_mask)."""
        return GENERATIVE_TASKS if self.loaded.kind != "encoder" else pooling_tasks(self.loaded)

    def require(self, task: str) -> None:
        """Raise InvalidRequestError unless the model supports `task`, naming what it does support."""
        if task not in self.supported_tasks:
            arch = type(self.model).__name__
            raise InvalidRequestError(f"model {self.loaded.name} ({arch}) does not support {task}; "
                                      f"it supports: {', '.join(self.supported_tasks)}")

    def tokenize(self, text: str, text_pair: str | None = None, truncate: bool = False,
                 with_offsets: bool = False) -> EncoderInput:
        """An encoder-only model's input from a text (or pair); see EncoderTokenizer. Safe from any thread."""
        return self._encoder_inputs().tokenize(text, text_pair, truncate, with_offsets)

    def from_token_ids(self, token_ids: list[int], truncate: bool = False) -> EncoderInput:
        """An encoder-only model's input given as token ids (special tokens included)."""
        return self._encoder_inputs().from_token_ids(token_ids, truncate)

    def _encoder_inputs(self) -> EncoderTokenizer:
        if self.inputs.encoder_inputs is None:
            raise InvalidRequestError(f"model {self.loaded.name} is generative; encoder inputs need an encoder-only "
                                      f"model")
        return self.inputs.encoder_inputs

    def add_request(self, request_id: str, prompt: list[int] | EncoderInput, params: SamplingParams | PoolingParams,
                    prompt_text: str | None = None, strict: bool = False,
                    adapter: AdapterRequest | None = None) -> None:
        """Validate and queue a request: a generation from its prompt's token ids (the input processor makes
        them from text or messages; `prompt_text` is echoed in its outputs; `strict` refuses a max_tokens
        over the context instead of shortening it; `adapter` runs it with an adapter (a LoRA, a soft prompt
        or a prefix), loaded on first use), or, with pooling params, an encoder-only model's input."""
        if request_id in self.outputs.parents or request_id in self._pooling:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(params, PoolingParams):
            if self.loaded.kind == "decoder":
                self._add_head_request(request_id, prompt, params, adapter)
            else:
                self._add_pooling(request_id, prompt, params, adapter)
            return
        if self.loaded.kind == "encoder":
            arch = type(self.model).__name__
            raise InvalidRequestError(f"model {self.loaded.name} is an encoder-only model ({arch}): it supports "
                                      f"{', '.join(self.supported_tasks)}, not text generation")
        if isinstance(prompt, str):
            raise InvalidRequestError("add_request takes token ids; tokenize text with engine.inputs.token_ids")
        children = self.inputs.requests(request_id, prompt, params, strict, self._adapter(adapter))
        if params.structured_outputs is not None:  # compiled once per distinct constraint (cached)
            for child in children:
                child.matcher = self.structured.matcher(params.structured_outputs)
        self.outputs.add(ParentState(request_id, prompt_text, list(prompt)), children)
        for child in children:
            self.scheduler.add(child)

    def _adapter(self, adapter: AdapterRequest | None) -> AdapterBinding | None:
        """A request's adapter, loaded on first use."""
        if adapter is None:
            return None
        slot = self.load_adapter(adapter)
        return AdapterBinding(adapter.name, slot, self.adapters.num_virtual_tokens(slot))

    def load_adapter(self, adapter: AdapterRequest) -> int:
        """Load an adapter into a slot now (a no-op when it is loaded); its slot."""
        if self.adapters is None:
            raise InvalidRequestError(f"adapter {adapter.name!r} asked for, but adapters are off: start the engine "
                                      f"with enable_adapters=True (--enable-adapters)", "adapter")
        return self.adapters.slot_for(adapter, self._busy_adapter_slots())

    def label_config(self, adapter: AdapterRequest | None = None) -> Any:
        """Where classification labels come from: the adapter's head (loading it), else the model's config."""
        head = self.adapters.head(self.load_adapter(adapter)) if adapter is not None else None
        return head.label_config() if head is not None else self.loaded.hf_config

    def unload_adapter(self, name: str) -> bool:
        """Free adapter `name`'s slot (False when it is not loaded); refused while requests use it."""
        return self.adapters is not None and self.adapters.unload(name, self._busy_adapter_slots())

    def _busy_adapter_slots(self) -> set[int]:
        return {r.adapter_slot for r in (*self.scheduler.running, *self.scheduler.waiting)
                if r.adapter_slot is not None}

    def _add_head_request(self, request_id: str, inp: EncoderInput, params: PoolingParams,
                          adapter: AdapterRequest | None) -> None:
        """A decoder's classification: the prompt runs as a generation request would (KV blocks, chunked
        prefill, the prefix cache) and its last token's hidden state goes through the adapter's head."""
        binding = self._adapter(adapter)
        if params.task != "classify" or binding is None or self.adapters.head(binding.slot) is None:
            raise InvalidRequestError(f"model {self.loaded.name} is generative: {params.task} on it needs a "
                                      f"classification-head adapter (a PEFT SEQ_CLS adapter, e.g. from "
                                      f"`tokenloom train --method head`)", "model")
        ids = inp.token_ids if isinstance(inp, EncoderInput) else list(inp)
        request, = self.inputs.requests(request_id, ids, SamplingParams(max_tokens=1, temperature=0.0), False,
                                        binding)
        request.head_only, request.pooling_params = True, params
        self._pooling[request_id] = request
        self.scheduler.add(request)

    def _add_pooling(self, request_id: str, inp: EncoderInput, params: PoolingParams,
                     adapter: AdapterRequest | None = None) -> None:
        slot = self.load_adapter(adapter) if adapter is not None else None
        if slot is None or not (params.task == "classify" and self.adapters.head(slot) is not None):
            self.require(params.task)
        if not isinstance(inp, EncoderInput):
            raise InvalidRequestError("a pooling request takes an EncoderInput (engine.tokenize / from_token_ids)")
        virtual = self.adapters.num_virtual_tokens(slot) if slot is not None else 0
        ids, types = inp.token_ids, inp.token_type_ids
        if virtual:  # a prompt-learning adapter's virtual tokens go first, token type 0 (as PEFT's)
            limit = self.loaded.model.max_input_len
            if virtual + len(ids) > limit:
                raise InvalidRequestError(f"input has {len(ids)} tokens; with adapter {adapter.name!r}'s "
                                          f"{virtual} virtual tokens that is more than the model's limit of {limit}")
            ids = [PLACEHOLDER_TOKEN] * virtual + ids
            types = None if types is None else [0] * virtual + types
        request = Request(request_id, ids, None, pooling_params=params, token_type_ids=types, adapter_slot=slot,
                          num_virtual_tokens=virtual)
        self._pooling[request_id] = request
        self.scheduler.add(request)

    def encode(self, inputs: list[EncoderInput], task: str, pooling: PoolingConfig | None = None,
               adapter: AdapterRequest | None = None) -> list[PoolingResult]:
        """Pool every input for `task` (with `adapter`'s LoRA and head, if given) and return the results in
        input order (each may carry an error). Inputs go in longest first, so each batch holds inputs of
        similar length (little padding)."""
        if adapter is None:
            self.require(task)
        base = f"encode{next(self._run_ids)}-"
        ids = [f"{base}{i}" for i in range(len(inputs))]
        for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i].token_ids)):
            self.add_request(ids[i], inputs[i], PoolingParams(task, pooling), adapter=adapter)
        results = {r.request_id: r for r in self.run(ids)}
        return [results[rid] for rid in ids]

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests (by user request id) and free their blocks."""
        aborted = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            pooled = self._pooling.pop(rid, None)
            if pooled is not None:
                self.scheduler.finish(pooled, RequestStatus.FINISHED_ABORTED)
            parent = self.outputs.parents.get(rid)
            for child in parent.children if parent else []:
                self.scheduler.finish(child.request, RequestStatus.FINISHED_ABORTED)
                aborted.append(child.request.request_id)
            if parent:
                self.outputs.forget(parent)
        self.runner.release(aborted)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def run(self, request_ids: list[str]) -> Iterator[RequestOutput | PoolingResult]:
        """Step until each of `request_ids` (added already) has finished, yielding their outputs as they come
        (other requests in the engine run along); the ones left unfinished when the caller stops early or
        an error escapes are aborted. The one "run until done" loop of the offline paths."""
        pending = set(request_ids)
        try:
            while pending and self.has_unfinished_requests():
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            self.abort_request(list(pending))

    def step(self) -> list[RequestOutput | PoolingResult]:
        """Run one engine iteration and return the outputs it produced."""
        self._threads.ensure()
        sched = self.scheduler.schedule()
        try:
            failed = self._failed_outputs(sched.failed) if sched.failed else []
            return failed + self._step(sched)
        finally:  # requests finished or preempted in this step no longer need their runner state
            self.runner.release(sched.released_req_ids)
            if self.runner.freed_memory is not None:
                self.runner.freed_memory.after_step(not self.scheduler.has_unfinished())

    def _step(self, sched: SchedulerOutput) -> list[RequestOutput | PoolingResult]:
        if not sched.requests:
            return []
        if self.speculator is not None:  # a draft model's guesses, for the slots the scheduler reserved
            self.speculator.fill(sched)
        try:
            result = self.runner.execute(sched)
        except Exception:  # the loop must survive: find the request that fails, keep the others
            logger.exception("model execution failed; retrying the batch's requests one by one")
            result, failed = self._execute_isolated(sched)
            outputs = self._fail(failed, sched)
            if not sched.requests:
                return outputs
        else:
            outputs = []
        if result.pooled and self.loaded.kind == "encoder":
            self.scheduler.update(sched, {})
            return outputs + [PoolingResult(r.request_id, result.pooled[r.request_id], r.num_real_prompt_tokens)
                              for r in sched.requests if self._pooling.pop(r.request_id, None) is not None]
        for request in sched.requests:
            plp = result.prompt_logprobs.get(request.request_id)
            if plp is not None:
                self.outputs.on_prompt_logprobs(request, plp)

        def text_stop(request: Request, token: int, ends: bool) -> str | None:
            logprobs = result.logprobs.get(request.request_id)  # one per new token, in order
            return self.outputs.on_token(request, token, logprobs.pop(0) if logprobs else None, ends)

        self.scheduler.update(sched, result.sampled, text_stop)
        for request in sched.requests if result.pooled else ():  # decoder classifications end with their head
            logits = result.pooled.get(request.request_id)
            if logits is not None and self._pooling.pop(request.request_id, None) is not None:
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED, None, sched)
                outputs.append(PoolingResult(request.request_id, logits, request.num_real_prompt_tokens))
        return outputs + self._emit([r for r in sched.requests if r.request_id in result.sampled])

    def _execute_isolated(self, sched: SchedulerOutput) -> tuple[RunnerOutput, list[tuple[Request, Exception]]]:
        """Run each scheduled request alone (KV writes of the failed batch are simply redone); the failed
        ones leave `sched`."""
        merged, failed, ok = RunnerOutput(), [], []
        for request, n in zip(sched.requests, sched.num_tokens):
            try:
                drafts = {request.request_id: sched.drafts[request.request_id]} \
                    if request.request_id in sched.drafts else {}
                part = self.runner.execute(SchedulerOutput([request], [n], drafts=drafts))
            except Exception as exc:
                failed.append((request, exc))
                continue
            ok.append((request, n))
            merged.update(part)
        sched.requests, sched.num_tokens = [r for r, _ in ok], [n for _, n in ok]
        return merged, failed

    def _emit(self, changed: list[Request]) -> list[RequestOutput]:
        outputs = []
        for request in changed:
            if request.request_id not in self.outputs.child_to_parent:
                continue
            out = self.outputs.make_output(request)
            if out is not None:
                outputs.append(out)
        return outputs

    def _fail(self, failed: list[tuple[Request, Exception]], sched: SchedulerOutput
              ) -> list[RequestOutput | PoolingResult]:
        for request, exc in failed:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, f"error: {type(exc).__name__}: {exc}", sched)
        return self._failed_outputs([request for request, _ in failed])

    def _failed_outputs(self, failed: list[Request]) -> list[RequestOutput | PoolingResult]:
        """The final outputs of requests that ended with an error (their stop_reason holds it)."""
        outputs: list[RequestOutput | PoolingResult] = []
        for request in failed:
            if self._pooling.pop(request.request_id, None) is not None:
                error = str(request.stop_reason).removeprefix("error: ")
                outputs.append(PoolingResult(request.request_id, None, request.num_real_prompt_tokens, error))
        return outputs + self._emit([request for request in failed if not request.is_pooling])

    def memory_bytes(self) -> int:
        """Bytes this engine holds: the model's weights and the KV cache tensors."""
        adapters = self.adapters.memory_bytes() if self.adapters is not None else 0
        drafter = self.speculator.drafter if self.speculator is not None else None
        draft = drafter.loaded.weight_bytes + drafter.kv_cache_bytes() if drafter is not None else 0
        return self.loaded.weight_bytes + self.runner.kv_cache_bytes() + adapters + draft  # encoders: no KV cache

    def stats(self) -> EngineStats:
        """Current queue sizes, cache usage and prefix-cache counters."""
        s = self.kv.stats
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.usage,
                           self.kv.num_blocks, s.queries, s.hits, self.scheduler.num_preemptions,
                           dataclasses.replace(self.speculator.stats) if self.speculator is not None else None)
