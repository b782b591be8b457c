"""The ingress's spans (tracing opt-in by `ingress.tracing`): one server span per request, and its stream's phases.

`TracingMiddleware` opens the request span as the child of the caller's W3C `traceparent` (a new trace
without one) around everything inside it, authentication included, names it by its route and tags it with
model, tenant and status once the response has ended, and answers with a `traceresponse` header naming it
(W3C Trace Context Level 2), so a caller finds its trace. `StreamSpans` time a model call: `queue` until
the replica's STARTED, then `generation` until the stream ends. Never the prompt, output or credential.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.tracing import Tracing, remote_parent
from serve_app.access.envelope import OPEN_PATHS, route_path

TRACE_HEADERS = ("traceparent", "tracestate")


class TracingMiddleware:
    """Needs `app.state.tracing` (the ingress replica sets it); passes requests through while tracing is off."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracing: Tracing | None = getattr(scope["app"].state, "tracing", None)
        if scope["type"] != "http" or tracing is None or not tracing.enabled or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        parent = remote_parent({name: headers[name] for name in TRACE_HEADERS if name in headers})
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": route_path(scope)}
        with tracing.tracer.start_as_current_span(f"{method} {route_path(scope)}", context=parent, kind=SpanKind.SERVER,
                                                  attributes=attributes, record_exception=False,
                                                  set_status_on_exception=False) as span:
            status = 500  # what the client gets if the app raises before answering

            async def send_traced(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": [*message.get("headers", []), *traceresponse(span)]}
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                describe(span, scope, status)


def traceresponse(span: trace.Span) -> list[tuple[bytes, bytes]]:
    """The `traceresponse` header naming the request span (none for an invalid span)."""
    context = span.get_span_context()
    if not context.is_valid:
        return []
    value = f"00-{format_trace_id(context.trace_id)}-{format_span_id(context.span_id)}-{int(context.trace_flags):02x}"
    return [(b"traceresponse", value.encode())]


def describe(span: trace.Span, scope: Scope, status: int) -> None:
    """What is known once the response has ended: the route template, status, model and tenant."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        span.update_name(f"{scope['method']} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    account = scope.get("state", {}).get("account")
    if account is not None:
        span.set_attribute("modelserve.tenant", account.principal.tenant)
        if account.model:
            span.set_attribute("modelserve.model", account.model)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


class StreamSpans:
    """A model call's `queue` span (send to the replica's STARTED), then its `generation` span (to the end)."""

    def __init__(self, tracer: trace.Tracer, model: str) -> None:
        self._tracer, self._model = tracer, model
        self._queue: trace.Span | None = tracer.start_span("queue", attributes={"modelserve.model": model})
        self._generation: trace.Span | None = None

    def started(self) -> None:
        if self._queue is not None:
            self._queue.end()
            self._queue = None
            self._generation = self._tracer.start_span("generation", attributes={"modelserve.model": self._model})

    def first_chunk(self) -> None:
        if self._generation is not None:
            self._generation.add_event("first chunk")

    def end(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Idempotent: the stream is cancelled from several places however it ends."""
        if self._queue is not None:  # refused or failed before a slot took it
            self._queue.set_attribute("modelserve.started", False)
            self._queue.end()
            self._queue = None
        if self._generation is not None:
            self._generation.set_attributes({"modelserve.prompt_tokens": prompt_tokens,
                                             "modelserve.completion_tokens": completion_tokens})
            self._generation.end()
            self._generation = None
