"""Scaling and lifecycle on real Ray: scale from zero, up under a burst, back down; models added and removed
by `serve deploy`; model states in /v1/models and the admin status; metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.cluster import (
    GEMMA,
    METRICS_PORT,
    TINY,
    TINY_ZERO,
    deploy_with,
    model_app,
    model_defaults,
    model_states,
    wait_until,
)

LONG = {"model": TINY_ZERO, "prompt": "hello there", "max_tokens": 480, "temperature": 0}


def test_models_report_their_state(client: openai.OpenAI, admin: httpx.Client) -> None:
    cards = {m.id: m.model_extra["status"] for m in client.models.list().data}
    assert cards[GEMMA]["state"] == "ready" and cards[GEMMA]["running_replicas"] == 1
    assert cards[TINY_ZERO]["state"] == "at_zero" and cards[TINY_ZERO]["running_replicas"] == 0
    states = model_states(admin)
    assert set(states) == set(cards) and states[TINY]["deployment"] == f"model-{TINY}"
    assert states[TINY]["application"] == TINY


def test_admin_status_needs_the_admin_role(app_url: str, auth: dict[str, str]) -> None:
    response = httpx.get(f"{app_url}/v1/admin/status", headers=auth, timeout=30)
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


def test_scale_from_zero_up_under_a_burst_and_back_to_zero(client: openai.OpenAI, admin: httpx.Client) -> None:
    assert model_states(admin)[TINY_ZERO]["running_replicas"] == 0
    first = client.completions.create(model=TINY_ZERO, prompt="hello", max_tokens=4, temperature=0)
    assert first.usage.completion_tokens > 0  # answered after scaling up from zero

    # Long requests queued on replicas that take one at a time: the autoscaler adds a second replica.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(client.completions.create, **LONG) for _ in range(8)]
        wait_until(lambda: model_states(admin)[TINY_ZERO]["running_replicas"] == 2, 90, "a second replica")
        assert all(f.result().usage.completion_tokens > 0 for f in burst)

    wait_until(lambda: model_states(admin)[TINY_ZERO]["state"] == "at_zero", 90, "scale back to zero")


def replica_ids() -> dict[str, set[str]]:
    """Live replica actor ids per Serve deployment, from Ray's state API (SERVE_REPLICA::app#deployment#id)."""
    from ray.util.state import list_actors

    replicas: dict[str, set[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        if (actor.name or "").startswith("SERVE_REPLICA::"):
            app, deployment, _ = actor.name.removeprefix("SERVE_REPLICA::").split("#")
            replicas.setdefault(f"{app}/{deployment}", set()).add(actor.actor_id)
    return replicas


def test_adding_and_removing_a_model_by_serve_deploy_restarts_nothing_else(
    config_path: Path, tiny_path: Path, tmp_path: Path, app_url: str, token: str
) -> None:
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key=token, max_retries=0, timeout=120)
    assert client.completions.create(model=TINY, prompt="hi", max_tokens=3).usage.completion_tokens > 0
    # Every fixed-size deployment's replicas (the autoscaled model comes and goes on its own).
    before = {key: ids for key, ids in replica_ids().items() if not key.startswith(f"{TINY_ZERO}/")}
    extra = model_app("tiny-extra", str(tiny_path), model_defaults(config_path), engine={"n_ctx": 256, "n_threads": 1},
                      deployment={"num_replicas": 1})
    deploy_with(config_path, tmp_path, extra)
    assert "tiny-extra" in [m.id for m in client.models.list().data]
    assert client.completions.create(model="tiny-extra", prompt="hi", max_tokens=3).usage.completion_tokens > 0
    after_add = replica_ids()
    assert {key: after_add.get(key) for key in before} == before  # the ingress and every model kept its replicas

    deploy_with(config_path, tmp_path, None)
    wait_until(lambda: "tiny-extra" not in [m.id for m in client.models.list().data], 30, "tiny-extra to go")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-extra", prompt="hi", max_tokens=3)
    assert client.completions.create(model=TINY, prompt="hi", max_tokens=3).usage.completion_tokens > 0
    after_remove = replica_ids()
    assert {key: after_remove.get(key) for key in before} == before


def scrape(name: str) -> float:
    """Sum of a metric's samples on Ray's Prometheus endpoint."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_metrics_count_requests_and_tokens(client: openai.OpenAI) -> None:
    requests_before = scrape("ray_modelserve_requests_total")
    tokens_before = scrape("ray_modelserve_completion_tokens_total")
    reply = client.completions.create(model=TINY, prompt="hello", max_tokens=5, temperature=0)
    produced = reply.usage.completion_tokens
    wait_until(lambda: scrape("ray_modelserve_requests_total") >= requests_before + 1, 60, "the request counter")
    wait_until(
        lambda: scrape("ray_modelserve_completion_tokens_total") >= tokens_before + produced, 60, "token counter"
    )
    assert scrape("ray_modelserve_time_to_first_token_seconds_count") > 0
    assert scrape("ray_modelserve_queue_wait_seconds_count") > 0
    assert scrape("ray_modelserve_weight_fetches_total") >= 2  # one per replica start: gemma and tiny at least
