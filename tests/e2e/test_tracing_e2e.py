"""OpenTelemetry tracing through the real app: one trace from the caller's `traceparent` through the ingress
to the model replica, exported over OTLP/HTTP to the session's receiver, and nothing secret in it.

The session app's ingress, tiny model and embedding model trace (tests/conftest.py) but sample no request of their own
(`sample_ratio: 0`): the spans exist because the caller sampled them.
"""

from __future__ import annotations

import secrets

import httpx

from tests.support.cluster import EMBED, TINY, TRACE_SERVICE, wait_until
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

PROMPT = "the secret prompt 7f3a9c"  # must appear in no span
INGRESS_SPANS = ("auth", "policy", "queue", "generation", "generate")  # children of the request span
REPLICA_SPANS = ("admission", "prefill", "decode")  # children of the replica's `generate`
REQUEST_SPAN = "POST /v1/chat/completions"


def whole_trace(receiver: OtlpReceiver, trace_id: str, *names: str) -> dict[str, ReceivedSpan] | None:
    """The trace's spans by name once every one named has arrived (each occurs once)."""
    spans = {span.name: span for span in receiver.trace(trace_id)}
    return spans if set(names) <= set(spans) else None


def traced_headers(token: str) -> tuple[dict[str, str], str, str]:
    """Headers of a caller that samples its trace: the bearer token and a new `traceparent`; its trace and span."""
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    return {"Authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-{caller_span}-01"}, trace_id, caller_span


def test_a_chat_request_is_one_trace_through_the_ingress_and_the_replica(
    app_url: str, otlp_receiver: OtlpReceiver, token: str
) -> None:
    receiver = otlp_receiver
    unsampled = httpx.post(f"{app_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                           json={"model": TINY, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
    assert unsampled.status_code == 200, unsampled.text
    _, unsampled_trace, _, unsampled_flags = unsampled.headers["traceresponse"].split("-")
    assert unsampled_flags in ("00", "02")  # sample_ratio 0 and no traceparent: not sampled (02: a random trace id)

    headers, trace_id, caller_span = traced_headers(token)
    body = {"model": TINY, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{app_url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert response.headers["traceresponse"].split("-")[1] == trace_id  # the caller learns its trace's span

    spans = wait_until(lambda: whole_trace(receiver, trace_id, REQUEST_SPAN, *INGRESS_SPANS, *REPLICA_SPANS), 30,
                       "the ingress's and the replica's spans")
    request, generate = spans[REQUEST_SPAN], spans["generate"]
    assert request.parent_span_id == caller_span
    assert response.headers["traceresponse"].split("-")[2] == request.span_id
    assert {name: spans[name].parent_span_id for name in INGRESS_SPANS} == dict.fromkeys(INGRESS_SPANS, request.span_id)
    assert {name: spans[name].parent_span_id for name in REPLICA_SPANS} == dict.fromkeys(REPLICA_SPANS, generate.span_id)
    assert request.attributes | {"modelserve.tenant": "dev", "modelserve.model": TINY,
                                 "http.route": "/v1/chat/completions", "http.response.status_code": 200} \
        == request.attributes
    assert (request.resource["service.name"], request.resource["modelserve.component"]) == (TRACE_SERVICE, "ingress")
    assert (generate.resource["service.name"], generate.resource["modelserve.component"]) == (TRACE_SERVICE, "model")
    assert generate.resource["modelserve.model"] == TINY and generate.attributes["modelserve.tenant"] == "dev"
    assert spans["prefill"].attributes["modelserve.prompt_tokens"] > 0
    assert 0 < generate.attributes["modelserve.completion_tokens"] <= 8

    assert receiver.trace(unsampled_trace) == []  # exported before the sampled trace's spans, had there been any
    everything = repr([(span.name, span.attributes, span.resource, span.events) for span in receiver.spans])
    assert PROMPT not in everything and token not in everything and token.split(".")[2] not in everything


def test_an_embeddings_request_is_traced_into_the_replica(
    app_url: str, otlp_receiver: OtlpReceiver, token: str
) -> None:
    headers, trace_id, caller_span = traced_headers(token)
    response = httpx.post(f"{app_url}/v1/embeddings", json={"model": EMBED, "input": [PROMPT, "two"]},
                          headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    spans = wait_until(lambda: whole_trace(otlp_receiver, trace_id, "POST /v1/embeddings", "auth", "policy", "embed"),
                       30, "the embeddings request's spans")
    request, embed = spans["POST /v1/embeddings"], spans["embed"]
    assert request.parent_span_id == caller_span and request.attributes["modelserve.model"] == EMBED
    assert embed.parent_span_id == request.span_id and embed.attributes["modelserve.inputs"] == 2
    assert (embed.resource["modelserve.component"], embed.resource["modelserve.model"]) == ("model", EMBED)
    assert PROMPT not in repr([(span.attributes, span.events) for span in spans.values()])
