"""In front of the engine: prompts (text, token ids, chat messages) and parameters → validated requests with
token ids. The one owner of tokenization, chat-template rendering, the length and vocabulary rules, and
the n > 1 fan-out; `LLM`, the CLI, the server, pipelines and beam search all go through it.

The length rule has one implementation and two policies: `fit(..., strict=False)` (the offline API's)
gives a request at most the room its prompt leaves; `strict=True` (the OpenAI server's and beam search's)
refuses a max_tokens that does not fit. A prompt that leaves no room is refused either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.adapters.virtual import PLACEHOLDER_TOKEN
from tokenloom.engine.pooling import EncoderTokenizer
from tokenloom.engine.request import InvalidRequestError, Request
from tokenloom.loader import LoadedModel
from tokenloom.loader.tokenizer import Tokenizer
from tokenloom.plugins import build_logits_processors
from tokenloom.sampling_params import SamplingParams

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdapterBinding:
    """A loaded adapter as requests carry it: its name, its slot and its virtual tokens (0 for a LoRA)."""

    name: str
    slot: int
    num_virtual_tokens: int = 0


def chat_token_ids(tokenizer: Tokenizer, messages: list[Message], chat_template: str | None = None,
                   add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """A conversation's prompt ids: the chat template's text (with the tools offered, for templates that
    render them), tokenized without adding special tokens again (the template writes them)."""
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template, **extra)
    return tokenizer.encode(text, add_special_tokens=False)


class InputProcessor:
    """Validated engine requests from prompts and parameters, for one loaded model (its tokenizer, context
    length, vocabulary and kind). Safe to call from any thread except for `tokenizer` calls, which the
    caller serialises (the server keeps its own tokenizer copy)."""

    def __init__(self, loaded: LoadedModel, max_model_len: int, device: torch.device,
                 encoder_inputs: EncoderTokenizer | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_model_len = max_model_len
        self.device = device
        # Token ids index the model's embedding; a tokenizer may know fewer (or more) ids.
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.encoder_inputs = encoder_inputs  # an encoder-only model's tokenization (pooling requests)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)

    # ---- token ids ----

    def token_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (a text is tokenized), checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt token id list is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        return ids

    def chat_token_ids(self, messages: list[Message], chat_template: str | None = None,
                       add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """A conversation's prompt ids through the chat template (with `tools` offered, in OpenAI's shape)."""
        return chat_token_ids(self.tokenizer, messages, chat_template, add_generation_prompt, tools)

    # ---- the length and vocabulary rules ----

    def decoder_prompt(self, token_ids: list[int]) -> list[int]:
        """The tokens the decoder starts from: the prompt itself, or, for an encoder–decoder model (whose
        encoder reads the prompt, up to the encoder's limit), the decoder start token alone."""
        if self.loaded.kind != "encoder-decoder":
            return token_ids
        limit = self.loaded.max_model_len
        if len(token_ids) > limit:
            raise InvalidRequestError(f"prompt has {len(token_ids)} tokens, but the encoder takes at most {limit}",
                                      "prompt")
        return [self.loaded.model.decoder_start_token_id]

    def fit(self, num_prompt_tokens: int, max_tokens: int | None, strict: bool = False,
            field: str = "max_tokens") -> int:
        """The request's effective max_tokens: at most the room its (decoder) prompt leaves in the context,
        or, with `strict`, an InvalidRequestError naming `field` when max_tokens asks for more. A prompt that
        leaves no room is refused whatever the policy (the error names `prompt`)."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidRequestError(f"prompt has {num_prompt_tokens} tokens, but the context length is {limit}: at "
                                      f"most {limit - 1} prompt tokens fit", "prompt")
        room = limit - num_prompt_tokens
        if max_tokens is None:
            return room
        if strict and max_tokens > room:
            raise InvalidRequestError(f"{num_prompt_tokens} prompt tokens plus {field}={max_tokens} exceed the "
                                      f"context length {limit} ({num_prompt_tokens + max_tokens} tokens requested); "
                                      f"reduce the prompt or {field}", field)
        return min(max_tokens, room)

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None, strict: bool = False,
                     field: str = "max_tokens") -> int:
        """`fit` for a prompt's ids as the model reads them (an encoder–decoder's decoder starts from one
        token); returns the effective max_tokens."""
        return self.fit(len(self.decoder_prompt(prompt_ids)), max_tokens, strict, field)

    # ---- requests ----

    def requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams, strict: bool = False,
                 adapter: AdapterBinding | None = None) -> list[Request]:
        """The engine requests of one user request: `params.n` children sharing the prompt (ids `i_{id}`
        when n > 1), each with its own seeded generator (seed + i) and logits processor objects; `adapter`
        runs them with a loaded adapter, whose name also salts their prefix-cache hashes and whose virtual
        tokens (a soft prompt's or a prefix's) go first, counted in the context."""
        prompt_ids = self.token_ids(prompt_ids)
        virtual = adapter.num_virtual_tokens if adapter is not None else 0
        decoder_ids = [PLACEHOLDER_TOKEN] * virtual + self.decoder_prompt(prompt_ids)
        max_tokens = self.fit(len(decoder_ids), params.max_tokens, strict)
        params.validate_vocab(self.vocab_size)
        encoder_ids = prompt_ids if self.loaded.kind == "encoder-decoder" else None
        salt = None if encoder_ids is None else hash(tuple(encoder_ids))
        if adapter is not None:
            salt = hash(("adapter", adapter.name, salt))
        child_params = dataclasses.replace(params, n=1) if params.n > 1 else params
        children = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                seed = params.seed + i  # a 64-bit generator's seed: past 2**64 - 1 it wraps round
                generator = torch.Generator(device=self.device).manual_seed(seed - 2**64 if seed >= 2**64 else seed)
            children.append(Request(f"{i}_{request_id}" if params.n > 1 else request_id, list(decoder_ids),
                                    child_params, self.eos_token_ids, max_tokens, generator=generator,
                                    logits_processors=build_logits_processors(params.logits_processors),
                                    encoder_token_ids=encoder_ids, cache_salt=salt,
                                    adapter_slot=None if adapter is None else adapter.slot,
                                    num_virtual_tokens=virtual))
        return children
