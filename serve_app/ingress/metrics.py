"""Ingress metrics, exported through `ray.serve.metrics` (Ray's Prometheus endpoint, prefixed `ray_`).

Recorded once per request when its response has ended (next to the audit line), plus the
time to first token when a model starts answering. Names are documented in the README.
"""

from __future__ import annotations

from typing import Any

from ray.serve import metrics

from serve_app.ingress.crash_watch import CRASH_WINDOW_S, CrashReport

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

_REJECTIONS = {401: "unauthenticated", 403: "forbidden", 429: "rate_limited"}
MAX_TAG_CHARS = 128


def tag(value: str) -> str:
    """Ray encodes metric tags as ASCII (anything else raises): a tenant named in a token may not be."""
    return value.encode("ascii", "backslashreplace").decode("ascii")[:MAX_TAG_CHARS]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "modelserve_requests", description="Requests by model, tenant and HTTP status.",
            tag_keys=("model", "tenant", "status"),
        )
        self.latency = metrics.Histogram(
            "modelserve_request_latency_seconds", description="End-to-end request latency (to the last byte).",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model",),
        )
        self.first_token = metrics.Histogram(
            "modelserve_time_to_first_token_seconds", description="Request arrival to the model's first chunk.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model",),
        )
        self.prompt_tokens = metrics.Counter(
            "modelserve_prompt_tokens", description="Prompt tokens processed.", tag_keys=("model", "tenant")
        )
        self.completion_tokens = metrics.Counter(
            "modelserve_completion_tokens", description="Completion tokens generated.", tag_keys=("model", "tenant")
        )
        self.rejections = metrics.Counter(
            "modelserve_policy_rejections", description="Requests refused by auth or policy, by reason.",
            tag_keys=("tenant", "reason"),
        )

        self.replica_deaths = metrics.Gauge(
            "modelserve_replica_deaths", description=f"Replicas of the model that died in the last {CRASH_WINDOW_S:.0f} s "
            "(crashes and OOM kills, not Serve's own stops).", tag_keys=("model",),
        )
        self.crash_looping = metrics.Gauge(
            "modelserve_model_crash_looping", description="1 while the model's replicas keep dying (it answers 503).",
            tag_keys=("model",),
        )

    def record_crashes(self, model: str, report: CrashReport) -> None:
        self.replica_deaths.set(report.deaths, tags={"model": model})
        self.crash_looping.set(int(report.crash_looping), tags={"model": model})

    def record_request(self, record: dict[str, Any]) -> None:
        """Count one finished request from its audit record.

        A 404's model is whatever the caller typed: no series of its own, or any client could mint them without end.
        """
        status = int(record["status"])
        model, tenant = tag(record.get("model") or "") if status != 404 else "", tag(record.get("tenant") or "")
        self.requests.inc(tags={"model": model, "tenant": tenant, "status": str(status)})
        self.latency.observe(record["latency_ms"] / 1000, tags={"model": model})
        if record.get("prompt_tokens"):
            self.prompt_tokens.inc(record["prompt_tokens"], tags={"model": model, "tenant": tenant})
        if record.get("completion_tokens"):
            self.completion_tokens.inc(record["completion_tokens"], tags={"model": model, "tenant": tenant})
        if status in _REJECTIONS:
            self.rejections.inc(tags={"tenant": tenant, "reason": _REJECTIONS[status]})

    def record_first_token(self, model: str, seconds: float) -> None:
        self.first_token.observe(seconds, tags={"model": model})
