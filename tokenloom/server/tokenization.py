"""Tokenizer work for the HTTP side, off the event loop and off the engine thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
from collections.abc import Callable
from typing import Any

from tokenloom import faults
from tokenloom.engine.input_processor import chat_token_ids
from tokenloom.loader.tokenizer import Tokenizer


class TokenizerPool:
    """A private copy of the model's tokenizer behind one worker thread.

    The engine thread keeps decoding with its own tokenizer; HF fast tokenizers are not meant to be
    used by two threads at once, and a single worker keeps this copy's calls in order. `chat_template`
    overrides the model's own (a catalog's per-model template).
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenloom-tokenizer")

    def close(self) -> None:
        """Stop the worker thread (calls already queued still run)."""
        self._pool.shutdown(wait=False)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text."""
        faults.hit("tokenize", text=text)
        return await self._run(self.tokenizer.encode, text, add_special_tokens)

    async def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation (and the tools offered) through the chat template, exactly as `LLM.chat`
        builds them."""
        faults.hit("tokenize", text="\n".join(str(m.get("content", "")) for m in messages))
        return await self._run(chat_token_ids, self.tokenizer, messages, None, add_generation_prompt, tools)

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return await self._run(self.tokenizer.decode, token_ids, skip_special_tokens)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
