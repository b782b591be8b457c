"""Request size limits, enforced before anything else spends CPU on a request (authentication included).

Headers over `max_header_bytes` get 431 and a body over `max_body_bytes` 413, as OpenAI error
objects: a declared Content-Length is refused before a byte is read, and a chunked body as soon as
it passes the limit. The number of chat messages is bounded in the protocol models, and the prompt's
text by `max_prompt_chars` (400 `context_length_exceeded`) before a model replica spends any time on it.
"""

from __future__ import annotations

from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.strict import Strict
from serve_app.ingress.errors import error_response
from serve_app.ingress.protocol import OpenAIError

KIB, MIB = 1024, 1024 * 1024


class RequestLimits(Strict):
    """How big one request may be. The defaults hold a full 128k-token conversation with room to spare."""

    max_body_bytes: int = Field(8 * MIB, ge=KIB, description="Request body; over it: 413.")
    max_header_bytes: int = Field(32 * KIB, ge=KIB, description="All header names and values together; over: 431.")
    max_prompt_chars: int = Field(
        2 * MIB, ge=KIB, description="Characters of prompt text (chat messages, a prompt, embedding inputs); over it: "
        "400 context_length_exceeded at once, where a replica would tokenize it all to say the same.",
    )


def check_prompt_size(limits: RequestLimits, chars: int, param: str) -> None:
    """Refuse a prompt no model's context holds before it costs a replica any tokenizing."""
    if chars > limits.max_prompt_chars:
        message = (f"The prompt is {chars} characters; this server accepts at most {limits.max_prompt_chars} "
                   "per request, far more than a model's context holds.")
        raise OpenAIError(400, message, param=param, code="context_length_exceeded")


class SizeGate:
    """Pure ASGI middleware; reads the replica's limits from `app.state.request_limits` (defaults until set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits: RequestLimits = getattr(scope["app"].state, "request_limits", None) or RequestLimits()
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > limits.max_header_bytes:
            message = f"Request headers are {header_bytes} bytes; this server accepts at most {limits.max_header_bytes}."
            await error_response(OpenAIError(431, message, code="request_header_fields_too_large"))(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limits.max_body_bytes:
            await _too_large(limits, scope, receive, send)
            return
        received, refused = 0, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    refused = True
                    await _too_large(limits, scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading; what it sends is dropped
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(limits: RequestLimits, scope: Scope, receive: Receive, send: Send) -> None:
    message = f"The request body is larger than this server accepts ({limits.max_body_bytes} bytes)."
    await error_response(OpenAIError(413, message, code="request_too_large"))(scope, receive, send)
