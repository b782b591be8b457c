"""Scaling and lifecycle on real Ray: scale from zero, up under a burst, back down; models added and removed
by `serve deploy`; model states in /v1/models and the admin status; metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from conftest import GEMMA, METRICS_PORT, TINY, TINY_ZERO, model_app, serve_cli, wait_for_apps

from serve_app.cli_auth import mint_token

LONG = {"model": TINY_ZERO, "prompt": "hello there", "max_tokens": 480, "temperature": 0}


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def admin(app_url: str) -> httpx.Client:
    token = mint_token(os.environ["MODELSERVE_JWT_SECRET"], "ops", ["admin"], 3600)
    return httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def model_states(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    response = admin.get("/v1/admin/status")
    assert response.status_code == 200, response.text
    return response.json()["models"]


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
    assert first.choices[0].text is not None  # answered after scaling up from zero

    # Long requests queued on replicas that take one at a time: the autoscaler adds a second replica.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(client.completions.create, **LONG) for _ in range(8)]
        wait_until(lambda: model_states(admin)[TINY_ZERO]["running_replicas"] == 2, 90, "a second replica")
        assert all(f.result().usage.completion_tokens > 0 for f in burst)

    wait_until(lambda: model_states(admin)[TINY_ZERO]["state"] == "at_zero", 90, "scale back to zero")


def deploy_with(config_path: Path, tmp_path: Path, extra_app: dict[str, Any] | None) -> None:
    config = yaml.safe_load(config_path.read_text())
    if extra_app:
        config["applications"].append(extra_app)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve_cli("deploy", str(path))
    time.sleep(2)  # let the controller take the new config before polling its status
    wait_for_apps()


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
    defaults = yaml.safe_load(config_path.read_text())["applications"][1]["args"]["model_defaults"]
    extra = model_app("tiny-extra", str(tiny_path), defaults, engine={"n_ctx": 256, "n_threads": 1},
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
    assert scrape("ray_modelserve_weight_fetches_total") >= 3  # one per model replica start
