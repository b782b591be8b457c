"""Tool calls read out of a text engine's stream, choice by choice, as OpenAI-style call fragments.

A text engine (llama.cpp) writes calls as JSON objects (`deployments.tool_use`); this turns each
choice's text into content and `ToolCallFragment`s the way OpenAI streams them: a call's index, id
and name first, then its arguments in fragments. Two ways, by what the engine guarantees:

- Constrained (tool_choice `required` or a function, under a grammar that enforces every parameter
  schema): the output can only be calls, so a call is announced as soon as its name is out and its
  arguments pass on as they are generated; the grammar makes them valid. If max_tokens cuts a call,
  its arguments stay cut and finish_reason is `length` (as with response_format).
- Buffered (`auto`, or a schema the grammar does not fully enforce): output is declared calls only
  once it is complete and validates (`parse_calls`), so output that may be calls is held back until
  the choice ends and each call's arguments arrive in one fragment. Text is passed on at once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import AsyncIterator

from deployments.api import GenerationChunk, Started, ToolCallFragment
from deployments.tool_use import ToolUse, may_be_call, parse_calls

_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ConstrainedCalls:
    """One choice's output that is only calls (`{"name": ..., "arguments": {...}}` objects, name first)."""

    def __init__(self) -> None:
        self.calls = 0  # calls announced so far
        self._pending = ""  # output not passed on yet: separators, or the start of a call before its name is out
        self._depth = 0  # brackets open in the current call's arguments (it ends when this is back at 0)
        self._in_arguments = self._in_string = self._escaped = False

    def feed(self, text: str) -> tuple[str, list[ToolCallFragment]]:
        self._pending += text
        fragments: list[ToolCallFragment] = []
        while True:
            if not self._in_arguments:
                start = self._pending.find("{")
                head = _HEAD.match(self._pending, start) if start >= 0 else None
                if head is None:
                    return "", fragments  # a separator, or a call whose name is not out yet
                name = json.loads(head.group(1))
                fragments.append(ToolCallFragment(self.calls, "", id=call_id(), name=name))
                self._pending, self._in_arguments = self._pending[head.end():], True
            if self._depth == 0:  # the arguments have not begun: no space before them
                self._pending = self._pending.lstrip()
            end = self._arguments_end()
            cut = len(self._pending) if end is None else end
            part, self._pending = self._pending[:cut], self._pending[cut:]
            if part:
                fragments.append(ToolCallFragment(self.calls, part))
            if end is None:
                return "", fragments
            self._in_arguments = False
            self.calls += 1

    def _arguments_end(self) -> int | None:
        """Where the current call's arguments end in the pending output; None if they go on past it."""
        for position, char in enumerate(self._pending):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return position + 1
        return None

    def finish(self) -> tuple[str, list[ToolCallFragment]]:
        """Output left over: text if no call began (cut before a name), else only the calls' closing syntax."""
        left, self._pending = self._pending, ""
        return ("" if self.calls or self._in_arguments else left), []


class BufferedCalls:
    """One choice's output that may be text or calls: text passes at once, possible calls wait to be whole."""

    def __init__(self, tools: ToolUse) -> None:
        self._tools = tools
        self._held = ""
        self._is_text = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallFragment]]:
        if self._is_text:
            return text, []
        self._held += text
        if self._tools.mode == "auto" and not may_be_call(self._held):
            self._is_text, held, self._held = True, self._held, ""
            return held, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCallFragment]]:
        """The held-back output: calls if all of it is valid calls, else text."""
        held, self._held = self._held, ""
        calls = parse_calls(held, self._tools) if held else None
        if not calls:
            return held, []
        self.calls = len(calls)
        return "", [ToolCallFragment(i, c.arguments, id=call_id(), name=c.name) for i, c in enumerate(calls)]


async def read_tool_calls(
    chunks: AsyncIterator[Started | GenerationChunk], tools: ToolUse, constrained: bool
) -> AsyncIterator[Started | GenerationChunk]:
    """The chunks of a text engine with each choice's calls as `tool_calls` (finish_reason `tool_calls`)."""
    readers: dict[int, ConstrainedCalls | BufferedCalls] = {}
    async for chunk in chunks:
        if isinstance(chunk, Started):
            yield chunk
            continue
        reader = readers.setdefault(chunk.index, ConstrainedCalls() if constrained else BufferedCalls(tools))
        text, calls = reader.feed(chunk.text)
        finish = chunk.finish_reason
        if finish is not None:
            left, last = reader.finish()
            text, calls = text + left, calls + last
            if reader.calls and finish == "stop":
                finish = "tool_calls"
        yield dataclasses.replace(chunk, text=text, tool_calls=tuple(calls), finish_reason=finish)
