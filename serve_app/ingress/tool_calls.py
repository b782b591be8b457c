"""Tool calls at the ingress: `tools`/`tool_choice`/`parallel_tool_calls` into a `ToolUse`, history into messages.

The engine does the rest: it renders the tools, constrains the output where a call is required,
and returns the calls it made as chunk fragments (llama.cpp: deployments.tool_stream reads them
out of the model's text; vLLM: its own tool parser), which serve_app.ingress.choices shapes.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from deployments.tool_use import ToolUse
from serve_app.ingress.protocol import ChatCompletionRequest, ChatMessage, OpenAIError


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
