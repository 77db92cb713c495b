"""One tokenizer interface over HF tokenizer folders and GGUF-embedded vocabularies.

Both sources end up as a `transformers` fast tokenizer (transformers supplies tokenizers at run
time; it never runs our models). This wrapper fixes the handful of calls the engine makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Chat templates for architectures whose GGUF files often ship without one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
FALLBACK_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE, "gemma2": GEMMA_CHAT_TEMPLATE,
                           "gemma3_text": GEMMA_CHAT_TEMPLATE}


class TokenizerError(ValueError):
    """The tokenizer cannot do what was asked (no chat template, bad message list, …)."""


# Entries of a BPE tokenizer's cache of encoded words. Its default (10,000) is a leak in a server: where the
# pre-tokenizer does not split at spaces (SentencePiece-style vocabularies, gemma's) the "word" is a whole
# prompt, so every distinct prompt adds an entry of a few KB to a cache that only fills (docs/reliability.md).
BPE_CACHE_ENTRIES = 1024


class Tokenizer:
    """Encode, decode and chat-format text for one model."""

    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None,
                 extra_eos_token_ids: Sequence[int] = ()) -> None:
        self.hf = hf_tokenizer
        model = getattr(getattr(hf_tokenizer, "_tokenizer", None), "model", None)
        if hasattr(model, "_resize_cache"):
            model._resize_cache(BPE_CACHE_ENTRIES)
        self.chat_template = chat_template or getattr(hf_tokenizer, "chat_template", None)
        eos = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
        self.eos_token_ids: set[int] = eos | set(extra_eos_token_ids)
        self.all_special_ids: set[int] = set(hf_tokenizer.all_special_ids)
        self.vocab_size: int = len(hf_tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own end-of-sequence id."""
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, if the model has one."""
        return self.hf.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids (with BOS when the model adds it)."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids to text."""
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Token ids to their vocabulary strings."""
        return self.hf.convert_ids_to_tokens(list(token_ids))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        template = chat_template or self.chat_template
        if template is None:
            raise TokenizerError("this model has no chat template; pass chat_template=... or use generate()")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        return self.hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)
