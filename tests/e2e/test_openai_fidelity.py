"""What a client sends is honoured or refused, never dropped (issue #15), through the unmodified openai SDK.

Every response here is also checked against OpenAI's schema by conftest (tests/openai_schema.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.support.cluster import GEMMA, TINY, TINY_DEFAULT_MAX_TOKENS, WEB_ORIGIN

SYSTEM = "You are a pirate. Answer every question in pirate speak."
USER = "Name a colour."


def prompt_tokens(client: openai.OpenAI, model: str, messages: list[dict[str, Any]]) -> int:
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
    return reply.usage.prompt_tokens


def refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body


def test_system_and_developer_messages_reach_gemma_as_its_template_would_put_them(client: openai.OpenAI) -> None:
    """chat_format gemma has no system role: the text goes before the first user turn, as Gemma's own template does."""
    alone = prompt_tokens(client, GEMMA, [{"role": "user", "content": USER}])
    folded = prompt_tokens(client, GEMMA, [{"role": "user", "content": f"{SYSTEM}\n\n{USER}"}])
    for role in ("system", "developer"):
        with_it = prompt_tokens(client, GEMMA, [{"role": role, "content": SYSTEM}, {"role": "user", "content": USER}])
        assert with_it == folded > alone + 8, role


def test_system_messages_reach_a_model_with_its_own_template(client: openai.OpenAI) -> None:
    """The tiny GGUF's own Jinja template has a system role: it is used as is."""
    alone = prompt_tokens(client, TINY, [{"role": "user", "content": USER}])
    with_system = prompt_tokens(client, TINY, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
    assert with_system > alone + 8


CHAT = [{"role": "user", "content": USER}]
REFUSED_CHAT = [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}}),
    ("functions", [{"name": "lookup", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("n", 9),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "Red."}),
    ("service_tier", "priority"),
    ("store", True),
    ("reasoning_effort", "high"),
    ("verbosity", "low"),
    ("web_search_options", {}),
    ("stream_options", {"include_obfuscation": True}),
]


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT)
def test_chat_fields_the_server_cannot_honour_are_refused_by_name(client: openai.OpenAI, field: str, value: Any) -> None:
    body = refusal(lambda: client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=2,
                                                          extra_body={field: value}))
    assert (body["code"], body["param"]) == ("unsupported_parameter", field)


@pytest.mark.parametrize(
    ("field", "value"),
    [("suffix", " and that was it."), ("best_of", 3), ("prompt", [1, 2, 3]), ("prompt", ["one", "two"]), ("n", 9)],
)
def test_completion_fields_the_server_cannot_honour_are_refused_by_name(
    client: openai.OpenAI, field: str, value: Any
) -> None:
    body = refusal(lambda: client.completions.create(model=TINY, prompt="hello", max_tokens=2, extra_body={field: value}))
    assert (body["code"], body["param"]) == ("unsupported_parameter", field)


@pytest.mark.parametrize(
    ("messages", "code", "param"),
    [
        ([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                       {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
         "unsupported_parameter", "messages[0].content[1].type"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
         "unsupported_parameter", "messages[0].content[0].type"),
        ([{"role": "user", "content": "hi"}, {"role": "function", "content": "42", "name": "f"}],
         "unsupported_parameter", "messages[1].role"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
         "invalid_request", "messages[1].tool_call_id"),
        ([{"role": "user", "content": "hi", "name": "alice"}], "unsupported_parameter", "messages[0].name"),
        ([{"role": "user", "content": None}], "invalid_request", "messages[0].content"),
    ],
)
def test_messages_the_server_cannot_render_are_refused_by_name(
    client: openai.OpenAI, messages: list[dict[str, Any]], code: str, param: str
) -> None:
    body = refusal(lambda: client.chat.completions.create(model=TINY, messages=messages, max_tokens=2))
    assert (body["code"], body["param"]) == (code, param)


def test_fields_that_change_no_output_are_accepted(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": TINY, "messages": CHAT, "max_tokens": 6, "temperature": 0}
    plain = client.chat.completions.create(**params)
    accepted = client.chat.completions.create(
        **params, store=False, metadata={"job": "nightly"}, user="alice@example.com", service_tier="auto",
        prompt_cache_key="k-1", safety_identifier="user-42", response_format={"type": "text"}, n=1, logprobs=False,
        modalities=["text"], logit_bias={}, extra_body={"tools": [], "tool_choice": "none"},
    )
    assert accepted.choices[0].message.content == plain.choices[0].message.content


def test_a_request_without_max_tokens_gets_the_models_default(client: openai.OpenAI) -> None:
    """engine.default_max_tokens, not the whole context window; an explicit max_tokens still wins."""
    unset = client.chat.completions.create(model=TINY, messages=CHAT, temperature=0)
    assert (unset.usage.completion_tokens, unset.choices[0].finish_reason) == (TINY_DEFAULT_MAX_TOKENS, "length")
    explicit = client.chat.completions.create(model=TINY, messages=CHAT, temperature=0, max_tokens=20)
    assert explicit.usage.completion_tokens == 20
    completion = client.completions.create(model=TINY, prompt="hello", temperature=0, extra_body={"max_tokens": None})
    assert completion.usage.completion_tokens == TINY_DEFAULT_MAX_TOKENS  # null as well; unset is OpenAI's 16
    assert client.completions.create(model=TINY, prompt="hello", temperature=0).usage.completion_tokens == 16


def test_a_browser_on_an_allowed_origin_gets_preflights_answered_and_responses_readable(
    app_url: str, auth: dict[str, str]
) -> None:
    """The test deployment allows WEB_ORIGIN (ingress.cors.allow_origins): a real preflight, without a token."""
    url = f"{app_url}/v1/chat/completions"
    preflight = {"Origin": WEB_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    allowed = httpx.options(url, headers=preflight, timeout=30)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == WEB_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    stranger = httpx.options(url, headers={**preflight, "Origin": "https://evil.example.net"}, timeout=30)
    assert "access-control-allow-origin" not in stranger.headers
    body = {"model": TINY, "messages": CHAT, "max_tokens": 2}
    answered = httpx.post(url, json=body, headers={**auth, "Origin": WEB_ORIGIN}, timeout=60)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == WEB_ORIGIN
    assert "x-ratelimit-remaining-requests" in answered.headers["access-control-expose-headers"]
    refused = httpx.post(url, json=body, headers={"Origin": WEB_ORIGIN}, timeout=60)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == WEB_ORIGIN
