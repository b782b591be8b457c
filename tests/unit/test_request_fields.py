"""Every field of OpenAI's request bodies has a deliberate treatment, and the README says which (no Ray)."""

from __future__ import annotations

import json

import pytest

from serve_app.ingress.embeddings import EMBEDDING_FIELDS, EmbeddingsRequest
from serve_app.ingress.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from serve_app.ingress.request_fields import CHAT, COMPLETIONS, FIELDS, audit_identifiers, check_fields, markdown_table
from tests.support.cluster import ROOT
from tests.support.openai_schema import SCHEMAS

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
    assert markdown_table(EMBEDDING_FIELDS) in (ROOT / "README.md").read_text()


def test_every_embeddings_field_of_the_spec_is_honoured_or_refused() -> None:
    assert set(EMBEDDING_FIELDS) == spec_fields("CreateEmbeddingRequest") <= set(EmbeddingsRequest.model_fields)


CHAT_BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
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
        ({"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "r", "name": "f"}]},
         "messages[1].role"),
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
                                                        "tool_calls": [], "audio": None},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "content": "42", "tool_call_id": "c1"}],
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


@pytest.mark.parametrize(
    ("message", "param"),
    [({"role": "tool", "content": "42"}, "messages[1].tool_call_id"),
     ({"role": "user", "content": "a", "tool_calls": [{"id": "1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]},
      "messages[1].tool_calls"),
     ({"role": "assistant", "content": None}, "messages[1].content")],
)
def test_tool_turns_need_their_parts(message: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        check_fields(ChatCompletionRequest.model_validate({**CHAT_BASE, "messages": [CHAT_BASE["messages"][0], message]}))
    assert (info.value.body.error.code, info.value.body.error.param) == ("invalid_request", param)


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
