"""Structured output on llama.cpp: OpenAI's `response_format` as a GBNF grammar for llama.cpp's grammar sampler.

A JSON schema becomes GBNF through llama-cpp-python's converter (`json_schema_to_gbnf`). That converter
silently ignores some JSON Schema keywords (numeric bounds, `not`, `uniqueItems`, ...) and reads `oneOf`
as `anyOf`; a schema using one is refused (400 naming `response_format`), so constrained output always
validates against the schema it was asked for, never just looks like it.
"""

from __future__ import annotations

import ctypes
import json
import math
from functools import lru_cache
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from deployments.api import UnsupportedGenerationRequest

PARAM = "response_format"
# Keywords the converter turns into grammar rules, and ones that constrain nothing (annotations).
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "minLength", "maxLength", "format",
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly"}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf")
_LOOSE_CHAR, _JSON_CHAR = r'char ::= [^"\\] ', r'char ::= [^"\\\x7F\x00-\x1F] '
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _refuse(message: str) -> UnsupportedGenerationRequest:
    return UnsupportedGenerationRequest(f"response_format: {message}", param=PARAM)


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse any part of a JSON schema the converter would not enforce."""
    if not isinstance(schema, dict):
        raise _refuse(f"{where} must be a JSON object (boolean schemas are not supported)")
    unknown = sorted(set(schema) - _ENFORCED - _ANNOTATIONS)
    if unknown:
        raise _refuse(f"{where} uses {', '.join(unknown)}, which constrained decoding cannot enforce")
    kinds = schema.get("type")
    if not all(kind in _TYPES for kind in (kinds if isinstance(kinds, list) else [kinds] if kinds else [])):
        raise _refuse(f"{where}.type {kinds!r} is not a JSON Schema type")
    if isinstance(kinds, list) and set(schema) & {"properties", "items", "pattern", "minLength", "maxLength"}:
        raise _refuse(f"{where}: a list of types cannot carry constraints; use anyOf")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]")
    items = schema.get("items")
    for sub in items if isinstance(items, list) else [items] if items is not None else []:
        check_schema(sub, f"{where}.items")
    if missing := sorted(set(schema.get("required") or []) - set(schema.get("properties") or {})):
        raise _refuse(f"{where}.required names {', '.join(missing)}, which are not in its properties")
    if isinstance(schema.get("additionalProperties"), dict):
        check_schema(schema["additionalProperties"], f"{where}.additionalProperties")


def enforces(schema: Any) -> bool:
    """Whether the grammar compiled from `schema` enforces all of it (`check_schema` would let it through)."""
    try:
        check_schema(schema)
    except UnsupportedGenerationRequest:
        return False
    return True


def json_strings(gbnf: str) -> str:
    """A converted grammar whose strings hold no raw control characters, which JSON forbids.

    llama-cpp-python's converter lets them in; llama.cpp's own converter (json-schema-to-grammar)
    excludes them from its string character rule the same way.
    """
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


@lru_cache(maxsize=128)
def _compile(schema_json: str, vocab: int) -> str:
    schema = json.loads(schema_json)
    check_schema(schema)
    try:
        grammar = json_schema_to_gbnf(schema_json)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _refuse(f"the schema cannot be compiled to a grammar: {exc}") from None
    grammar = json_strings(grammar)
    sampler = llama_cpp.llama_sampler_init_grammar(ctypes.c_void_p(vocab), grammar.encode(), b"root")
    if not sampler:
        raise _refuse("llama.cpp cannot parse the grammar compiled from this schema")
    llama_cpp.llama_sampler_free(sampler)
    return grammar


def grammar_for(response_format: dict[str, Any], vocab: Any) -> str:
    """The GBNF grammar of a `json_object` or `json_schema` response format (checked to load in llama.cpp)."""
    if response_format["type"] == "json_object":
        schema: Any = {"type": "object"}
    else:
        schema = response_format["json_schema"].get("schema") or {"type": "object"}
    address = ctypes.cast(vocab, ctypes.c_void_p).value or 0
    return _compile(json.dumps(schema), address)


class Grammar:
    """A sequence's grammar sampler: checks one token cheaply, filters a whole candidate array, advances."""

    def __init__(self, vocab: Any, grammar: str) -> None:
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise _refuse("llama.cpp cannot parse the grammar compiled from this schema")
        self._one = llama_cpp.llama_token_data(0, 1.0, 0.0)
        self._one_array = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next: one token through the grammar (llama-server's first check)."""
        self._one.id, self._one.logit = token, 1.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        return not math.isinf(self._one.logit)

    def apply(self, candidates: Any) -> None:
        """Set the logit of every token the grammar does not accept next to -inf."""
        llama_cpp.llama_sampler_apply(self._sampler, candidates)

    def accept(self, token: int) -> None:
        """Advance past `token`, which must be allowed (llama.cpp aborts on a token its grammar rejects)."""
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self._sampler)
