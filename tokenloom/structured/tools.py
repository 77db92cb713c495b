"""Tool calling: what a chat request's `tools`, `tool_choice` and `parallel_tool_calls` turn into.

- The format (tool_parsers.py) is the server's `--tool-call-parser`, or the one the chat template writes.
- `auto`: the tools go to the chat template; the reply is parsed for calls. `none`: no tools, no parsing.
- `required` or a named function: as `auto`, plus a grammar (llguidance, the tools' parameter schemas inside)
  so the reply is nothing but valid calls, of that function when named, one unless `parallel_tool_calls`.
- A template that knows no tools (no `tools` in it) is told about them in a system message, in the `json`
  format; past calls and tool results in the conversation are written as text it can render.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured.tool_parsers import ToolCallParser, parser_for_template, tool_parser


@dataclass(slots=True)
class ToolPlan:
    """How one chat request uses its tools."""

    parser: ToolCallParser
    tools: list[dict[str, Any]]  # {"name", "description", "parameters"} of the tools offered
    constraint: StructuredOutputsParams | None  # the calls grammar (required / named), else None
    template_knows_tools: bool

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools` for the chat template, in OpenAI's shape (None when it knows no tools)."""
        if not self.template_knows_tools:
            return None
        return [{"type": "function", "function": {k: v for k, v in t.items() if v is not None}} for t in self.tools]



def template_messages(messages: list[dict[str, Any]], template: str | None, plan: ToolPlan | None
                      ) -> list[dict[str, Any]]:
    """The conversation for the chat template: unchanged when the template knows tools; else past calls and
    tool results written as text and, when tools are offered (`plan`), described in a system message."""
    if "tools" in (template or ""):
        return messages
    out = [_as_text(m) for m in messages]
    if plan is None:
        return out
    note = describe_tools(plan.tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}"}
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def plan_tools(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None, parallel: bool,
               template: str | None, parser_name: str | None = None) -> ToolPlan | None:
    """The plan for a request's tools (None for `tool_choice: none` or no tools); ValueError names a bad
    choice."""
    if not tools or choice == "none":
        return None
    knows = "tools" in (template or "")
    parser = tool_parser(parser_name or (parser_for_template(template) if knows else "json"))
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must be unique; got {names}")
    choice = choice or "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise ValueError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                             '{"name": ...}}')
        chosen = [t for t in tools if t["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})")
        grammar = parser.grammar(chosen, parallel=False)
    elif choice in ("auto", "required"):
        grammar = parser.grammar(tools, parallel) if choice == "required" else None
    else:
        raise ValueError(f'tool_choice must be "auto", "none", "required" or a named function; got {choice!r}')
    constraint = StructuredOutputsParams(grammar=grammar) if grammar is not None else None
    return ToolPlan(parser, tools, constraint, knows)


_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def functions_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) → the
    functions offered, as `plan_tools` takes them; ValueError names a malformed entry (the offline API's check:
    the server's request model does the same)."""
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": '
                             f'{{...}}}}}} with a name of 1 to 64 letters, digits, _ or -')
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema (an object)")
        out.append({"name": name, "description": function.get("description"), "parameters": parameters})
    return out


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """The system message that offers `tools` to a model whose template knows none (the json format)."""
    lines = ["Functions you can call:"]
    for t in tools:
        entry = {"name": t["name"], "description": t.get("description"), "parameters": t.get("parameters")}
        lines.append(json.dumps({k: v for k, v in entry.items() if v}, separators=(",", ":")))
    lines.append('To call, reply with only a JSON array: [{"name": ..., "arguments": {...}}]. Else reply normally.')
    return "\n".join(lines)


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    """A tool call or a tool result as plain text for a template that knows no tools."""
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in message["tool_calls"]]
        text = (message.get("content") or "") + json.dumps(calls)
        return {"role": "assistant", "content": text}
    if message["role"] == "tool":
        return {"role": "user", "content": f"Function result (call {message.get('tool_call_id', '?')}): "
                                           f"{message.get('content', '')}"}
    return {k: v for k, v in message.items() if k in ("role", "content", "name")}


__all__ = ["ToolPlan", "describe_tools", "functions_of", "plan_tools", "template_messages"]
