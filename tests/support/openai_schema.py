"""Every response an e2e test gets from the app, checked against OpenAI's published OpenAPI schema.

`install()` wraps httpx's transport (which the openai SDK uses too), so no e2e test can see a body of
the API unvalidated: each JSON body, each server-sent event and each error object is validated as it
arrives, before the caller reads it. A violation raises in the caller and is also recorded, so the
test fails at teardown even where a client turns the exception into a connection error.
The schemas are the vendored components in tests/schemas/openai-components.json (see tests/schemas/SOURCE.md).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "openai-components.json"

# modelserve's own routes beside the OpenAI API: schemas of ours, so they are checked too.
LOCAL_SCHEMAS: dict[str, dict[str, Any]] = {
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "AdminStatus": {
        "type": "object",
        "required": ["models", "ingress"],
        "properties": {"models": {"type": "object"}, "ingress": {"type": "object", "required": ["state"]}},
    },
    "UsageReport": {
        "type": "object",
        "required": ["object", "group_by", "data"],
        "properties": {
            "object": {"const": "list"},
            "group_by": {"enum": ["day", "month", "total"]},
            "data": {"type": "array", "items": {
                "type": "object",
                "required": ["period", "tenant", "key", "model", "requests", "prompt_tokens", "completion_tokens",
                             "total_tokens"],
                "properties": {name: {"type": "integer", "minimum": 0} for name in (
                    "requests", "prompt_tokens", "completion_tokens", "total_tokens")},
            }},
        },
    },
}

_violations: list[str] = []
_lock = threading.Lock()


def openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (the spec still uses it) as JSON Schema: the value or null."""
    if isinstance(node, list):
        return [openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: openapi_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def _document() -> dict[str, Any]:
    document = openapi_to_json_schema(json.loads(SCHEMAS.read_text()))
    schemas = document["components"]["schemas"]
    # OpenAI has no separate schema for a streamed text completion: it sends CreateCompletionResponse
    # chunks whose `finish_reason` is null until the last one (its schema types it as a string).
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    schemas["CreateCompletionStreamChunk"] = chunk
    # With `encoding_format: base64` OpenAI returns each embedding as a base64 string, which the spec's
    # `Embedding` (an array of numbers) does not describe: either is allowed.
    embedding = schemas["Embedding"]["properties"]
    embedding["embedding"] = {"anyOf": [embedding["embedding"], {"type": "string", "contentEncoding": "base64"}]}
    schemas.update(LOCAL_SCHEMAS)
    return document


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **_document()})


def check(name: str, instance: Any) -> None:
    """Raise AssertionError naming every way `instance` breaks schema `name`."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)
        raise AssertionError(f"response violates OpenAI schema {name}: {details}\n{json.dumps(instance)[:2000]}")


def schema_for(method: str, path: str, status: int, streamed: bool) -> str:
    """The schema a response must match, by route; a route without one is itself a failure."""
    route = path[path.index("/v1/"):] if "/v1/" in path else "/" + path.rsplit("/", 1)[-1]
    if status >= 400:
        return "ErrorResponse"
    routes = {
        ("GET", "/v1/models"): "ListModelsResponse",
        ("GET", "/health"): "Health",
        ("GET", "/v1/admin/status"): "AdminStatus",
        ("GET", "/v1/admin/usage"): "UsageReport",
        ("POST", "/v1/chat/completions"): "CreateChatCompletionStreamResponse" if streamed
        else "CreateChatCompletionResponse",
        ("POST", "/v1/completions"): "CreateCompletionStreamChunk" if streamed else "CreateCompletionResponse",
        ("POST", "/v1/embeddings"): "CreateEmbeddingResponse",
    }
    if (method, route) in routes:
        return routes[(method, route)]
    if method == "GET" and route.startswith("/v1/models/"):
        return "Model"
    raise AssertionError(f"no response schema for {method} {route} (status {status}): add one to tests/openai_schema.py")


def is_app_request(request: httpx.Request) -> bool:
    """Requests to the app's API (any route prefix): not the Ray dashboard, metrics or S3."""
    return request.method != "OPTIONS" and ("/v1/" in request.url.path or request.url.path.endswith("/health"))


class ValidatingStream(httpx.SyncByteStream):
    """Passes a response body through, validating each SSE event (or the whole JSON body) before handing it on."""

    def __init__(self, inner: httpx.SyncByteStream, request: httpx.Request, response: httpx.Response) -> None:
        self._inner = inner
        self._where = f"{request.method} {request.url.path}"
        content_type = response.headers.get("content-type", "")
        self._sse = content_type.startswith("text/event-stream")
        self._json = content_type.startswith("application/json")
        if not (self._sse or self._json):
            record(f"{self._where}: {response.status_code} with content-type {content_type!r}, not JSON or SSE")
        try:
            self._schema = schema_for(request.method, request.url.path, response.status_code, self._sse)
        except AssertionError as exc:
            record(str(exc))
            raise
        self._buffer = b""

    def __iter__(self) -> Iterator[bytes]:
        for data in self._inner:
            self._buffer += data
            if self._sse:
                *events, self._buffer = re.split(rb"\r?\n\r?\n", self._buffer)
                for event in events:
                    self._check_event(event)
            yield data
        if self._json:
            self._guarded(self._schema, json.loads(self._buffer))

    def _check_event(self, event: bytes) -> None:
        for line in event.decode().splitlines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            payload = json.loads(line[5:])
            self._guarded("ErrorResponse" if "error" in payload else self._schema, payload)

    def _guarded(self, schema: str, payload: Any) -> None:
        try:
            check(schema, payload)
        except AssertionError as exc:
            record(f"{self._where}: {exc}")
            raise

    def close(self) -> None:
        self._inner.close()


def record(violation: str) -> None:
    with _lock:
        _violations.append(violation)


def take_violations() -> list[str]:
    with _lock:
        taken = list(_violations)
        _violations.clear()
    return taken


def install() -> None:
    """Validate every response of the app that any httpx client (and so the openai SDK) receives."""
    if getattr(httpx.HTTPTransport.handle_request, "validates_openai_schema", False):
        return
    original = httpx.HTTPTransport.handle_request

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        response = original(self, request)
        if is_app_request(request):
            response.stream = ValidatingStream(response.stream, request, response)  # type: ignore[arg-type]
        return response

    handle_request.validates_openai_schema = True  # type: ignore[attr-defined]
    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
