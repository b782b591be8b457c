"""Every field of OpenAI's request bodies has a deliberate treatment, and the README says which (no Ray)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from openai_schema import SCHEMAS

from serve_app.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from serve_app.request_fields import CHAT, COMPLETIONS, FIELDS, audit_identifiers, check_fields, markdown_table

REQUESTS = {CHAT: ("CreateChatCompletionRequest", ChatCompletionRequest),
            COMPLETIONS: ("CreateCompletionRequest", CompletionRequest)}


def spec_fields(name: str) -> set[str]:
    """The properties of a request body in OpenAI's spec, following its allOf parts."""
    schemas = json.loads(SCHEMAS.read_text())["components"]["schemas"]
    schema = schemas[name]
    fields: set[str] = set()
    for part in schema.get("allOf", [schema]):
        if "$ref" in part:
            fields |= spec_fields(part["$ref"].rsplit("/", 1)[-1])
        fields |= set(part.get("properties", {}))
    return fields


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_every_field_of_the_spec_is_honoured_accepted_or_refused(endpoint: str) -> None:
    schema, model = REQUESTS[endpoint]
    ours = {name for name, rule in FIELDS.items() if endpoint in rule.endpoints}
    assert ours == spec_fields(schema)
    assert ours <= set(model.model_fields)  # each is parsed, so its value can be checked


def test_the_readme_table_is_the_code() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text()


CHAT_BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"n": 9}, "n"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"moderation": {"model": "x"}}, "moderation"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "r", "tool_call_id": "1"}]},
         "messages[1].role"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                    {"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[1].type"),
    ],
)
def test_refused_values_name_their_field(extra: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        check_fields(ChatCompletionRequest.model_validate({**CHAT_BASE, **extra}))
    error = info.value.body.error
    assert (error.code, error.param) == ("unsupported_parameter", param)


def test_values_that_ask_for_nothing_missing_pass() -> None:
    fine = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}, "tools": [], "tool_choice": "none",
        "n": 8, "logprobs": True, "top_logprobs": 20, "logit_bias": {"50256": -100}, "modalities": ["text"], "store": False, "service_tier": "auto", "user": "u",
        "metadata": {"k": "v"}, "prompt_cache_key": "k", "safety_identifier": "s",
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "messages": [{"role": "developer", "content": "d"}, {"role": "system", "content": [{"type": "text", "text": "s"}]},
                     {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "refusal": None,
                                                        "tool_calls": [], "audio": None}],
    }
    check_fields(ChatCompletionRequest.model_validate({**CHAT_BASE, **fine}))
    check_fields(CompletionRequest.model_validate({"model": "m", "prompt": ["p"], "best_of": 1, "suffix": "", "echo": True}))


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"suffix": "end"}, "suffix"),
     ({"best_of": 2}, "best_of"), ({"n": 9}, "n")],
)
def test_completion_refusals(extra: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        check_fields(CompletionRequest.model_validate({"model": "m", "prompt": "p", **extra}))
    assert info.value.body.error.param == param


def test_a_message_without_content_is_invalid() -> None:
    with pytest.raises(OpenAIError) as info:
        check_fields(ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": None}]}))
    assert (info.value.body.error.code, info.value.body.error.param) == ("invalid_request", "messages[0].content")


def test_audit_identifiers_hash_email_addresses() -> None:
    ids = audit_identifiers(ChatCompletionRequest.model_validate(
        {**CHAT_BASE, "user": "alice@example.com", "safety_identifier": "tenant-user-42"}))
    assert ids["safety_identifier"] == "tenant-user-42"
    assert ids["user"].startswith("sha256:") and "alice" not in ids["user"]
    assert audit_identifiers(CompletionRequest.model_validate({"model": "m", "prompt": "p"})) == {}
