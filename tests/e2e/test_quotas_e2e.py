"""Token quotas and durable usage end to end: two ingress replicas, one usage actor, usage in (moto) S3.

The usage actor is killed mid-test (SIGKILL, as a crash or node loss would): Ray restarts it, it reloads
from the bucket, and the usage API and the quotas answer exactly as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import httpx
import openai
import pytest

from serve_app.access.authn import api_key_hash
from tests.support.access_cluster import ALLOWED, Cluster, e2e_policy, token
from tests.support.auth_helpers import write_keys
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3, subprocess_env
from tests.support.tiny_gguf import write_tiny_llama_gguf

BUCKET, PREFIX = "usage-e2e", "usage/"
METERED_KEY = "msk-metered-service-key"
ASK = {"model": ALLOWED, "prompt": "hi", "max_tokens": 40, "temperature": 0}  # ~43 tokens, never stops early


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with MotoS3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: MotoS3) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("quotas")
    keys = write_keys(tmp_path_factory.mktemp("keys"))
    usage = {"bucket": BUCKET, "prefix": PREFIX, "storage": {"endpoint_url": s3.endpoint_url}, "flush_interval_s": 0.3}
    cluster = Cluster(root, keys, write_tiny_llama_gguf(root / "tiny.gguf", n_ctx_train=8192), {"usage": usage},
                      env=TEST_CREDENTIALS)
    policy = e2e_policy(keys)
    policy["tenants"] |= {"daily": {"models": ["tiny-*"], "tokens_per_day": 200},
                          "keyed": {"models": ["tiny-*"], "tokens_per_month": 100000}}
    policy["api_keys"].append({"name": "metered", "sha256": api_key_hash(METERED_KEY), "tenant": "keyed",
                               "tokens_per_day": 60})
    try:
        cluster.wait_ready()
        cluster.deploy(policy)
        yield cluster
    finally:
        cluster.stop()


def admin_usage(cluster: Cluster, **query: str) -> httpx.Response:
    return httpx.get(f"{cluster.base_url}/v1/admin/usage", params=query, timeout=30,
                     headers={"Authorization": f"Bearer {token('ops', roles=('admin',))}"})


def spend_until_refused(client: openai.OpenAI) -> tuple[list[int], openai.APIStatusError]:
    used = []
    for _ in range(10):
        try:
            used.append(client.completions.create(**ASK).usage.total_tokens)
        except openai.APIStatusError as refused:
            return used, refused
    raise AssertionError(f"never refused after using {used}")


def check_refusal(refused: openai.APIStatusError, scope: str, limit: int, left: int) -> None:
    now = datetime.now(timezone.utc)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc)
    headers = refused.response.headers
    assert (refused.status_code, refused.body["code"], refused.body["type"]) == (
        429, "quota_exceeded", "insufficient_quota")
    assert abs(int(headers["retry-after"]) - (midnight - now).total_seconds()) < 30
    assert headers["x-quota-reset"] == midnight.isoformat().replace("+00:00", "Z")
    assert (headers["x-quota-scope"], headers["x-quota-limit-tokens"]) == (f"{scope} per day", str(limit))
    assert int(headers["x-quota-remaining-tokens"]) == left


def kill_usage_actor(cluster: Cluster) -> int:
    """SIGKILL the usage actor's process, found through Ray's state API; returns its pid."""
    actors = httpx.get(f"{cluster.dashboard}/api/v0/actors", timeout=30, params={
        "filter_keys": "class_name", "filter_predicates": "=", "filter_values": "UsageLedger", "detail": "true",
    }).json()["data"]["result"]["result"]
    pid = next(a["pid"] for a in actors if a["state"] == "ALIVE")
    os.kill(pid, signal.SIGKILL)
    return pid


def test_tenant_day_quota_refuses_until_midnight_and_survives_a_usage_actor_crash(cluster: Cluster, s3: MotoS3) -> None:
    client = cluster.client(token("daily"))
    used, refused = spend_until_refused(client)
    assert len(used) == 4 and 200 - sum(used) < 43  # each ~43 tokens, estimated 41 before it runs
    check_refusal(refused, "tenant:daily", 200, 200 - sum(used))
    before = admin_usage(cluster, tenant="daily").json()["data"]
    assert [(r["requests"], r["total_tokens"], r["model"]) for r in before] == [(4, sum(used), ALLOWED)]
    assert before[0]["period"] == datetime.now(timezone.utc).date().isoformat()
    time.sleep(1)  # a flush interval and more: the records are in the bucket
    logs = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "log/").get("Contents", [])
    assert logs

    killed = kill_usage_actor(cluster)
    deadline = time.monotonic() + 60
    while (after := admin_usage(cluster, tenant="daily")).status_code != 200 and time.monotonic() < deadline:
        assert after.status_code == 503 and after.json()["error"]["code"] == "usage_unavailable"
        time.sleep(0.5)
    assert after.json()["data"] == before
    assert kill_usage_actor(cluster) != killed  # a new process answered (then crash it once more)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.completions.create(**ASK)
        except openai.APIStatusError as again:
            if again.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            check_refusal(again, "tenant:daily", 200, 200 - sum(used))
            break
        raise AssertionError("admitted beyond the day quota after the usage actor restarted")


def test_api_key_quota_applies_within_its_tenant(cluster: Cluster) -> None:
    metered = cluster.client(METERED_KEY)
    used, refused = spend_until_refused(metered)
    assert len(used) == 1
    check_refusal(refused, "key:api-key:metered", 60, 60 - used[0])
    cluster.client(token("keyed")).completions.create(**ASK)  # the tenant's own budget is far from spent
    rows = admin_usage(cluster, tenant="keyed", group_by="total").json()["data"]
    assert {r["key"]: r["requests"] for r in rows} == {"api-key:metered": 1, "user@keyed": 1}


def test_usage_api_is_admin_only_validates_filters_and_feeds_the_cli(cluster: Cluster) -> None:
    denied = httpx.get(f"{cluster.base_url}/v1/admin/usage", timeout=30,
                       headers={"Authorization": f"Bearer {token('daily')}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    bad_date = admin_usage(cluster, **{"from": "2025-13-01"})
    assert bad_date.status_code == 400 and bad_date.json()["error"]["param"] == "from"
    assert admin_usage(cluster, group_by="week").status_code == 400
    backwards = admin_usage(cluster, **{"from": "2025-02-01", "to": "2025-01-01"})
    assert backwards.status_code == 400
    assert admin_usage(cluster, tenant="daily", to="2000-01-01").json()["data"] == []
    month = admin_usage(cluster, tenant="daily", group_by="month").json()["data"]
    assert month[0]["period"] == datetime.now(timezone.utc).strftime("%Y-%m")

    cli = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "usage", "--url", cluster.base_url, "--tenant", "daily",
         "--token", token("ops", roles=("admin",))],
        env=subprocess_env("http://unused"), capture_output=True, text=True, timeout=60, check=False,
    )
    assert cli.returncode == 0, cli.stderr
    header, row = cli.stdout.splitlines()
    assert header.split() == ["period", "tenant", "key", "model", "requests", "prompt_tokens", "completion_tokens",
                              "total_tokens"]
    today = datetime.now(timezone.utc).date().isoformat()
    assert row.split() == [today, "daily", "user@daily", ALLOWED, "4", *(str(month[0][c]) for c in (
        "prompt_tokens", "completion_tokens", "total_tokens"))]
