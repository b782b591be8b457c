"""Real replica processes killed with SIGKILL: a model replica mid-stream, one of two ingress replicas.

Both run in applications of their own (a tiny model with one replica, a second ingress under
/spare with two), so the session's models and ingress are untouched. The recovery times these
tests bound are the ones bench/README.md documents under "Reliability".
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve_app.ingress.crash_watch import replica_class_name
from tests.support.cluster import BASE_URL, deploy_with, model_app, model_defaults, model_states, wait_until

VICTIM = "tiny-victim"  # a model with one replica, killed mid-stream
SPARE = "modelserve-spare"  # a second ingress application with two replicas, one of them killed
SPARE_PREFIX = "/spare"
MODEL_RECOVERY_BOUND_S = 30.0  # kill -> a request succeeds again (measured 10 s on 2 cores)
INGRESS_GAP_BOUND_S = 5.0  # longest run of refused requests while one of two ingress replicas dies (measured: 0)
EOS = 2  # the tiny model's end-of-sequence token, banned so a stream runs until it is killed


def alive_actors(app: str, deployment: str) -> list[Any]:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", replica_class_name(app, deployment)), ("state", "=", "ALIVE")])


@pytest.fixture(scope="module")
def fault_apps(config_path: Path, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    config = yaml.safe_load(config_path.read_text())
    spare = copy.deepcopy(config["applications"][0])
    spare.update(name=SPARE, route_prefix=SPARE_PREFIX)
    spare["args"]["ingress"]["deployment"]["num_replicas"] = 2
    victim = model_app(VICTIM, str(tiny_path), model_defaults(config_path), engine={"n_ctx": 2048, "n_threads": 1, "parallel": 2},
                       deployment={"num_replicas": 1, "max_queued_requests": 8})
    tmp_path = tmp_path_factory.mktemp("fault-apps")
    deploy_with(config_path, tmp_path, [spare, victim])
    yield
    deploy_with(config_path, tmp_path, None)


def test_a_model_replica_killed_mid_stream(fault_apps: None, client: openai.OpenAI, admin: httpx.Client) -> None:
    wait_until(lambda: model_states(admin).get(VICTIM, {}).get("state") == "ready", 60, "the model")
    [replica] = alive_actors(VICTIM, f"model-{VICTIM}")
    stream = client.chat.completions.create(
        model=VICTIM, messages=[{"role": "user", "content": "hello"}], max_tokens=1800,
        logit_bias={str(EOS): -100}, stream=True,
    )
    chunks: list[Any] = []
    killed_at = None
    with pytest.raises(openai.APIError) as broken:
        for chunk in stream:
            chunks.append(chunk)
            if killed_at is None and any(c.choices and c.choices[0].delta.content for c in chunks):
                os.kill(replica.pid, signal.SIGKILL)
                killed_at = time.monotonic()
    assert killed_at is not None and time.monotonic() - killed_at < 10  # an error event, not a hang
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)  # no silently truncated answer
    assert broken.value.body["code"] == "model_unavailable", broken.value.body

    states = set()

    def answers() -> bool:
        states.add(model_states(admin)[VICTIM]["state"])
        try:
            client.with_options(timeout=10).completions.create(model=VICTIM, prompt="hi", max_tokens=2)
            return True
        except openai.APIError:
            return False

    wait_until(answers, MODEL_RECOVERY_BOUND_S, "a request to succeed after the kill")
    recovered_s = time.monotonic() - killed_at
    print(f"model replica SIGKILL mid-stream: requests succeed again after {recovered_s:.1f} s")
    assert "failed" not in states, states  # recovering from one death, never failed
    wait_until(lambda: model_states(admin)[VICTIM]["state"] == "ready", 10, "the model to be ready")
    assert model_states(admin)[VICTIM]["running_replicas"] == 1
    wait_until(lambda: model_states(admin)[VICTIM]["replica_deaths"] == 1, 30, "the death to be counted")
    assert alive_actors(VICTIM, f"model-{VICTIM}")[0].actor_id != replica.actor_id


def test_one_of_two_ingress_replicas_killed(fault_apps: None, token: str) -> None:
    url = f"{BASE_URL}{SPARE_PREFIX}/v1/completions"
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": VICTIM, "prompt": "hi", "max_tokens": 1}
    with httpx.Client(timeout=10) as http:
        wait_until(lambda: http.post(url, json=body, headers=headers).status_code == 200, 60, "the spare ingress")
        ingress = alive_actors(SPARE, "ingress")
        assert len(ingress) == 2
        refused_since: float | None = None
        longest_gap, refused, sent = 0.0, 0, 0
        os.kill(ingress[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 15 or refused_since is not None:
            assert time.monotonic() - killed_at < 60, "requests still refused a minute after the kill"
            try:
                ok = http.post(url, json=body, headers=headers).status_code == 200
            except httpx.TransportError:
                ok = False
            sent += 1
            now = time.monotonic()
            if ok and refused_since is not None:
                longest_gap, refused_since = max(longest_gap, now - refused_since), None
            elif not ok:
                refused += 1
                refused_since = refused_since or now
    print(f"ingress replica SIGKILL: {refused} of {sent} requests refused, longest gap {longest_gap:.2f} s")
    assert longest_gap <= INGRESS_GAP_BOUND_S
    wait_until(lambda: len(alive_actors(SPARE, "ingress")) == 2, 60, "Serve to replace the ingress replica")
