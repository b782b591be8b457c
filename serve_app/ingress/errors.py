"""Every failure as an OpenAI error object with a meaningful status: nothing answers a bare 500 or a 422.

`install_error_handlers` maps what FastAPI and Starlette raise; `model_error` maps what a model
deployment raises (possibly wrapped by Ray). Both end in `error_response`, the one place an error
becomes a response.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.api import ContextLengthExceeded, EngineError, EngineUnavailable
from serve_app.ingress.protocol import OpenAIError
from serve_app.ingress.responses import ModelStatus

logger = logging.getLogger("modelserve.ingress")

RETRY_AFTER_S = "1"  # overload or a replica failure: another replica or a free slot is usually a moment away
FAILED_MODEL_RETRY_AFTER_S = "30"  # a failed model: a crash loop clears within minutes, a failed deploy needs one


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI answers 422; OpenAI clients expect 400 invalid_request_error naming the field."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    where = list(first.get("loc", ()))
    loc = [part for part in where[where[:1] in (["body"], ["query"]):] if not _union_member(part)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "json_invalid":
        message, param = "We could not parse the JSON body of your request: " + first.get("msg", ""), None
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'." if param else "Missing request body."
    else:
        message = f"Invalid value for '{param}': {first.get('msg')}." if param else str(first.get("msg"))
    return OpenAIError(400, message, param=param, code="invalid_request")


def _union_member(part: str | int) -> bool:
    """Pydantic names the union member it tried in an error's location (`str`, `list[ContentPart]`): not a field."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or not part.isidentifier())


def install_error_handlers(app: FastAPI) -> None:
    """Answer OpenAI errors, validation errors, HTTP errors (404, 405) and anything unexpected as OpenAI errors."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}  # 400: a body that is no JSON
        return error_response(
            OpenAIError(exc.status_code, str(exc.detail), code=kinds.get(exc.status_code), headers=exc.headers)
        )

    @app.exception_handler(Exception)
    async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in ingress")
        return error_response(
            OpenAIError(500, "The server had an error while processing your request.", type="server_error")
        )


def overloaded(model: str, why: str, retry_after_s: float = 1.0) -> OpenAIError:
    """503 with the wait in whole seconds (`Retry-After`) and exactly (`retry-after-ms`, which the OpenAI SDK prefers)."""
    message = f"Model '{model}' is overloaded: {why}. Retry shortly."
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))), "retry-after-ms": str(round(retry_after_s * 1000))}
    return OpenAIError(503, message, type="server_error", code="model_overloaded", headers=headers)


def unavailable(model: str, status: ModelStatus) -> OpenAIError:
    """A failed model answers at once rather than after the first-token timeout."""
    return OpenAIError(503, f"Model '{model}' is unavailable: {status.message}", type="server_error",
                       code="model_unavailable", headers={"Retry-After": FAILED_MODEL_RETRY_AFTER_S})


def model_error(exc: BaseException, model: str) -> OpenAIError:
    """Map a failure from a model deployment (possibly wrapped by Ray) to an OpenAI error."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    retry = {"Retry-After": RETRY_AFTER_S}
    if isinstance(cause, ContextLengthExceeded):
        return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
    if isinstance(cause, EngineUnavailable):
        return OpenAIError(503, cause.message, type="server_error", code=cause.code, headers=retry)
    if isinstance(cause, EngineError):
        return OpenAIError(400, cause.message, param=cause.param, code=cause.code)
    if isinstance(cause, BackPressureError):
        return overloaded(model, "too many requests are queued")
    if isinstance(cause, TimeoutError):
        message = f"Model '{model}' is not ready (no replica answered in time). Retry shortly."
        return OpenAIError(503, message, type="server_error", code="model_not_ready", headers=retry)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, RayTaskError)):
        logger.warning("model %s replica failure: %s", model, cause)
        message = f"Model '{model}' is unavailable (replica failure). Retry shortly."
        return OpenAIError(503, message, type="server_error", code="model_unavailable", headers=retry)
    logger.error("unexpected error from model %s: %r", model, cause)
    return OpenAIError(500, "The server had an error while processing your request.", type="server_error")


# What each kind of route really answers besides 200 (FastAPI would document a 422 that never comes).
_AUTHENTICATED = {401: "Missing, malformed, expired or wrongly signed credential.",
                  413: "Request body too large.", 431: "Request headers too large."}
_GENERATION = {400: "Invalid or unsupported request field (`param` names it), or prompt over the context.",
               404: "Unknown model, or one outside the caller's allowlist.",
               429: "Over a tenant's rate, token or concurrency limit, or a token quota (`quota_exceeded`; "
                    "`Retry-After` until it resets).",
               503: "Model overloaded, not ready, or failed (`Retry-After`)."}
_EXTRA = {("post", "/v1/chat/completions"): _GENERATION, ("post", "/v1/completions"): _GENERATION,
          ("post", "/v1/embeddings"): _GENERATION,
          ("get", "/v1/models/{model_id}"): {404: _GENERATION[404]},
          ("get", "/v1/admin/status"): {403: "The caller lacks the admin role."},
          ("get", "/v1/admin/usage"): {400: "Invalid filter (`param` names it).", 403: "The caller lacks the admin role.",
                                       503: "Usage accounting unavailable (`Retry-After`)."}}


def document_errors(app: FastAPI) -> None:
    """Make the app's OpenAPI document list the error responses it really gives, as OpenAI error objects."""
    from fastapi.openapi.utils import get_openapi

    from serve_app.ingress.protocol import ErrorResponse

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(error_schema.pop("$defs", {}), ErrorResponse=error_schema)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    extra = {} if path == "/health" else {**_AUTHENTICATED, **_EXTRA.get((method, path), {})}
                    for status, description in extra.items():
                        responses[str(status)] = {"description": description, **error}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
