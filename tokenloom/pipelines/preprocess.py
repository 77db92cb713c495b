"""Preprocessors: normalize text, render a prompt template or the model's chat template, chunk long
inputs, tokenize. Each works on one item at a time (a failure stays in its item)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from tokenloom.pipelines.base import Item, ItemStep, PipelineContext, PipelineError
from tokenloom.pipelines.templates import compile_template, read_template

_SPACES = re.compile(r"\s+")
_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


@dataclass
class Normalize(ItemStep):
    """Unicode-normalize (NFC by default) and clean the item's text fields (all string fields unless
    `fields` names them)."""

    fields: list[str] | None = None
    form: str | None = "NFC"
    strip: bool = True
    collapse_whitespace: bool = False
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in _FORMS:
            raise PipelineError(f"must be one of {', '.join(_FORMS)} or null; got {self.form!r}", "form")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Normalize the chosen string fields in place."""
        for key in self.fields if self.fields is not None else list(item):
            value = item.get(key)
            if isinstance(value, str):
                item[key] = self.clean(value)

    def clean(self, text: str) -> str:
        """One string, normalized."""
        if self.form:
            text = unicodedata.normalize(self.form, text)
        if self.collapse_whitespace:
            text = _SPACES.sub(" ", text)
        if self.strip:
            text = text.strip()
        return text.lower() if self.lowercase else text


@dataclass
class Prompt(ItemStep):
    """Render a Jinja prompt template over the item's fields, few-shot `examples` and extra `variables`
    into `item["prompt"]` (one prompt per chunk when a chunk step ran). With `chat: true` the rendered
    text becomes a user message (after `system`, if given) through the model's chat template."""

    template: str | None = None
    template_file: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        self.source = read_template(self.template, self.template_file)
        self.compiled = compile_template(self.source)
        if not isinstance(self.examples, list) or not all(isinstance(e, dict) for e in self.examples):
            raise PipelineError("must be a list of mappings (one per example)", "examples")
        if not isinstance(self.variables, dict):
            raise PipelineError("must be a mapping of template variables", "variables")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Render the item's prompt (or its chunks' prompts)."""
        base = {**self.variables, "examples": self.examples, **item}
        if "chunks" in item:
            texts = [self.compiled.render({**base, "text": chunk}) for chunk in item["chunks"]]
        else:
            texts = self.compiled.render(base)
        if self.chat:
            chats = [self.as_chat(t, ctx) for t in ([texts] if isinstance(texts, str) else texts)]
            item["prompt_token_ids"] = chats[0] if isinstance(texts, str) else chats
        item["prompt"] = texts

    def as_chat(self, text: str, ctx: PipelineContext) -> list[int]:
        """Token ids of `text` as one user turn through the model's chat template."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return chat_token_ids(ctx, messages)


@dataclass
class ChatTemplate(ItemStep):
    """The item's conversation (`messages`, or its `text` as one user message) through the model's chat
    template (or `chat_template`), as `LLM.chat` renders it, into `item["prompt_token_ids"]`."""

    system: str | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Render and tokenize the conversation."""
        messages = item.get("messages")
        if messages is None:
            if not isinstance(item.get("text"), str):
                raise PipelineError("a chat item needs `messages` (a list of {role, content}) or `text`")
            messages = [{"role": "user", "content": item["text"]}]
        if self.system and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": self.system}, *messages]
        item["prompt_token_ids"] = chat_token_ids(ctx, messages, self.chat_template, self.add_generation_prompt)


def chat_token_ids(ctx: PipelineContext, messages: list[dict[str, Any]], template: str | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
    """A conversation's prompt ids, rendered and tokenized as `LLM.chat` does (the template has the
    special tokens, so none are added)."""
    tok = ctx.llm.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, chat_template=template)
    return tok.encode(text, add_special_tokens=False)


@dataclass
class Chunk(ItemStep):
    """Split a long `field` into pieces of at most `max_tokens` tokens (consecutive pieces share
    `overlap` tokens) in `item["chunks"]`; the prompt step renders one prompt per piece and generate
    joins their outputs."""

    field: str = "text"
    max_tokens: int = 512
    overlap: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise PipelineError(f"must be an integer >= 1; got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.max_tokens:
            raise PipelineError(f"must be an integer in [0, max_tokens); got {self.overlap!r}", "overlap")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Cut the field at token boundaries."""
        text = item.get(self.field)
        if not isinstance(text, str):
            raise PipelineError(f"the item has no text field {self.field!r} to chunk")
        hf = ctx.llm.get_tokenizer().hf
        starts = [s for s, _ in hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        step = self.max_tokens - self.overlap
        pieces = []
        for first in range(0, max(len(starts) - self.overlap, 1), step):
            last = first + self.max_tokens
            pieces.append(text[starts[first] if first else 0: starts[last] if last < len(starts) else len(text)])
        item["chunks"] = pieces


@dataclass
class Tokenize(ItemStep):
    """Tokenize `item["prompt"]` (or each of its prompts) into `item["prompt_token_ids"]`, keeping at
    most `max_tokens` tokens (cut on the `truncation_side`) when given."""

    add_special_tokens: bool = True
    max_tokens: int | None = None
    truncation_side: str = "left"

    def __post_init__(self) -> None:
        if self.truncation_side not in ("left", "right"):
            raise PipelineError(f"must be left or right; got {self.truncation_side!r}", "truncation_side")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise PipelineError(f"must be an integer >= 1; got {self.max_tokens!r}", "max_tokens")

    def apply(self, item: Item, ctx: PipelineContext) -> None:
        """Encode the prompt(s)."""
        prompt = item.get("prompt", item.get("text"))
        if not isinstance(prompt, (str, list)):
            raise PipelineError("the item has no prompt or text to tokenize")
        tok = ctx.llm.get_tokenizer()
        encoded = [self.cut(tok.encode(p, add_special_tokens=self.add_special_tokens))
                   for p in ([prompt] if isinstance(prompt, str) else prompt)]
        item["prompt_token_ids"] = encoded[0] if isinstance(prompt, str) else encoded

    def cut(self, ids: list[int]) -> list[int]:
        """Keep at most max_tokens ids."""
        if self.max_tokens is None or len(ids) <= self.max_tokens:
            return ids
        return ids[-self.max_tokens:] if self.truncation_side == "left" else ids[:self.max_tokens]
