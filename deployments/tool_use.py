"""Tool calls, engine-neutral: what a request offers the model, how a prompt carries it, how output is read back.

A chat template that knows tools (its Jinja source uses `tools`) renders them itself, along with
assistant `tool_calls` and `tool` results in the history. Any other template gets the generic
format: a system message listing each tool as JSON (name, description, parameter schema) and
asking for calls as `{"name": ..., "arguments": {...}}` JSON objects, one a line; earlier calls
become that JSON in the assistant turn, tool results a user turn. The model's output is read back
by `parse_calls`, which accepts those objects bare, in a ```json fence or in Hermes-style
`<tool_call>` tags, and returns calls only if every one names an offered tool and its arguments
validate against the tool's schema: anything else stays text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

ToolMode = Literal["auto", "required", "function"]
Message = dict[str, Any]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers (OpenAI function definitions) and how the model may use them.

    `mode` is `auto` (text or calls), `required` (at least one call) or `function` (a call of
    `function`); `parallel` allows several calls in one turn.
    """

    functions: tuple[dict[str, Any], ...]
    mode: ToolMode = "auto"
    function: str | None = None
    parallel: bool = True

    def callable(self) -> tuple[dict[str, Any], ...]:
        """The functions the model may call under `mode`."""
        if self.mode == "function":
            return tuple(f for f in self.functions if f["name"] == self.function)
        return self.functions


def parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's argument schema; OpenAI treats a missing one as an object of anything."""
    return function.get("parameters") or _ANY_OBJECT


def call_schema(tools: ToolUse) -> dict[str, Any]:
    """The JSON schema of one call the model may make: `{"name": <a callable tool>, "arguments": {...}}`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": parameters(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in tools.callable()
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def generic_preamble(tools: ToolUse) -> str:
    """The system message that offers tools to a model whose template does not know them."""
    listed = "\n".join(
        json.dumps({"name": f["name"], "description": f.get("description") or "", "parameters": parameters(f)})
        for f in tools.functions
    )
    how = ('To call a tool, reply with only a JSON object on one line: '
           '{"name": "<tool name>", "arguments": {<arguments matching its parameters>}}.')
    if tools.parallel:
        how += " To call several tools, write one such object per line."
    rule = {
        "auto": "If no tool helps, answer normally in plain text.",
        "required": "You must call one of the tools.",
        "function": f'You must call the tool "{tools.function}".',
    }[tools.mode]
    return f"You can call these tools (each line: name, description, JSON schema of its parameters):\n{listed}\n{how} {rule}"


def _arguments_value(arguments: str) -> Any:
    """A history call's arguments as templates expect them (an object), or the string if it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def native_messages(messages: tuple[Message, ...]) -> list[Message]:
    """History for a template that renders tools itself: call arguments as objects (the Hugging Face convention)."""
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _arguments_value(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        rendered.append(message)
    return rendered


def generic_messages(messages: tuple[Message, ...], tools: ToolUse | None) -> list[Message]:
    """History in plain roles: the tool preamble first, calls as JSON lines, results as user turns."""
    rendered: list[Message] = [{"role": "system", "content": generic_preamble(tools)}] if tools else []
    names: dict[str, str] = {}
    for message in messages:
        if message["role"] == "tool":
            call_id = message.get("tool_call_id") or ""
            label = f"{call_id} ({names[call_id]})" if call_id in names else call_id
            rendered.append({"role": "user", "content": f"Result of tool call {label}:\n{message['content']}"})
            continue
        calls = message.get("tool_calls") or []
        lines = [message["content"]] if message["content"] else []
        for call in calls:
            names[call["id"]] = call["function"]["name"]
            arguments = _arguments_value(call["function"]["arguments"])
            lines.append(json.dumps({"name": call["function"]["name"], "arguments": arguments}))
        rendered.append({"role": message["role"], "content": "\n".join(lines)})
    return rendered


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # compact JSON object


def _unwrap(text: str) -> str:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    return text.replace(HERMES_OPEN, "").replace(HERMES_CLOSE, "").strip()


def parse_calls(text: str, tools: ToolUse) -> list[ParsedCall] | None:
    """The calls `text` consists of, each naming a callable tool with valid arguments; None if it is anything else."""
    body, decoder, objects = _unwrap(text), json.JSONDecoder(), []
    position = 0
    while position < len(body):
        try:
            value, position = decoder.raw_decode(body, position)
        except ValueError:
            return None
        objects.append(value)
        while position < len(body) and body[position].isspace():
            position += 1
    if not objects or (len(objects) > 1 and not tools.parallel):
        return None
    by_name = {f["name"]: f for f in tools.callable()}
    calls = []
    for value in objects:
        if not isinstance(value, dict) or set(value) - {"name", "arguments", "parameters"}:
            return None
        function = by_name.get(value.get("name"))  # type: ignore[arg-type]
        arguments = value.get("arguments", value.get("parameters"))
        if isinstance(arguments, str):
            arguments = _arguments_value(arguments)
        if function is None or not isinstance(arguments, dict):
            return None
        try:
            jsonschema.validate(arguments, parameters(function))
        except jsonschema.ValidationError:
            return None
        calls.append(ParsedCall(function["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))))
    return calls


def may_be_call(text: str) -> bool:
    """Whether output starting with `text` may turn out to be calls (a stream holds it back until it knows)."""
    start = text.lstrip()
    return any(start.startswith(p) or p.startswith(start) for p in ("{", "```", HERMES_OPEN))
