"""The models a server holds: each loaded model is a `ServedModel` (an async engine, a tokenizer pool and
its defaults) owned by the `ModelManager`; requests lease one for as long as they run.

A lease is what keeps a model loaded: the manager never unloads a model with a lease out, and a lease
ends when its response ends (a streamed one when its last event is sent or the client goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tokenloom.adapters import AdapterRequest
from tokenloom.config import EngineConfig
from tokenloom.engine.async_engine import AsyncEngine, ServerBusyError
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.request import InvalidRequestError
from tokenloom.manager import ModelManager, ModelSpec, engine_bytes
from tokenloom.models.registry import ModelKind
from tokenloom.server.errors import APIError
from tokenloom.server.tokenization import TokenizerPool


@dataclass(slots=True)
class ServedModel:
    """One loaded model as the HTTP side sees it: its engine behind an `AsyncEngine` (generation, or an
    encoder-only model's pooling), its tokenizer pool and its sampling defaults."""

    name: str
    engine: AsyncEngine
    tokenizer: TokenizerPool
    default_sampling: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def inner(self) -> LLMEngine:
        """The synchronous engine behind the async front."""
        return self.engine.engine

    @property
    def kind(self) -> ModelKind:
        """decoder, encoder-decoder or encoder."""
        return self.inner.loaded.kind

    @property
    def hf_config(self) -> Any:
        """The checkpoint's transformers config (labels, hidden size, ...), read-only."""
        return self.inner.loaded.hf_config

    @property
    def max_model_len(self) -> int:
        """The context length (the longest input, for an encoder)."""
        return self.inner.max_model_len

    @property
    def vocab_size(self) -> int:
        """The vocabulary size."""
        return self.inner.vocab_size

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """generate and chat, or what the encoder's head allows (embed, classify, score, ...)."""
        return self.inner.supported_tasks

    @property
    def is_alive(self) -> bool:
        """True while the background engine thread runs."""
        return self.engine.is_alive

    def generator(self) -> AsyncEngine:
        """The async engine of a generative model; 400 naming what an encoder model supports instead."""
        if self.kind == "encoder":
            routes = [route for task, route in (("embed", "POST /v1/embeddings"), ("classify", "POST /classify"))
                      if task in self.supported_tasks]
            where = f" ({', '.join(routes)})" if routes else ""
            raise APIError(400, f"model '{self.name}' is an encoder-only model: it supports "
                                f"{', '.join(self.supported_tasks)}{where}, not text generation", param="model",
                           code="unsupported_task")
        return self.engine

    def pooler(self, task: str) -> AsyncEngine:
        """The async engine of an encoder model that can do `task`; 400 naming what the model supports."""
        if task not in self.supported_tasks:
            what = "an encoder-only model" if self.kind == "encoder" else "a generative model"
            raise APIError(400, f"model '{self.name}' is {what}: it supports {', '.join(self.supported_tasks)}, "
                                f"not {task}", param="model", code="unsupported_task")
        return self.engine

    def sampling_default(self, req: BaseModel, name: str, value: Any) -> Any:
        """A request field's value, or this model's default for it when the request left it out."""
        if name in req.model_fields_set and value is not None:
            return value
        return self.default_sampling.get(name, value)

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None, param: str,
                     prompt_param: str = "prompt") -> None:
        """400 when the prompt's ids are out of the vocabulary (naming `prompt_param`: prompt, or a chat's
        messages), or the prompt, or the prompt plus max_tokens (named `param`), does not fit the context:
        the engine's input processor's rules, strictly (OpenAI refuses what the offline API shortens)."""
        inputs = self.inner.inputs
        try:
            inputs.token_ids(prompt_ids)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from exc
        try:
            inputs.check_prompt(prompt_ids, max_tokens, strict=True, field=param)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=param if exc.field == param else prompt_param,
                           code="context_length_exceeded") from exc

    def close(self) -> None:
        """Abort what is left and stop the engine thread (the manager calls this when it unloads the model)."""
        self.engine.shutdown()
        self.tokenizer.close()


def served_model_factory(max_waiting: int, on_load: Callable[[ServedModel], None] | None = None
                         ) -> Callable[[ModelSpec], ServedModel]:
    """What the manager builds per model in a server: the engine, its background loop and a tokenizer pool
    (with the spec's chat template override); `on_load` sees each new model (metrics attach there)."""

    def build(spec: ModelSpec) -> ServedModel:
        engine = LLMEngine(EngineConfig.from_kwargs(model=spec.source, **spec.engine_options))
        tokenizer = TokenizerPool(engine.tokenizer, chat_template=spec.chat_template)
        served = ServedModel(spec.name, AsyncEngine(engine, max_waiting=max_waiting), tokenizer,
                             dict(spec.default_sampling))
        if on_load is not None:
            on_load(served)
        return served

    return build


def served_bytes(model: ServedModel) -> int:
    """Weights plus KV cache of a served model."""
    return engine_bytes(model.inner)


@dataclass(slots=True)
class ModelLease:
    """A request's hold on a loaded model; `release` ends it (once, however often it is called). `name` is
    the model the request named (an adapter's name, or the model's), `adapter` the adapter it runs with."""

    model: ServedModel
    _release: Callable[[], None]
    _released: bool = False
    handed_over: bool = False
    name: str = ""
    adapter: AdapterRequest | None = None

    async def release(self) -> None:
        """Give the model back (an unload it allows happens off the event loop)."""
        if not self._released:
            self._released = True
            await asyncio.get_running_loop().run_in_executor(None, self._release)

    def hand_over(self) -> Callable[[], Awaitable[None]]:
        """Pass the lease to a streamed response: the `using` block no longer ends it; the returned
        callable, run when the response closes, does."""
        self.handed_over = True
        return self.release


class ModelLeases:
    """Hands out leases on the manager's models to requests, refuses new ones while the server drains."""

    def __init__(self, manager: ModelManager, default_model: str | None,
                 adapters: dict[str, AdapterRequest] | None = None) -> None:
        self.manager = manager
        self.default_model = default_model
        self.adapters = dict(adapters or {})  # adapters of the default model, by the name requests use
        self.adapters_enabled = adapters is not None and default_model is not None
        self.draining = False

    def resolve(self, model: str | None) -> str:
        """The name a request's `model` field refers to: 400 when it is missing and there is no default,
        404 naming the available models when nobody knows it."""
        if model in self.adapters and self.default_model is not None:
            return self.default_model
        names = self.manager.names()
        if model is None:
            if self.default_model is None:
                raise APIError(400, f"this server serves several models: name one in 'model' "
                                    f"(available: {', '.join(names)})", param="model", code="missing_model")
            return self.default_model
        if model not in names:
            raise APIError(404, f"the model '{model}' does not exist; available models: "
                                f"{', '.join([*names, *self.adapters])}",
                           param="model", code="model_not_found")
        return model

    async def lease(self, model: str | None, keep_alive_s: float | None = None) -> ModelLease:
        """Lease the named model, loading it first if needed (off the event loop; one load however many
        requests wait for it)."""
        if self.draining:
            raise ServerBusyError("the server is shutting down and takes no new requests")
        name = self.resolve(model)
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self.manager.acquire, name, keep_alive_s)
        try:
            served = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The load goes on without us: give its hold back when it lands, or the model never unloads.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception() or
                                      loop.run_in_executor(None, self.manager.release, name))
            raise
        adapter = self.adapters.get(model) if model is not None else None
        return ModelLease(served, lambda: self.manager.release(name), name=model if adapter else name,
                          adapter=adapter)

    @contextlib.asynccontextmanager
    async def using(self, model: str | None, keep_alive_s: float | None = None) -> AsyncIterator[ModelLease]:
        """A lease for the block, released at its end unless handed over to a streamed response."""
        lease = await self.lease(model, keep_alive_s)
        try:
            yield lease
        finally:
            if not lease.handed_over:
                await lease.release()

    def begin_drain(self, timeout: float) -> None:
        """Refuse new leases; every loaded model's requests get `timeout` seconds to finish."""
        self.draining = True
        for served in self.manager.loaded().values():
            served.engine.begin_drain(timeout)

    def num_in_flight(self) -> int:
        """Generation requests in flight over every loaded model."""
        return sum(served.engine.num_in_flight() for served in self.manager.loaded().values())
