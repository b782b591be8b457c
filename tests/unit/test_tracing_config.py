"""The `tracing:` sections of the ingress and model args, and the replica's spans of a generation (no Ray)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer

from deployments.api import STARTED, GenerationChunk, GenerationRequest
from deployments.generation_trace import GenerationTrace
from deployments.strict import ConfigError
from deployments.tracing import Tracing, TracingSettings, traceparent
from serve_app.access.envelope import audit_record
from serve_app.config import parse_ingress_args, parse_model_args

ENDPOINT = "http://collector:4318/v1/traces"
MODEL = {"name": "m", "source": "/models/m.gguf"}


def ingress_tracing(tracing: dict[str, object]) -> TracingSettings:
    return parse_ingress_args({"ingress": {"tracing": tracing}}).ingress.tracing


def test_tracing_is_off_by_default_and_then_traces_nothing() -> None:
    settings = parse_ingress_args({}).ingress.tracing
    assert not settings.enabled and parse_model_args({"model": MODEL}).tracing == settings
    assert isinstance(Tracing(settings, "ingress").tracer, NoOpTracer)


def test_an_enabled_section_is_read_whole() -> None:
    settings = ingress_tracing({"enabled": True, "otlp_endpoint": ENDPOINT, "service_name": "llm", "sample_ratio": 0.25})
    assert (settings.otlp_endpoint, settings.service_name, settings.sample_ratio) == (ENDPOINT, "llm", 0.25)
    tracing = Tracing(settings, "ingress")
    try:
        assert tracing.enabled and not isinstance(tracing.tracer, NoOpTracer)
    finally:
        tracing.shutdown()


def test_model_defaults_carry_tracing_to_every_model() -> None:
    spec = parse_model_args({"model": MODEL, "model_defaults": {"tracing": {"enabled": True, "otlp_endpoint": ENDPOINT}}})
    assert spec.tracing.enabled and spec.tracing.otlp_endpoint == ENDPOINT


@pytest.mark.parametrize(("tracing", "message"), [
    ({"enabled": True}, "ingress.tracing: Value error, tracing.enabled needs tracing.otlp_endpoint"),
    ({"endpoint": ENDPOINT}, "ingress.tracing.endpoint: Extra inputs are not permitted"),
    ({"otlp_endpoint": "collector:4318"}, "ingress.tracing.otlp_endpoint: Value error, must be an http://"),
    ({"otlp_endpoint": "grpc://collector:4317"}, "ingress.tracing.otlp_endpoint: Value error, must be an http://"),
    ({"otlp_endpoint": "https://user:pw@collector/v1/traces"}, "must not hold credentials"),
    ({"sample_ratio": 1.5}, "ingress.tracing.sample_ratio: Input should be less than or equal to 1"),
    ({"sample_ratio": -0.1}, "ingress.tracing.sample_ratio: Input should be greater than or equal to 0"),
    ({"service_name": ""}, "ingress.tracing.service_name: String should have at least 1 character"),
    ({"enabled": "sometimes"}, "ingress.tracing.enabled: Input should be a valid boolean"),
])
def test_a_bad_tracing_section_is_refused_naming_the_field(tracing: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid modelserve ingress config") as refused:
        ingress_tracing(tracing)
    assert message in str(refused.value)


def test_a_model_refuses_a_bad_tracing_section_and_vllm_refuses_tracing() -> None:
    with pytest.raises(ConfigError, match=r"model\.tracing\.sample_ratio"):
        parse_model_args({"model": {**MODEL, "tracing": {"sample_ratio": 2}}})
    vllm = {"name": "v", "backend": "vllm", "source": "s3://models/v/", "tracing": {"enabled": True,
                                                                                     "otlp_endpoint": ENDPOINT}}
    with pytest.raises(ConfigError, match="tracing.enabled: a vllm model's replica records no spans"):
        parse_model_args({"model": vllm})


def replica_spans(request: GenerationRequest, items: list[object], error: BaseException | None = None) -> dict:
    """The spans GenerationTrace records for a stream of `items` (then `error`, if any), by name."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with contextlib.suppress(type(error) if error else ()), \
            GenerationTrace(provider.get_tracer("test"), request, "m") as spans:
        for item in items:
            spans.observe(item)
        if error:
            raise error
    return {span.name: span for span in exporter.get_finished_spans()}


def test_the_replica_spans_join_the_callers_trace_and_hold_counts_not_text() -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = GenerationRequest("r1", messages=({"role": "user", "content": "secret words"},), tenant="t",
                                weight=3.0, trace_context=caller)
    chunks = [GenerationChunk("hel", 5, 1, cached_tokens=2), GenerationChunk("lo", 5, 2, "stop")]
    spans = replica_spans(request, [STARTED, *chunks])
    generate = spans["generate"]
    assert f"{generate.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{generate.parent.span_id:016x}" == "b7ad6b7169203331"
    assert {spans[name].parent.span_id for name in ("admission", "prefill", "decode")} == {generate.context.span_id}
    assert spans["admission"].end_time <= spans["prefill"].start_time <= spans["prefill"].end_time
    assert spans["prefill"].end_time <= spans["decode"].start_time
    assert dict(spans["prefill"].attributes) == {"modelserve.prompt_tokens": 5, "modelserve.cached_tokens": 2}
    assert generate.attributes["modelserve.tenant_weight"] == 3.0
    assert generate.attributes["modelserve.completion_tokens"] == 2 and generate.status.is_ok
    assert "secret" not in repr([dict(span.attributes) for span in spans.values()])


def test_a_failed_generation_is_an_error_span_and_a_cancelled_one_is_not() -> None:
    failed = replica_spans(GenerationRequest("r2"), [STARTED], RuntimeError("the prompt 'secret words' broke"))
    assert not failed["generate"].status.is_ok and "secret" not in (failed["generate"].status.description or "")
    cancelled = replica_spans(GenerationRequest("r3"), [STARTED], asyncio.CancelledError())
    assert cancelled["generate"].status.is_ok and cancelled["generate"].attributes["modelserve.cancelled"]


def test_the_audit_line_names_the_trace_while_tracing() -> None:
    scope = {"method": "POST", "path": "/v1/completions"}
    with TracerProvider().get_tracer("test").start_as_current_span("request") as span:
        assert audit_record(scope, 200, 0.0, None)["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert "trace_id" not in audit_record(scope, 200, 0.0, None)


def test_traceparent_names_the_current_span_only_while_tracing() -> None:
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("request") as span:
        context = span.get_span_context()
        assert traceparent() == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        assert context.trace_flags.sampled
    assert traceparent() is None
    with NoOpTracer().start_as_current_span("request"):
        assert traceparent() is None
