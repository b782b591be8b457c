"""What a fuzzed request must get from the app, whatever it sent: shared by the in-process and the e2e fuzz tests.

A schemathesis case is sent as generated and, when it names a model, again naming one that exists
(so it gets past the 404 into validation, admission and serving). Every answer must be a 2xx that
matches the app's OpenAPI document, or an error status the document lists with an OpenAI error object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def assert_openai_answer(response: Any, documented: set[str], what: str) -> None:
    """A 2xx, or a documented error status with `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        assert str(response.status_code) in documented, f"{what}: undocumented {response.status_code}"
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"}, f"{what}: {error}"
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def variants(case: Any, chat_model: str, embed_model: str) -> list[Any]:
    """The case, and the same request naming a model that exists."""
    model = embed_model if case.path == "/v1/embeddings" else chat_model
    cases = [case]
    if isinstance(case.body, dict) and "model" in case.body:
        cases.append(case.operation.Case(body={**case.body, "model": model}, media_type=case.media_type,
                                         path_parameters=case.path_parameters))
    if case.path_parameters and "model_id" in case.path_parameters:
        cases.append(case.operation.Case(path_parameters={"model_id": chat_model}))
    return cases


def check_case(case: Any, send: Callable[[Any], Any], chat_model: str, embed_model: str) -> None:
    """Send the case's variants with `send` and check each answer."""
    documented = set(case.operation.definition.raw["responses"])
    if case.method.lower() != case.operation.method.lower():  # schemathesis tries the methods a path lacks
        documented.add("405")
    for sent in variants(case, chat_model, embed_model):
        response = send(sent)
        assert_openai_answer(response, documented, f"{case.method} {case.path} {sent.body!r:.300}")
        if response.status_code < 300 and "json" in response.headers.get("content-type", ""):
            case.operation.validate_response(response)
