"""OpenTelemetry tracing, opt-in by config (`tracing:`): its settings, a process's tracer, W3C trace context.

The ingress and every model replica export their own spans over OTLP/HTTP to one collector. A request's
spans form one trace because the ingress hands its request span's context to the replica as a W3C
`traceparent` string inside the request (`GenerationRequest.trace_context`). Each process keeps a
TracerProvider of its own rather than OpenTelemetry's global one, which Ray Serve's own tracing may claim.
Spans carry names, ids, counts and the tenant: never prompt text, output or credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field, field_validator, model_validator

from deployments.strict import Strict

PROPAGATOR = TraceContextTextMapPropagator()


class TracingSettings(Strict):
    """Where this process sends its spans, and which requests it traces. Off unless `enabled`."""

    enabled: bool = False
    otlp_endpoint: str | None = Field(
        None, description="The collector's OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces. Collector "
        "credentials go in OTEL_EXPORTER_OTLP_TRACES_HEADERS, never here."
    )
    service_name: str = Field("modelserve", min_length=1, max_length=128, description="The spans' service.name.")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of requests traced when no sampled or unsampled `traceparent` came "
        "with them; a caller's decision is always followed."
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http:// or https:// URL, e.g. http://collector:4318/v1/traces")
        if url.username or url.password:
            raise ValueError("must not hold credentials: put the collector's in OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        return value

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> TracingSettings:
        if self.enabled and self.otlp_endpoint is None:
            raise ValueError("tracing.enabled needs tracing.otlp_endpoint (the collector's OTLP/HTTP traces URL)")
        return self


class Tracing:
    """One process's tracer, exporting in batches from a background thread; a no-op tracer while tracing is off."""

    def __init__(self, settings: TracingSettings, component: str, attributes: Mapping[str, str] | None = None) -> None:
        self.enabled = settings.enabled
        self._provider: TracerProvider | None = None
        if not settings.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        resource = Resource.create(
            {"service.name": settings.service_name, "modelserve.component": component, **(attributes or {})}
        )
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self._provider = TracerProvider(resource=resource, sampler=sampler)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        self.tracer = self._provider.get_tracer("modelserve")

    def shutdown(self) -> None:
        """Export what is still buffered (a replica going away)."""
        if self._provider is not None:
            self._provider.shutdown()


def remote_parent(carrier: Mapping[str, str]) -> Context:
    """The context a W3C `traceparent` (and `tracestate`) names; an absent or malformed one starts a new trace."""
    return PROPAGATOR.extract(carrier)


def traceparent(span: trace.Span | None = None) -> str | None:
    """The W3C `traceparent` of `span` (default: the current one); None without a valid span (tracing off)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return carrier.get("traceparent")
