"""A model whose replicas keep dying is reported failed with the reason, and answers 503 at once.

Serve replaces a dead replica and calls the deployment healthy again as soon as the new one has
loaded. Here a real replica process is killed with SIGSEGV three times (what llama.cpp's AMX crash
does to it on the first decode); the ingress must see the loop in Ray's actor table.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.cli.local import probe_model
from serve_app.ingress.crash_watch import CRASH_THRESHOLD, replica_class_name
from tests.support.cluster import GEMMA, METRICS_PORT, deploy_with, model_app, model_defaults, model_states, wait_until

CRASHY = "tiny-crashy"


def alive_replica() -> Any:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", replica_class_name(CRASHY, f"model-{CRASHY}")),
                                 ("state", "=", "ALIVE")])
    return alive[0] if len(alive) == 1 else None


def metric(name: str, model: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and f'model="{model}"' in line]
    return max(values) if values else None


@pytest.fixture
def crashy(config_path: Path, tiny_path: Path, tmp_path: Path) -> Any:
    defaults = model_defaults(config_path)
    deploy_with(config_path, tmp_path, model_app(CRASHY, str(tiny_path), defaults, engine={"n_ctx": 256},
                                                 deployment={"num_replicas": 1}))
    yield
    deploy_with(config_path, tmp_path, None)


def test_admin_status_shows_each_models_placement(admin: httpx.Client) -> None:
    gemma = model_states(admin)[GEMMA]
    placement = gemma["placement"]
    assert placement["threads"] == placement["ray_cpus_per_replica"] == 2 and placement["slots"] == 4
    assert placement["weight_repack"].startswith(("on (", "off ("))
    assert gemma["replica_deaths"] == 0 and gemma["last_crash_output"] == []


def test_a_crash_looping_model_is_failed_with_its_reason(
    crashy: None, client: openai.OpenAI, admin: httpx.Client
) -> None:
    assert client.completions.create(model=CRASHY, prompt="hi", max_tokens=2).usage.completion_tokens > 0
    assert model_states(admin)[CRASHY]["state"] == "ready"
    for _ in range(CRASH_THRESHOLD):
        replica = wait_until(alive_replica, 120, "a running replica")
        wait_until(lambda: model_states(admin)[CRASHY]["running_replicas"] == 1, 120, "the replica to serve")
        os.kill(replica.pid, signal.SIGSEGV)
        wait_until(lambda r=replica: (alive_replica() or r).actor_id != r.actor_id, 120, "Serve's replacement")

    card = wait_until(
        lambda: next((m for m in client.models.list().data if m.id == CRASHY and
                      m.model_extra["status"]["message"].startswith("crash loop")), None), 60, "the crash loop",
    )
    reason = card.model_extra["status"]["message"]
    assert card.model_extra["status"]["state"] == "failed"
    assert reason.startswith(f"crash loop: {CRASH_THRESHOLD} replicas died") and "SIGSEGV" in reason, reason

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=CRASHY, prompt="hi", max_tokens=2)
    assert time.monotonic() - started < 5  # at once, not after the first-token timeout
    assert refused.value.status_code == 503 and refused.value.body["code"] == "model_unavailable"
    assert "SIGSEGV" in refused.value.body["message"] and refused.value.response.headers["Retry-After"]

    # What `modelserve up` prints for such a model instead of "up".
    problem = probe_model(str(admin.base_url).rstrip("/"), admin.headers["Authorization"].split()[1], CRASHY, 1)
    assert problem and problem.startswith(f"{CRASHY}: failed: crash loop") and "SIGSEGV" in problem, problem

    status = model_states(admin)[CRASHY]
    assert status["state"] == "failed" and status["replica_deaths"] == CRASH_THRESHOLD
    assert any("SIGSEGV" in line for line in status["last_crash_output"])
    assert model_states(admin)[GEMMA]["state"] == "ready"  # the other models are unaffected
    wait_until(lambda: metric("ray_modelserve_model_crash_looping", CRASHY) == 1, 60, "the crash-loop gauge")
    assert metric("ray_modelserve_replica_deaths", CRASHY) == CRASH_THRESHOLD
