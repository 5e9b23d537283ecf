"""Structured output, between the protocol and the engine: a `generate`'s constraint or tools become
what the engine enforces (`Constraint`), and the text it produced becomes `result.json` or
`result.tool_calls`.

Tool calls. Where the model's chat template lays out function definitions itself, it is given
them (`tools=`) and the call is written the way that template expects (Hermes/Qwen `<tool_call>`
tags around the JSON, when the template uses them); elsewhere a system message describes them.
Either way the call is one JSON object `{"name": ..., "arguments": {...}}`, constrained to one of
the tools with arguments valid against its parameters. `auto` lets the model answer in text
instead (text may not start the way a call starts); `required` and a tool's name force a call;
`none` leaves the tools out of the prompt. One call per answer.

Torch-free: the service calls this on its intake threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge import messages as m

from .engines.text.constraints import JSON_OPTIONS, Constraint

__all__ = ["OutputPlan", "plan_output"]

_TOOLS_INTRO = ('To call one of these functions, answer with only {"name": ..., "arguments": {...}}:\n')


@dataclass(frozen=True)
class OutputPlan:
    """What one request's output must be, and how to read it back."""

    constraint: Constraint | None = None
    kind: str | None = None  # json_schema | regex | choices | grammar | tool_call
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI-style definitions, for templates that render them
    messages: list[dict[str, str]] | None = None  # the request's messages, with the tools described if needed
    tags: tuple[str, str] = ("", "")  # what surrounds a tool call's JSON
    tool_choice: str = "auto"

    def parse(self, text: str, satisfied: bool) -> tuple[Any, list[m.ToolCall]]:
        """`result.json` and `result.tool_calls` from the output text."""
        if not satisfied:
            return None, []
        if self.kind == "json_schema":
            return json.loads(text), []
        if self.kind == "tool_call":
            head, tail = self.tags
            body = text.strip()
            if not body.startswith(head.strip() or "{"):
                return None, []  # auto: the model answered in text
            body = body.removeprefix(head.strip()).removesuffix(tail.strip()).strip()
            call = json.loads(body)
            return None, [m.ToolCall(name=call["name"], arguments=call.get("arguments") or {})]
        return None, []


def plan_output(msg: m.Generate, messages: list[dict[str, str]] | None, *, renders_tools: bool,
                tags: tuple[str, str]) -> OutputPlan:
    """The constraint and prompt changes a `generate` asks for (its messages as given, or trimmed)."""
    if msg.json_schema is not None:
        return OutputPlan(Constraint("json_schema", _canonical(msg.json_schema)), "json_schema", messages=messages)
    if msg.regex is not None:
        return OutputPlan(Constraint("regex", msg.regex), "regex", messages=messages)
    if msg.choices is not None:
        return OutputPlan(Constraint("choices", json.dumps(list(msg.choices))), "choices", messages=messages)
    if msg.grammar is not None:
        return OutputPlan(Constraint("grammar", msg.grammar), "grammar", messages=messages)
    if msg.tools is None or msg.tool_choice == "none":
        return OutputPlan(messages=messages)
    assert messages is not None  # the protocol requires messages with tools
    defs = tuple({"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in msg.tools)
    if renders_tools:
        tools, shown = defs, messages
    else:
        tools, shown, tags = (), _describe_tools(messages, msg.tools), ("", "")
    chosen = [t for t in msg.tools if msg.tool_choice in ("auto", "required", t.name)]
    grammar = _tool_grammar(chosen, tags, allow_text=msg.tool_choice == "auto")
    return OutputPlan(Constraint("tool_call", grammar), "tool_call", tools, shown, tags, msg.tool_choice)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _describe_tools(messages: list[dict[str, str]], tools: list[m.Tool]) -> list[dict[str, str]]:
    """The messages with a system message (the first one, extended) describing the tools."""
    text = _TOOLS_INTRO + "\n".join(json.dumps({"name": t.name, "description": t.description,
                                                "parameters": t.parameters}, separators=(",", ":")) for t in tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _tool_grammar(tools: list[m.Tool], tags: tuple[str, str], *, allow_text: bool) -> str:
    """A Lark grammar (llguidance's dialect, with inline JSON schemas) for one call of one of
    `tools`, or, with `allow_text`, free text that does not start like a call."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    call = {"x-guidance": dict(JSON_OPTIONS), "anyOf": calls}
    head, tail = tags
    parts = [json.dumps(head)] if head else []
    parts.append("call_json")
    if tail:
        parts.append(json.dumps(tail))
    lines = [f"start: {'TEXT | ' if allow_text else ''}call", f"call: {' '.join(parts)}",
             f"call_json: %json {_canonical(call)}"]
    if allow_text:
        first = (head or "{")[0]
        lines.append(f"TEXT: /[^{_regex_class_escape(first)}](.|\\n)*/")
    return "\n".join(lines) + "\n"


def _regex_class_escape(char: str) -> str:
    return "\\" + char if char in "\\]^-[{}" else char
