"""End-of-request bookkeeping: settle the rate-limit lease, add rate-limit headers, write one audit line.

A pure ASGI middleware, so it sees every way a response ends (sent, error, client gone mid-stream) and
runs after a streamed body has finished. The audit line carries who, what, status, token counts and
latency as JSON; never the prompt, the output or the credential.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("modelserve.audit")


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})  # shared with `request.state` in the handlers
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                account = state.get("account")
                if account is not None:
                    extra = [(k.encode(), v.encode()) for k, v in account.rate_headers().items()]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            account = state.get("account")
            if account is not None:
                account.settle()
            logger.info(json.dumps(audit_record(scope, status, started, account), separators=(",", ":")))


def audit_record(scope: Scope, status: int, started: float, account: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event": "request",
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if account is not None:
        record |= {
            "tenant": account.principal.tenant,
            "subject": account.principal.subject,
            "model": account.model,
            "prompt_tokens": account.prompt_tokens,
            "completion_tokens": account.completion_tokens,
            "policy": account.revision,
        }
    return record
