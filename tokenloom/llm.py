"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenloom.adapters import AdapterRequest
from tokenloom.config import EngineConfig
from tokenloom.engine.beam_search import BeamSearchOutput, run_beam_search
from tokenloom.engine.llm_engine import InvalidRequestError, LLMEngine
from tokenloom.llm_pooling import PoolingTasks
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import BeamSearchParams, SamplingParams
from tokenloom.structured.tools import functions_of, plan_tools, template_messages

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM(PoolingTasks):
    """A model with its engine, for batch generation in one process.

    Keyword arguments are engine options (see `tokenloom.config`), e.g.
    `LLM("gemma-3-270m", dtype="float32", kv_cache_gib=2, max_num_seqs=64)`. Encoder-only models
    (BERT, RoBERTa, DistilBERT, e.g. `LLM("all-minilm-l6-v2")`) run pooling requests on the same engine
    and serve `embed`, `classify`, `score` and the other methods of `PoolingTasks` instead of `generate`.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is not None:
            engine_options["model"] = model
        self.engine = LLMEngine(EngineConfig.from_kwargs(**engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (tokenloom's wrapper)."""
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, adapter: AdapterRequest | Sequence[AdapterRequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs come
        back in input order. Every prompt is validated before any starts, so a bad one fails the
        call with its index named and no work is lost. `adapter` runs every prompt with one adapter (a LoRA,
        a soft prompt or a prefix), or each with its own (a list, None for the base model; needs
        `enable_adapters=True`)."""
        self._require_generative("generate")
        prompts = _as_list(prompts)
        params = _broadcast(sampling_params, len(prompts))
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise InvalidRequestError(f"got {len(adapters)} adapters for {len(prompts)} prompts", "adapter")
        ids = [str(next(self._ids)) for _ in prompts]
        for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
            try:
                self._add(rid, prompt, dataclasses.replace(p, output_kind="final"), adapters[i])
            except ValueError as exc:
                self.engine.abort_request(ids[:i])  # nothing has run yet: drop the ones already queued
                raise InvalidRequestError(f"prompt {i}: {exc}", getattr(exc, "field", None)) from exc
        return self._run(ids, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               adapter: AdapterRequest | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding incremental outputs (each with the new text and token ids of
        every choice) as the engine produces them; stopping the iteration aborts the request."""
        self._require_generative("stream")
        rid = str(next(self._ids))
        self._add(rid, prompt, dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta"), adapter)
        yield from self.engine.run([rid])

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams,
             adapter: AdapterRequest | None = None) -> None:
        """Queue one prompt (a text is tokenized here and echoed back; the engine checks the ids)."""
        ids_or_text = _prompt_ids_or_text(prompt)
        text = ids_or_text if isinstance(ids_or_text, str) else None
        ids = self.engine.inputs.token_ids(text) if text is not None else list(ids_or_text)
        self.engine.add_request(request_id, ids, params, prompt_text=text, adapter=adapter)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool = True,
             tool_call_parser: str | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template.

        With `tools` (OpenAI's shape: `[{"type": "function", "function": {"name", "description", "parameters"}}]`)
        the tools reach the model as the server offers them (the template's own tool format, else a system
        message), `tool_choice` ("auto", "none", "required" or `{"type": "function", "function": {"name": ...}}`)
        constrains the reply as the server does, and each output's `tool_calls` holds the calls parsed from its
        text (`tool_call_parser`: a registered format; by default the template's), `text` the raw reply."""
        self._require_generative("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        template = chat_template or self.engine.tokenizer.chat_template
        params = _broadcast(sampling_params, len(conversations))
        try:
            plan = plan_tools(functions_of(tools or []), tool_choice, parallel_tool_calls, template, tool_call_parser)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "tool_choice" if "tool_choice" in str(exc) else "tools") from exc
        if plan is not None and plan.constraint is not None:
            if any(p.structured_outputs is not None for p in params):
                raise InvalidRequestError("tool_choice required or a named function constrains the reply itself; "
                                          "it cannot be combined with structured_outputs", "tool_choice")
            params = [dataclasses.replace(p, structured_outputs=plan.constraint) for p in params]
        offered = plan.template_tools() if plan is not None else None
        prompts = [self.engine.inputs.chat_token_ids(template_messages(c, template, plan), chat_template,
                                                     add_generation_prompt, offered) for c in conversations]
        outputs = self.generate(prompts, params, use_tqdm)
        if plan is not None:
            for out in outputs:
                for choice in out.outputs:
                    choice.tool_calls = plan.parser.parse(choice.text)[1] or None
        return outputs

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    adapter: AdapterRequest | None = None) -> list[BeamSearchOutput]:
        """The `beam_width` best continuations of each prompt by length-penalised log-probability, with
        transformers' selection and stopping rules; all prompts' beams run together, sharing their prefix
        blocks through the prefix cache; under `adapter` (a LoRA, soft prompt or prefix), if given."""
        self._require_generative("beam_search")
        return run_beam_search(self.engine, [_prompt_ids_or_text(p) for p in _as_list(prompts)], params, adapter)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            for out in self.engine.run(ids):
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        return [results[rid] for rid in ids]


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _prompt_ids_or_text(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        return prompt["prompt"]
    return prompt


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} sampling_params for {n} prompts")
    return list(params)
