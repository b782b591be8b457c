"""Tool calls at the ingress: `tools`/`tool_choice`/`parallel_tool_calls` into a `ToolUse`, output back into calls.

The engine renders the tools and, for `required` or a named function, samples under a grammar
(deployments.llama_cpp.tools). Whatever the mode, the text it returns is read back here by
`deployments.tool_use.parse_calls`: calls come back only whole and valid (`finish_reason:
"tool_calls"`); anything else is the message's text. A stream therefore holds back output that
may be calls until it is complete, then sends each call as OpenAI's deltas: index, id, type and
name first, then the arguments.
"""

from __future__ import annotations

import uuid
from typing import Any

import jsonschema

from deployments.tool_use import ParsedCall, ToolUse, may_be_call, parse_calls
from serve_app.ingress.protocol import ChatCompletionRequest, ChatMessage, OpenAIError
from serve_app.ingress.responses import DeltaMessage, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta


def _invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_request")


def _unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """What the request lets the model call, or None when it calls nothing (no tools, or `tool_choice: "none"`)."""
    functions = []
    for i, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise _unsupported(f"tools[{i}].type", f"Tools of type '{tool.type}' are not supported: only functions.")
        if tool.function is None:
            raise _invalid(f"tools[{i}].function", "Missing required parameter: 'function'.")
        if tool.function.parameters is not None:
            try:
                jsonschema.validators.validator_for(tool.function.parameters).check_schema(tool.function.parameters)
            except jsonschema.SchemaError as exc:
                raise _invalid(f"tools[{i}].function.parameters", f"Invalid JSON schema: {exc.message}.") from None
        functions.append(tool.function.model_dump(exclude_none=True, exclude={"strict"}))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise _invalid("tools", "Tool names must be unique.")
    mode, function = _choice(body.tool_choice, names)
    if mode == "none" or not functions:
        return None
    parallel = body.parallel_tool_calls is not False and mode != "function"  # OpenAI: a named function, one call
    return ToolUse(tuple(functions), mode, function, parallel)  # type: ignore[arg-type]


def _choice(choice: Any, names: list[str]) -> tuple[str, str | None]:
    """`tool_choice` as (mode, function name): auto (the default with tools), none, required or a named function."""
    if choice is None:
        return ("auto" if names else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise _invalid("tool_choice", "tool_choice 'required' needs at least one tool in 'tools'.")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise _invalid("tool_choice", f"tool_choice names function {name!r}, which is not in 'tools'.")
        return "function", name
    if isinstance(choice, dict) and choice.get("type") in ("allowed_tools", "custom"):
        raise _unsupported("tool_choice", f"tool_choice of type '{choice['type']}' is not supported.")
    raise _invalid("tool_choice", "tool_choice must be 'none', 'auto', 'required' or a function.")


def engine_message(message: ChatMessage) -> dict[str, Any]:
    """A message as the engine renders it: text content, plus the call history it carries.

    OpenAI: developer messages are what system messages were, for models without a role of their own.
    """
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.role == "tool":
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def reply(text: str, finish_reason: str | None, tools: ToolUse | None) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """A complete output as (content, tool_calls, finish_reason): calls only if all of it is valid calls."""
    calls = parse_calls(text, tools) if tools is not None else None
    if not calls:
        return text, None, finish_reason
    return None, [ToolCall(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls], \
        "tool_calls"


def _call_deltas(calls: list[ParsedCall]) -> list[DeltaMessage]:
    deltas = []
    for index, call in enumerate(calls):
        head = ToolCallDelta(index=index, id=_call_id(), type="function",
                             function=FunctionCallDelta(name=call.name, arguments=""))
        deltas += [DeltaMessage(tool_calls=[head]),
                   DeltaMessage(tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.arguments))])]
    return deltas


class StreamedReply:
    """Turns a stream's text into deltas: text as it comes, output that may be calls held back until complete."""

    def __init__(self, tools: ToolUse | None) -> None:
        self._tools = tools
        self._held = ""
        self._text = tools is None  # True once the output is known to be text

    def feed(self, text: str) -> list[DeltaMessage]:
        if self._text:
            return [DeltaMessage(content=text)] if text else []
        self._held += text
        if self._tools is not None and self._tools.mode == "auto" and not may_be_call(self._held):
            self._text, held, self._held = True, self._held, ""
            return [DeltaMessage(content=held)]
        return []

    def finish(self, finish_reason: str | None) -> tuple[list[DeltaMessage], str | None]:
        """The held-back output (as calls if it is valid calls) and the finish reason."""
        if self._text or not self._held:
            return [], finish_reason
        calls = parse_calls(self._held, self._tools) if self._tools is not None else None
        if calls:
            return _call_deltas(calls), "tool_calls"
        return [DeltaMessage(content=self._held)], finish_reason
