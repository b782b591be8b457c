"""The shared rate limiter's actor SIGKILLed under traffic: fail closed briefly, count it, recover alone.

The limiter is a named, detached actor that Ray restarts (limiter_actor.py). While it is down a
limited tenant's request that needs the actor is refused with 503 `rate_limiter_unavailable` and
Retry-After (fail closed: a limit is the operator's promise, and the outage lasts seconds);
requests the ingress can admit from credit it already holds still pass. Nothing else restarts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx

from serve_app.access.limiter_actor import Exchange, Limits
from serve_app.access.limiter_client import LIMITER_NAMESPACE
from tests.support.cluster import APP_NAME, METRICS_PORT, TINY, wait_until

LIMITER = f"modelserve-limits:{APP_NAME}"
RECOVERY_BOUND_S = 20.0  # kill -> limited requests admitted again (measured: see bench/README.md)


def alive(class_name: str, name: str | None = None) -> list[Any]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    return list_actors(filters=filters + ([("name", "=", name)] if name else []))


def limiter_metric(name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and f'limiter="{LIMITER}"' in line]
    return sum(values) if values else None


def limited_requests_through_the_outage(http: httpx.Client, killed_at: float) -> tuple[list[int], float, float]:
    """Send limited requests one after another until 3 s of them pass; their statuses, recovery time, slowest."""
    body = {"model": TINY, "prompt": "hi", "max_tokens": 1}
    statuses: list[int] = []
    recovered_at, slowest = None, 0.0
    while recovered_at is None or time.monotonic() - recovered_at < 3:
        assert time.monotonic() - killed_at < RECOVERY_BOUND_S, f"not recovered: {statuses[-20:]}"
        started = time.monotonic()
        response = http.post("/v1/completions", json=body)
        slowest = max(slowest, time.monotonic() - started)
        statuses.append(response.status_code)
        if response.status_code == 503:  # fail closed, with a reason and a retry hint
            assert response.json()["error"]["code"] == "rate_limiter_unavailable", response.text
            assert response.headers["Retry-After"]
            recovered_at = None
        else:
            assert response.status_code == 200, response.text
            recovered_at = recovered_at or time.monotonic()
    return statuses, recovered_at - killed_at, slowest


def replicas() -> set[str]:
    return {a.actor_id for a in alive(f"ServeReplica:{APP_NAME}:ingress") + alive(f"ServeReplica:{TINY}:model-{TINY}")}


def requests_taken(limiter: Any) -> int:
    """How many requests the actor's `dev` bucket has handed out (the shipped policy: 600 a minute)."""
    import ray

    grant = ray.get(limiter.exchange.remote("probe", "dev", Limits(600, 1_000_000, 32), Exchange()), timeout=30)
    return 600 - grant.requests_quota.remaining


def test_the_limiter_process_killed_is_restarted(app_url: str, auth: dict[str, str]) -> None:
    """SIGKILL: Ray restarts the actor (fresh buckets) and calls made meanwhile wait for it."""
    import ray

    with httpx.Client(base_url=app_url, headers=auth, timeout=30) as http:
        assert http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 1}).status_code == 200
        [limiter] = alive("RateLimiter", LIMITER)
        before = replicas()
        os.kill(limiter.pid, signal.SIGKILL)
        statuses, recovered_s, slowest = limited_requests_through_the_outage(http, time.monotonic())
    print(f"limiter SIGKILL: {statuses.count(503)} of {len(statuses)} limited requests refused, "
          f"admitted again after {recovered_s:.1f} s, slowest request {slowest:.1f} s")
    [restarted] = wait_until(lambda: alive("RateLimiter", LIMITER), 30, "Ray to restart the limiter")
    assert restarted.pid != limiter.pid and replicas() == before  # nothing else restarted
    assert requests_taken(ray.get_actor(LIMITER, namespace=LIMITER_NAMESPACE)) > 0  # the new process admits
    wait_until(lambda: limiter_metric("ray_modelserve_limiter_available") == 1, 30, "the availability gauge")


def test_the_limiter_actor_gone_is_recreated(app_url: str, auth: dict[str, str]) -> None:
    """Killed for good (no restart): limited requests are refused (503) until the ingress creates it anew."""
    import ray

    with httpx.Client(base_url=app_url, headers=auth, timeout=30) as http:
        assert http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 1}).status_code == 200
        [limiter] = alive("RateLimiter", LIMITER)
        before, failures = replicas(), limiter_metric("ray_modelserve_limiter_failures_total") or 0.0
        ray.kill(ray.get_actor(LIMITER, namespace=LIMITER_NAMESPACE), no_restart=True)
        statuses, recovered_s, slowest = limited_requests_through_the_outage(http, time.monotonic())
    print(f"limiter killed for good: {statuses.count(503)} of {len(statuses)} limited requests refused, "
          f"admitted again after {recovered_s:.1f} s, slowest request {slowest:.1f} s")
    assert statuses.count(503) >= 1  # fail closed
    [created] = alive("RateLimiter", LIMITER)
    assert created.actor_id != limiter.actor_id and replicas() == before
    failures_now = lambda: limiter_metric("ray_modelserve_limiter_failures_total") or 0
    wait_until(lambda: failures_now() > failures, 30, "the failure count")
    wait_until(lambda: limiter_metric("ray_modelserve_limiter_available") == 1, 30, "the availability gauge")
