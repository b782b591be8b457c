"""A model replica's spans of one generation, read off its stream, so any engine's requests are traced alike.

`generate` (a server span, child of the ingress span named by the request's `trace_context`) holds three
phases: `admission` until the engine's STARTED (the wait in the replica's fair queue), `prefill` until the
first chunk (prompt rendering, tokenizing and prefill up to the first token), `decode` until the end.
Attributes are ids, the tenant, its weight and token counts: never prompt text or output.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from deployments.api import GenerationChunk, GenerationRequest, Started
from deployments.tracing import remote_parent

if TYPE_CHECKING:
    from typing_extensions import Self


class GenerationTrace:
    """Use as a context manager around the stream and `observe` each item; it closes the spans however it ends."""

    def __init__(self, tracer: trace.Tracer, request: GenerationRequest, model: str) -> None:
        parent = remote_parent({"traceparent": request.trace_context} if request.trace_context else {})
        self._tracer = tracer
        self._span = tracer.start_span("generate", context=parent, kind=SpanKind.SERVER, attributes={
            "modelserve.model": model, "modelserve.request_id": request.request_id, "modelserve.tenant": request.tenant,
            "modelserve.tenant_weight": request.weight, "modelserve.priority": request.priority,
            "modelserve.choices": request.sampling.n,
        })
        self._inside = trace.set_span_in_context(self._span)
        self._phase = tracer.start_span("admission", context=self._inside)
        self._choices, self._finished = request.sampling.n, 0
        self._last: GenerationChunk | None = None

    def observe(self, item: Started | GenerationChunk) -> None:
        if isinstance(item, Started):
            self._next_phase("prefill")
            return
        if self._last is None:
            self._phase.set_attributes({"modelserve.prompt_tokens": item.prompt_tokens,
                                        "modelserve.cached_tokens": item.cached_tokens})
            self._next_phase("decode")
        self._last = item
        self._finished += item.finish_reason is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None) -> None:
        if self._last is not None:
            self._span.set_attributes({"modelserve.prompt_tokens": self._last.prompt_tokens,
                                       "modelserve.completion_tokens": self._last.completion_tokens})
        if error is not None and self._finished < self._choices:
            if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
                self._span.set_attribute("modelserve.cancelled", True)
            else:  # the error's type only: an engine's message may quote the request
                self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                self._span.set_attribute("error.type", getattr(error, "code", type(error).__name__))
        self._phase.end()
        self._span.end()

    def _next_phase(self, name: str) -> None:
        self._phase.end()
        self._phase = self._tracer.start_span(name, context=self._inside)
