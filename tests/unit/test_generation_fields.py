"""response_format, logit_bias, logprobs and n: what reaches the engine, and malformed values named (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.ingress.generation_fields import generation_options
from serve_app.ingress.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def chat(**fields: Any) -> dict[str, Any]:
    return generation_options(ChatCompletionRequest.model_validate({**CHAT, **fields}))


def completion(**fields: Any) -> dict[str, Any]:
    return generation_options(CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields}))


def test_what_the_engine_gets() -> None:
    assert chat() == {"logit_bias": (), "logprobs": None, "n": 1, "response_format": None}
    assert chat(response_format={"type": "text"}, logprobs=False)["response_format"] is None
    assert chat(response_format={"type": "json_object"})["response_format"] == {"type": "json_object"}
    strict = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    assert chat(response_format=strict)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    assert chat(logit_bias={"7": -100, "12": 5.5})["logit_bias"] == ((7, -100.0), (12, 5.5))
    assert chat(logprobs=True)["logprobs"] == 0
    assert chat(logprobs=True, top_logprobs=20)["logprobs"] == 20
    assert chat(n=8)["n"] == 8
    assert completion(logprobs=5)["logprobs"] == 5 and completion(logprobs=0)["logprobs"] == 0
    assert completion()["response_format"] is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
         "response_format.json_schema.strict"),
    ],
)
def test_malformed_chat_values_are_named(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        chat(**fields)
    assert (info.value.status, info.value.body.error.code, info.value.body.error.param) == (
        400, "invalid_request", param)


def test_completion_logprobs_range_and_echo() -> None:
    with pytest.raises(OpenAIError) as info:
        completion(logprobs=6)
    assert (info.value.body.error.code, info.value.body.error.param) == ("invalid_request", "logprobs")
    with pytest.raises(OpenAIError) as info:
        completion(logprobs=1, echo=True)
    assert (info.value.body.error.code, info.value.body.error.param) == ("unsupported_parameter", "logprobs")
