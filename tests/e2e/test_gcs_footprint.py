"""Requests leave nothing behind in Ray's GCS, so the head's memory does not grow with traffic.

Ray keeps a task event in the GCS for every actor call that records them (up to its 100,000-task
cap): the ingress's per-request calls to the usage ledger and the rate limiter did, and a 20-minute
soak grew the GCS by ~200 MB (bench/README.md). Serve's own handle calls record none.
"""

from __future__ import annotations

import time

import httpx

from tests.support.cluster import TINY, wait_until

REPORT_INTERVAL_S = 1.0  # Ray's task_events_report_interval_ms: how often each process sends its task events


def recorded(name: str) -> list[object]:
    from ray.util.state import list_tasks

    return list_tasks(filters=[("func_or_class_name", "=", name)], limit=1000, raise_on_missing_output=False)


def test_requests_record_no_task_events_in_the_gcs(app_url: str, auth: dict[str, str]) -> None:
    import ray

    with httpx.Client(base_url=app_url, headers=auth, timeout=60) as http:
        for _ in range(5):
            response = http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 1})
            assert response.status_code == 200, response.text

    def footprint_marker() -> None:
        """A task that records its events as Ray's tasks do by default."""

    ray.get(ray.remote(footprint_marker).remote())
    # Task events are on in this cluster (the marker's reach the GCS); by the time they have, and two more
    # report intervals have passed, every process has sent what the requests above recorded.
    wait_until(lambda: recorded("footprint_marker"), 30, "the marker task's events in the GCS")
    time.sleep(2 * REPORT_INTERVAL_S)
    assert recorded("UsageLedger.settle") == []
    assert recorded("RateLimiter.exchange") == []
