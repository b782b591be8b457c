"""The envelope of every ingress request: authenticate first, then settle, add headers and audit last.

A pure ASGI middleware, so authentication happens before routing and body parsing (a caller without a
valid credential gets 401 whatever it sent), and the end-of-request work sees every way a response ends:
sent, failed, or the client gone mid-stream, after a streamed body has finished. The audit line is JSON
with who, what, status, token counts and latency; never the prompt, the output or the credential.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.access.gate import AccessGate, RequestAccount
from serve_app.ingress.protocol import OpenAIError

logger = logging.getLogger("ray.serve.modelserve.audit")  # under Serve's logger: lands in the replica log

OPEN_PATHS = frozenset({"/health"})


class AccessMiddleware:
    """Needs `app.state.access_gate` (the ingress replica sets it); the account goes to `request.state`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})  # shared with `request.state` in the handlers
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        account: RequestAccount | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(k.encode(), v.encode()) for k, v in account.rate_headers().items()] if account else []
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            gate: AccessGate = scope["app"].state.access_gate
            try:
                account = state["account"] = await gate.authenticate(Headers(scope=scope).get("authorization"))
            except OpenAIError as refused:
                status = refused.status
                response = JSONResponse(refused.body.model_dump(), refused.status, headers=refused.headers)
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            if account is not None:
                account.settle()
            record = audit_record(scope, status, started, account)
            logger.info(json.dumps(record, separators=(",", ":")))
            scope["app"].state.metrics.record_request(record)


def route_path(scope: Scope) -> str:
    """The path inside the app: Serve mounts it under its route_prefix, which arrives as `root_path`."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def current_trace_id() -> str | None:
    """The request's trace id as 32 hex digits (its span is current while tracing is on); None otherwise."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def audit_record(scope: Scope, status: int, started: float, account: RequestAccount | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event": "request",
        "method": scope.get("method"),
        "path": route_path(scope),
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if trace_id := current_trace_id():
        record["trace_id"] = trace_id
    if account is not None:
        record |= {
            "tenant": account.principal.tenant,
            "subject": account.principal.subject,
            "model": account.model,
            "prompt_tokens": account.prompt_tokens,
            "completion_tokens": account.completion_tokens,
            "policy": account.revision,
            **account.client_ids,
        }
    return record
