"""Tool-call formats: how a model writes function calls, parsed from its text (whole, or streamed delta by delta)
into OpenAI's `tool_calls`, and the grammar that makes `tool_choice: required` or a named function write only
valid calls.

Built in (`register_tool_parser` adds others; plugins through `PluginRegistry.add_tool_parser`):
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Hermes and Qwen 2.5 / 3 write it;
- `llama3_json`: `{"name": ..., "parameters": {...}}` (`;` between calls, `<|python_tag|>` allowed first);
- `json`: a JSON array `[{"name": ..., "arguments": {...}}, ...]`, for models whose chat template knows no tools
  (the tools are then described to the model in a system message).

Streaming re-reads the text so far on every delta and sends only what is new: content outside calls (a
trailing piece that may open a call is held back until it is clear), then per call its id and name once the
name is complete, then its arguments as they grow. The arguments text is sent as the model wrote it, so the
fragments join to the final `arguments` string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

# llguidance's JSON options inside a grammar: compact, as the JSON constraints are (free whitespace lets a
# small model spend its tokens on it)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class ToolCall:
    """One call: OpenAI's id, the function's name and its arguments (JSON text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(slots=True)
class CallText:
    """A call as far as the model has written it: its name once complete, its arguments so far, and whether
    the arguments are complete."""

    name: str | None
    arguments: str
    complete: bool


class ToolCallParser:
    """A tool-call format. Subclasses say how calls are delimited (`split`) and written (`call_grammar`)."""

    name = ""
    arguments_key = "arguments"

    def split(self, text: str) -> tuple[str, list[str], bool]:
        """`text` → (content outside calls, each call's text so far, whether the end of `text` may still open
        a call and is held back from the content)."""
        raise NotImplementedError

    def calls_grammar(self, call: str, parallel: bool) -> str:
        """A Lark grammar (llguidance's, with `%json`) of the output: calls, each matching rule `call`."""
        raise NotImplementedError

    def call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        """The JSON schema of one call of `tool` ({"name", "description", "parameters"}), name first."""
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": tool["name"]}, self.arguments_key: params},
                "required": ["name", self.arguments_key], "additionalProperties": False}

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """The grammar that lets the model write only valid calls of `tools`."""
        schema = {"anyOf": [self.call_schema(t) for t in tools], "x-guidance": COMPACT_JSON}
        return self.calls_grammar("call", parallel) + "\ncall: %json " + json.dumps(schema)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output → (content, or None when it only holds calls; complete calls)."""
        content, calls, _ = self.split(text)
        parsed = [c for c in (call_text(t, self.arguments_key) for t in calls) if c.complete and c.name]
        if not parsed:
            return content, []
        return content.strip() or None, [ToolCall(c.name, c.arguments) for c in parsed]


class HermesParser(ToolCallParser):
    """`<tool_call>{...}</tool_call>` (Hermes, Qwen)."""

    name = "hermes"
    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def split(self, text: str) -> tuple[str, list[str], bool]:
        """Content between the tags, calls inside them; a trailing partial `<tool_call>` is held back."""
        content, calls, pos = [], [], 0
        while True:
            start = text.find(self.open_tag, pos)
            if start < 0:
                rest = text[pos:]
                held = _partial_suffix(rest, self.open_tag)
                content.append(rest[:len(rest) - held])
                return "".join(content), calls, held > 0
            content.append(text[pos:start])
            end = text.find(self.close_tag, start)
            if end < 0:
                calls.append(text[start + len(self.open_tag):])
                return "".join(content), calls, False
            calls.append(text[start + len(self.open_tag):end])
            pos = end + len(self.close_tag)

    def calls_grammar(self, call: str, parallel: bool) -> str:
        """One `<tool_call>` block, or several on their own lines."""
        if parallel:
            return f'start: tc+\ntc: "<tool_call>\\n" {call} "\\n</tool_call>\\n"'
        return f'start: "<tool_call>\\n" {call} "\\n</tool_call>"'


class Llama3JsonParser(ToolCallParser):
    """`{"name": ..., "parameters": {...}}` (Llama 3.1+ JSON tool calls), several joined by `;`."""

    name = "llama3_json"
    arguments_key = "parameters"
    python_tag = "<|python_tag|>"

    def split(self, text: str) -> tuple[str, list[str], bool]:
        """All calls when the output starts with `{` (or the python tag); else all content."""
        body = text.lstrip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag):].lstrip()
            if not body:
                return "", [], True
        elif self.python_tag.startswith(body):  # empty, or may still become the tag
            return "", [], True
        if not body.startswith("{"):
            return text, [], False
        return "", _top_level(body, ";"), False

    def calls_grammar(self, call: str, parallel: bool) -> str:
        """Calls joined by `; `."""
        return f'start: {call}' + (f' ("; " {call})*' if parallel else "")


class JsonParser(ToolCallParser):
    """A JSON array of `{"name": ..., "arguments": {...}}` (models whose template knows no tools)."""

    name = "json"

    def split(self, text: str) -> tuple[str, list[str], bool]:
        """Calls when the output is a JSON array; else content."""
        body = text.lstrip()
        if not body:
            return "", [], bool(text)
        if not body.startswith("["):
            return text, [], False
        inner = body[1:]
        return "", [c for c in _top_level(inner, ",") if c.strip() and c.strip() != "]"], False

    def calls_grammar(self, call: str, parallel: bool) -> str:
        """`[call, call, ...]` (one call unless parallel)."""
        return f'start: "[" {call}' + (f' (", " {call})*' if parallel else "") + ' "]"'


def call_text(text: str, arguments_key: str = "arguments") -> CallText:
    """A call's JSON text (maybe unfinished) → its name (once complete) and arguments so far."""
    key = re.search(rf'"(?:{arguments_key}|arguments|parameters)"\s*:\s*', text)
    if key is None:
        name = _NAME.search(text)
        return CallText(_string(name[1]) if name else None, "", False)
    start = key.end()
    end = _value_end(text, start)
    arguments = text[start:end] if end is not None else text[start:].rstrip()
    # the name outside the arguments (they may hold a "name" of their own)
    name = _NAME.search(text, 0, key.start()) or (_NAME.search(text, end) if end is not None else None)
    return CallText(_string(name[1]) if name else None, arguments, end is not None)


def _string(escaped: str) -> str:
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:
        return escaped


def _structure(text: str, start: int = 0):  # noqa: ANN202 - a generator of (index, char, depth)
    """Each character of `text` from `start` that is outside JSON strings, with the bracket depth after it."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_string = True
            continue
        depth += (ch in "{[") - (ch in "}]")
        yield i, ch, depth


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at `start` ends (exclusive), None if it does not yet."""
    return next((i + 1 for i, ch, depth in _structure(text, start) if ch in "}]" and depth == 0), None)


def _top_level(text: str, separator: str) -> list[str]:
    """`text` cut at `separator`s outside strings, objects and arrays."""
    parts, last = [], 0
    for i, ch, depth in _structure(text):
        if ch == separator and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return [p for p in parts if p.strip()]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of call `index`: its id and name (first), or a fragment of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolCallStreamer:
    """Turns a growing output into content deltas and tool-call deltas (see the module docstring)."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.text = ""
        self._content_sent = 0
        self._calls: list[tuple[str, int]] = []  # per call sent: its id, arguments characters sent

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Add the model's next text; returns the new content and the new call pieces. `final`: the output
        ended (anything held back is content after all)."""
        self.text += delta
        content, calls, held = self.parser.split(self.text)
        if final and held and not calls:
            content = self.text
        new_content = content[self._content_sent:]
        self._content_sent = len(content)
        out = []
        for index, text in enumerate(calls):
            call = call_text(text, self.parser.arguments_key)
            if call.name is None:
                break
            if index == len(self._calls):
                self._calls.append((ToolCall(call.name, "").id, 0))
                out.append(ToolCallDelta(index, self._calls[index][0], call.name))
            call_id, sent = self._calls[index]
            if len(call.arguments) > sent:
                out.append(ToolCallDelta(index, arguments=call.arguments[sent:]))
                self._calls[index] = (call_id, len(call.arguments))
        return new_content, out

    @property
    def num_calls(self) -> int:
        """Calls started so far."""
        return len(self._calls)

    def call_ids(self) -> list[str]:
        """The ids given to the calls, in order."""
        return [call_id for call_id, _ in self._calls]


_PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, JsonParser)}


def register_tool_parser(name: str, parser: type[ToolCallParser]) -> None:
    """Make a tool-call format available by name (`--tool-call-parser NAME`)."""
    if not name or not (isinstance(parser, type) and issubclass(parser, ToolCallParser)):
        raise ValueError(f"a tool-call parser needs a name and a ToolCallParser subclass; got {name!r}, {parser!r}")
    _PARSERS[name] = parser


def unregister_tool_parser(name: str) -> None:
    """Remove a registered format (plugins' undo)."""
    _PARSERS.pop(name, None)


def tool_parser(name: str) -> ToolCallParser:
    """The format registered as `name`; ValueError lists the known ones."""
    if name not in _PARSERS:
        raise ValueError(f"tool-call parser {name!r} is not registered; known: {', '.join(sorted(_PARSERS))}")
    return _PARSERS[name]()


def parser_for_template(template: str | None) -> str:
    """The format a chat template writes calls in: hermes when it mentions <tool_call>, llama3_json with the
    python tag, else json (with the tools described in a system message)."""
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "json"
