"""Grammar-constrained tool calls for llama.cpp: the GBNF grammar a required call is sampled under.

With `tool_choice` `required` or a named function, the output must be calls: llama-cpp-python's
JSON-schema converter turns the call schema (`{"name": <tool>, "arguments": <its parameters>}`)
into GBNF, and llama.cpp's grammar sampler masks every token that would leave it, so the
arguments always validate. Several calls (parallel_tool_calls) are such objects one a line; a
template in the Hermes style gets each wrapped in its `<tool_call>` tags. Where the grammar enforces
every parameter schema, a call's arguments can stream as they are generated (`streams_arguments`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from deployments.api import UnsupportedGenerationRequest
from deployments.llama_cpp.grammar import enforces, json_strings
from deployments.tool_use import HERMES_CLOSE, HERMES_OPEN, ToolUse, call_schema, parameters

_ROOT = re.compile(r"(?<![\w-])root(?![\w-])")
_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')  # GBNF strings and character classes
_CALL_RULE = "modelserve-tool-call"


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal uses JSON's escapes


def tool_grammar(tools: ToolUse, hermes: bool) -> str | None:
    """GBNF for output that is only calls (tool_choice `required` or a function); None when text is allowed."""
    if tools.mode == "auto":
        return None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(call_schema(tools)), prop_order=["name", "arguments"])
    except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions for schema features it lacks
        raise UnsupportedGenerationRequest(
            f"A tool's parameter schema cannot be turned into a grammar: {exc}", param="tools"
        ) from None
    call = _CALL_RULE
    if hermes:
        call = f"{_literal(HERMES_OPEN + chr(10))} {_CALL_RULE} {_literal(chr(10) + HERMES_CLOSE)}"
    root = f'root ::= {call} ("\\n" {call})*' if tools.parallel else f"root ::= {call}"
    return _rename_root(json_strings(gbnf)) + "\n" + root + "\n"


def streams_arguments(tools: ToolUse) -> bool:
    """Whether calls can be passed on as generated: output that is only calls, under a grammar that
    enforces each callable function's (object) parameter schema, so whatever it generates validates."""
    return tools.mode != "auto" and all(
        parameters(f).get("type") == "object" and enforces(parameters(f)) for f in tools.callable()
    )


def _rename_root(gbnf: str) -> str:
    """The converter's `root` rule (and references to it) renamed, leaving string literals and classes alone."""
    parts, position = [], 0
    for literal in _LITERALS.finditer(gbnf):
        parts += [_ROOT.sub(_CALL_RULE, gbnf[position:literal.start()]), literal.group()]
        position = literal.end()
    return "".join(parts) + _ROOT.sub(_CALL_RULE, gbnf[position:])


def grammar_sampler(vocab: Any, gbnf: str) -> Any:
    """llama.cpp's grammar sampler for `gbnf` (a chain stage; the chain frees it)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise UnsupportedGenerationRequest("llama.cpp could not parse the tool call grammar", param="tools")
    return sampler


def check_grammar(vocab: Any, gbnf: str) -> None:
    """Raise a 400 now, at admission, for a grammar llama.cpp will not take."""
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))
