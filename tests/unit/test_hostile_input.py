"""Hand-made hostile requests the schema fuzzer does not write: raw bytes, deep JSON, NaN, extremes, huge headers.

Each goes through the real ingress app in-process (tests/support/ingress_app.py) and must get the
stated status with an OpenAI error object naming the field, never a 5xx; the app serves normally
afterwards and every generation it started has ended.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from serve_app.cli.tokens import mint_token
from tests.support.ingress_app import CHAT_MODEL, InProcessIngress, ingress_in_process

HELLO = [{"role": "user", "content": "Hello"}]
JSON = {"Content-Type": "application/json"}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": CHAT_MODEL, "messages": HELLO, **fields}).encode()


def chat_with(raw: bytes) -> bytes:
    """A chat body with one more field written as raw JSON text (NaN, Infinity, 5000 digits)."""
    return chat()[:-1] + b", " + raw + b"}"


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


# name: (body, status, param)
BODIES: dict[str, tuple[bytes, int, str | None]] = {
    "not JSON": (b'{"model": ', 400, None),
    "invalid UTF-8": (b'{"model": "stand-in", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    "lone surrogate in content": (b'{"model": "stand-in", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                                  400, None),
    "lone surrogate in model": (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', 400, None),
    "JSON 100,000 deep": (chat_with(b'"metadata": ' + nested(100_000)), 400, None),
    "messages 100,000 deep": (b'{"model": "stand-in", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
                              None),
    "body a JSON array": (b"[]", 400, None),
    "body JSON null": (b"null", 400, None),
    "empty body": (b"", 400, None),
    "temperature NaN": (chat_with(b'"temperature": NaN'), 400, "temperature"),
    "top_p Infinity": (chat_with(b'"top_p": Infinity'), 400, "top_p"),
    "presence_penalty -Infinity": (chat_with(b'"presence_penalty": -Infinity'), 400, "presence_penalty"),
    "temperature 1e999": (chat_with(b'"temperature": 1e999'), 400, "temperature"),
    "logit_bias NaN": (chat_with(b'"logit_bias": {"1": NaN}'), 400, "logit_bias"),
    "seed NaN": (chat_with(b'"seed": NaN'), 400, "seed"),
    "max_tokens of 5,000 digits": (chat_with(b'"max_tokens": ' + b"9" * 5000), 400, None),
    "max_tokens 0": (chat(max_tokens=0), 400, "max_tokens"),
    "max_tokens -1": (chat(max_tokens=-1), 400, "max_tokens"),
    "max_tokens 1.5": (chat(max_tokens=1.5), 400, "max_tokens"),
    "max_tokens '10'": (chat(max_tokens="10"), 400, "max_tokens"),
    "max_tokens 1": (chat(max_tokens=1), 200, None),
    "max_tokens 2^31 (clamped to the tenant's cap)": (chat(max_tokens=2**31), 200, None),
    "max_tokens 2^64": (chat(max_tokens=2**64), 200, None),
    "n 0": (chat(n=0), 400, "n"),
    "n -1": (chat(n=-1), 400, "n"),
    "n 1.5": (chat(n=1.5), 400, "n"),
    "n 2^31": (chat(n=2**31), 400, "n"),
    "top_logprobs -1": (chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    "10,000 stop strings": (chat(stop=["x"] * 10_000), 400, "stop"),
    "empty model": (json.dumps({"model": "", "messages": HELLO}).encode(), 404, "model"),
    "no messages": (chat(messages=[]), 400, "messages"),
    "5,000 messages": (chat(messages=HELLO * 5000), 400, "messages"),
    "5,000 characters (over the model's context)": (chat(messages=[{"role": "user", "content": "x" * 5000}]), 400,
                                                    "messages"),
    "7 MB of content (over max_prompt_chars)": (chat(messages=[{"role": "user", "content": "x" * 7_000_000}]), 400,
                                                "messages"),
    "9 MB body": (chat(messages=[{"role": "user", "content": "x" * 9_000_000}]), 413, None),
    "stream_options a string": (chat(stream=True, stream_options="x"), 400, "stream_options"),
}


@pytest.fixture(scope="module")
def http(ingress: InProcessIngress) -> Iterator[TestClient]:
    with TestClient(ingress.app) as client:  # an exception the app lets out fails the test, even after its answer
        yield client


def assert_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"], error
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize("name", BODIES)
def test_hostile_bodies_get_their_status_and_an_openai_error(
    name: str, ingress: InProcessIngress, http: TestClient
) -> None:
    body, status, param = BODIES[name]
    response = http.post("/v1/chat/completions", content=body, headers={**ingress.auth, **JSON})
    if status == 200:
        assert response.status_code == 200, response.text[:300]
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert_error(response, status, param)
    assert ingress.open_streams() == 0


def test_lone_surrogates_are_refused_on_every_generation_route(ingress: InProcessIngress, http: TestClient) -> None:
    """A lone surrogate cannot be encoded as UTF-8: the engine could not tokenize it, nor a response echo it."""
    headers = {**ingress.auth, **JSON}
    for path, body in (("/v1/completions", b'{"model": "stand-in", "prompt": "\\ud800", "echo": true}'),
                       ("/v1/embeddings", b'{"model": "stand-in-embed", "input": ["ok", "\\udc00"]}')):
        error = assert_error(http.post(path, content=body, headers=headers), 400)
        assert "surrogate" in error["message"]


def test_a_prompt_over_max_prompt_chars_is_refused_before_a_model_sees_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ingress_in_process(monkeypatch, limits={"max_prompt_chars": 1024}) as small, TestClient(small.app) as client:
        headers = {**small.auth, **JSON}
        for path, body, param in (
            ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 600}] * 2), "messages"),
            ("/v1/completions", json.dumps({"model": CHAT_MODEL, "prompt": "x" * 1025}).encode(), "prompt"),
            ("/v1/embeddings", json.dumps({"model": "stand-in-embed", "input": ["x" * 1000, "y" * 25]}).encode(),
             "input"),
        ):
            error = assert_error(client.post(path, content=body, headers=headers), 400, param)
            assert error["code"] == "context_length_exceeded" and "1024" in error["message"]
        assert not any(model.calls for model in small.models.values())
        assert client.post("/v1/completions", content=json.dumps({"model": CHAT_MODEL, "prompt": "x" * 1024}).encode(),
                           headers=headers).status_code == 200


@pytest.mark.parametrize("headers, status", [
    ({"Authorization": "Bearer " + "a" * 1_000_000}, 431),  # a 1 MB JWT is refused before it is parsed
    ({f"x-filler-{i}": "v" * 20 for i in range(2000)}, 431),
    ({"Authorization": b"Bearer \xff\xfe"}, 401),  # latin-1 bytes, not a token
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    ({"Authorization": "Bearer a.b.c"}, 401),
    ({"Authorization": "Bearer " + ".".join(["eyJhbGciOiJub25lIn0"] * 3)}, 401),
])
def test_hostile_headers_are_refused_before_the_body_is_read(
    headers: dict[str, Any], status: int, http: TestClient
) -> None:
    assert_error(http.post("/v1/chat/completions", content=chat(), headers={**JSON, **headers}), status)


def test_hostile_query_strings_paths_and_content_types(ingress: InProcessIngress, http: TestClient) -> None:
    assert http.get("/v1/models?x=%ff%fe&y=" + "a" * 10_000, headers=ingress.auth).status_code == 200
    assert_error(http.get("/v1/models/%ff%fe%ed%a0%80", headers=ingress.auth), 404, "model")
    text = http.post("/v1/chat/completions", content=chat(), headers={**ingress.auth, "Content-Type": "text/plain"})
    assert_error(text, 400)
    assert_error(http.patch("/v1/chat/completions", headers=ingress.auth), 405)


def test_a_jwt_with_10000_claims_is_refused_by_the_header_limit_and_verifies_quickly_below_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the app the token is refused as an oversized header; a server with room for it verifies it in bounded
    time (PyJWT decodes the claims once)."""
    padding = {f"c{i}": i for i in range(10_000)}
    with ingress_in_process(monkeypatch, limits={"max_header_bytes": 1024 * 1024}) as roomy:
        secret = os.environ["MODELSERVE_JWT_SECRET"]
        token = jwt.encode({"tenant": "fuzz", "exp": int(time.time()) + 60, **padding}, secret, "HS256")
        assert len(token) > 128 * 1024
        with TestClient(roomy.app) as client:
            started = time.perf_counter()
            auth = {"Authorization": f"Bearer {token}", **JSON}
            response = client.post("/v1/chat/completions", content=chat(), headers=auth)
            assert response.status_code == 200, response.text
            assert time.perf_counter() - started < 1.0
    with ingress_in_process(monkeypatch) as default, TestClient(default.app) as client:
        auth = {"Authorization": f"Bearer {token}", **JSON}
        assert_error(client.post("/v1/chat/completions", content=chat(), headers=auth), 431)


def test_a_tenant_named_outside_ascii_gets_answers(ingress: InProcessIngress, http: TestClient) -> None:
    """Ray metric tags are ASCII: a tenant called 'équipe' once turned every answer into a failed audit."""
    token = mint_token(os.environ["MODELSERVE_JWT_SECRET"], "équipe", [], 60)
    response = http.post("/v1/chat/completions", content=chat(), headers={"Authorization": f"Bearer {token}", **JSON})
    assert_error(response, 404, "model")


def test_the_app_serves_normally_after_the_hostile_input(ingress: InProcessIngress, http: TestClient) -> None:
    response = http.post("/v1/chat/completions", content=chat(max_tokens=2), headers={**ingress.auth, **JSON})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == " ok ok"
    assert ingress.open_streams() == 0
