"""Access control end to end: the unmodified `openai` client against the app on a real local Ray.

Two ingress replicas share one limiter; the policy is the ingress user_config, changed with `serve deploy`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.support.access_cluster import (
    ALLOWED,
    API_KEY,
    APP,
    AUDIENCE,
    HELD,
    HIDDEN,
    ISSUER,
    LONG,
    Cluster,
    e2e_policy,
    token,
)
from tests.support.auth_helpers import SECRET_1, SECRET_2, claims, forged, write_keys
from tests.support.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("e2e")
    model_path = write_tiny_llama_gguf(root / "tiny.gguf", n_ctx_train=8192)
    cluster = Cluster(root, keys, model_path)
    try:
        cluster.wait_ready()
        cluster.deploy(e2e_policy(keys))
        yield cluster
    finally:
        cluster.stop()
        assert cluster.leftover_pids() == []


def test_tenant_sees_and_uses_only_its_models(cluster: Cluster) -> None:
    team = cluster.client(token("team-a"))
    assert [m.id for m in team.models.list().data] == [ALLOWED]
    assert team.models.retrieve(ALLOWED).id == ALLOWED
    # Greedy: sampled, the random-weight tiny model can draw its end token within 4 (CI saw 1 token once).
    reply = team.chat.completions.create(model=ALLOWED, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0)
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    hidden, missing = [], []
    for name, sink in ((HIDDEN, hidden), ("no-such-model", missing)):
        with pytest.raises(openai.NotFoundError) as info:
            team.models.retrieve(name)
        sink.append(info.value.body)
        with pytest.raises(openai.NotFoundError) as info:
            team.completions.create(model=name, prompt="hi", max_tokens=1)
        sink.append(info.value.body)
    assert [b["code"] for b in hidden] == ["model_not_found"] * 2
    assert [json.dumps(b).replace(HIDDEN, "X") for b in hidden] == [
        json.dumps(b).replace("no-such-model", "X") for b in missing
    ]  # a model outside the allowlist is indistinguishable from one that does not exist

    admin = cluster.client(token("ops", roles=("admin",)))
    assert [m.id for m in admin.models.list().data] == sorted([ALLOWED, HIDDEN])
    assert admin.completions.create(model=HIDDEN, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert cluster.client(token("stranger")).models.list().data == []
    rs256 = jwt.encode(
        claims("team-a", iss=ISSUER, aud=AUDIENCE), cluster.keys["rsa"], "RS256", headers={"kid": "rsa-1"}
    )
    assert [m.id for m in cluster.client(rs256).models.list().data] == [ALLOWED]
    assert [m.id for m in cluster.client(API_KEY).models.list().data] == [ALLOWED]
    assert [m.id for m in cluster.client(token("team-a", kid="k2", secret=SECRET_2)).models.list().data] == [ALLOWED]


def model_logs(cluster: Cluster) -> str:
    """What the model replicas logged: Serve's access line per call carries the HTTP request's id."""
    return "".join(
        text for model in (ALLOWED, HIDDEN) for text in cluster.replica_logs(f"model-{model}", app=model).values()
    )


def test_bad_credentials_get_401_and_never_reach_a_model(cluster: Cluster, keys: dict[str, Any]) -> None:
    now = int(time.time())
    bad_tokens = {
        "malformed": "not.a.jwt",
        "expired": token("team-a", exp=now - 120),
        "not yet valid": token("team-a", nbf=now + 600),
        "wrong signature": token("team-a", secret="x" * 40),
        "alg none": forged({"alg": "none"}, claims("team-a", iss=ISSUER, aud=AUDIENCE), None),
        "HS256 keyed with the RS public key": forged(
            {"alg": "HS256", "kid": "rsa-1"}, claims("team-a", iss=ISSUER, aud=AUDIENCE), keys["rsa_pem"]
        ),
        "wrong issuer": token("team-a", iss="https://evil.test/"),
        "wrong audience": token("team-a", aud="someone-else"),
        "unknown kid": token("team-a", kid="k9"),
        "unknown API key": "msk-guessed",
    }
    refused_ids = []
    for name, bad in bad_tokens.items():
        with pytest.raises(openai.AuthenticationError) as info:
            cluster.client(bad).chat.completions.create(
                model=ALLOWED, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        refused_ids.append(info.value.response.headers["x-request-id"])
        assert info.value.status_code == 401, name
        assert info.value.response.headers["www-authenticate"] == "Bearer", name
        assert info.value.body["code"] == "invalid_api_key", name
        assert bad not in info.value.body["message"], name
    with httpx.Client(base_url=cluster.base_url, timeout=30) as http:
        body = {"model": ALLOWED, "prompt": "hi", "max_tokens": 1}
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", f"/v1/models/{ALLOWED}"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
        ):
            response = http.request(method, path, json=body if method == "POST" else None)
            refused_ids.append(response.headers["x-request-id"])
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # the one open route
    # Valid calls after them show up in the model logs by request id; none of the refused ones ever does.
    client = cluster.client(token("team-a"))
    valid_ids = [
        client.completions.with_raw_response.create(model=ALLOWED, prompt="hi", max_tokens=1).headers["x-request-id"]
        for _ in range(3)
    ]
    deadline = time.monotonic() + 15
    while not any(request_id in model_logs(cluster) for request_id in valid_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = model_logs(cluster)
    assert any(request_id in logs for request_id in valid_ids)
    assert [request_id for request_id in refused_ids if request_id in logs] == []
    audit = [
        line for text in cluster.replica_logs("ingress").values() for line in text.splitlines() if '"event"' in line
    ]
    refused_audit = [line for line in audit if any(request_id in line for request_id in refused_ids)]
    assert len(refused_audit) == len(refused_ids)  # one audit line each: 401, no tenant, no model
    assert all('"status":401' in line and '"model"' not in line for line in refused_audit)


def test_max_tokens_cap_clamps_or_rejects(cluster: Cluster) -> None:
    unset = cluster.client(token("team-a")).chat.completions.create(
        model=ALLOWED, messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    assert unset.usage.completion_tokens == 8  # the model's default_max_tokens (1024), clamped by the cap
    clamped = cluster.client(token("team-a")).completions.create(model=ALLOWED, prompt="hi", max_tokens=50)
    assert clamped.usage.completion_tokens == 8 and clamped.choices[0].finish_reason == "length"
    unset = cluster.client(token("team-a")).chat.completions.create(
        model=ALLOWED, messages=[{"role": "user", "content": "hi"}]
    )
    assert unset.usage.completion_tokens <= 8
    strict = cluster.client(token("strict"))
    with pytest.raises(openai.BadRequestError) as info:
        strict.chat.completions.create(model=ALLOWED, messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    assert info.value.body["code"] == "max_tokens_exceeded" and info.value.body["param"] == "max_tokens"
    assert strict.completions.create(model=ALLOWED, prompt="hi", max_tokens=8).usage.completion_tokens == 8


def send_all(calls: list[Any], workers: int) -> list[Any]:
    """Run the calls concurrently; each result is the raw response or the APIStatusError raised."""

    def run(call: Any) -> Any:
        try:
            return call()
        except openai.APIStatusError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, calls))


def test_requests_per_minute_hold_across_two_ingress_replicas(cluster: Cluster) -> None:
    client = cluster.client(token("rpm"))
    started = time.monotonic()
    results = send_all(
        [lambda: client.completions.with_raw_response.create(model=ALLOWED, prompt="hi", max_tokens=1)] * 18, 6
    )
    refill = (time.monotonic() - started) * 6 / 60
    admitted = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert 6 <= len(admitted) <= 6 + int(refill), (len(admitted), refill)
    assert all(r.status_code == 429 and r.body["code"] == "rate_limit_exceeded" for r in refused)
    headers = refused[0].response.headers
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "6"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-reset-requests"].endswith("s")
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining[:6] == [0, 1, 2, 3, 4, 5]
    time.sleep(0.5)
    served_by = {name for name, record in cluster.audit_lines() if record.get("tenant") == "rpm"}
    assert len(served_by) == 2  # both ingress replicas answered for this tenant, and they shared one budget


def test_tokens_per_minute_hold_and_settle_with_real_usage(cluster: Cluster) -> None:
    client = cluster.client(token("tpm"))
    # A long stream abandoned after its first chunk is settled with what it really used, not its reservation.
    stream = client.completions.create(**LONG, stream=True)
    next(iter(stream))
    stream.close()
    # The abandoned stream may have used up to all its 1500 tokens before the disconnect reached the server;
    # refilling room for another 1500 at 2000/min then takes up to (1500 - 500) * 60 / 2000 = 30 s.
    deadline = time.monotonic() + 35
    while True:
        second = send_all([lambda: client.completions.with_raw_response.create(**LONG)], 1)[0]
        if not isinstance(second, openai.APIStatusError) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not isinstance(second, openai.APIStatusError), second  # 2000 - 1500 reserved would not admit it
    used = second.parse().usage.total_tokens
    assert second.parse().usage.completion_tokens == LONG["max_tokens"]
    assert int(second.headers["x-ratelimit-limit-tokens"]) == 2000
    # Now the bucket holds roughly 2000 - (abandoned usage) - used; sum real usage of what else gets in.
    started = time.monotonic()
    results = send_all(
        [lambda: client.completions.with_raw_response.create(model=ALLOWED, prompt="hi", max_tokens=200)] * 12, 3
    )
    refill = (time.monotonic() - started + 1) * 2000 / 60
    admitted = [r.parse().usage.total_tokens for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert refused and sum(admitted) + used <= 2000 + refill + 210
    assert all(r.status_code == 429 and r.body["type"] == "tokens" for r in refused)
    assert refused[0].response.headers["x-ratelimit-remaining-tokens"] is not None


def admitted_eventually(call: Any, timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_concurrency_limit_and_slots_freed_on_disconnect_and_errors(cluster: Cluster) -> None:
    client = cluster.client(token("conc"))
    one_token = lambda: client.completions.create(model=ALLOWED, prompt="hi", max_tokens=1)
    held = client.completions.create(**HELD, stream=True)
    next(iter(held))  # the request is admitted and streaming: it holds the tenant's only slot
    with pytest.raises(openai.RateLimitError) as info:
        one_token()
    assert info.value.body["code"] == "rate_limit_exceeded" and info.value.response.headers["retry-after"] == "1"
    held.close()  # client disconnect: the slot must come back
    assert admitted_eventually(one_token).usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as info:  # fails inside the model, after admission
        client.completions.create(model=ALLOWED, prompt="word " * 9000, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    assert one_token().usage.completion_tokens == 1  # ... and its slot was released at once
    results = send_all([one_token] * 6, 6)
    assert all(r.usage.completion_tokens == 1 for r in results if not isinstance(r, openai.APIStatusError))


def test_audit_lines_record_requests_but_never_prompts_outputs_or_tokens(cluster: Cluster) -> None:
    secret_token = token("team-a")
    client = cluster.client(secret_token)
    reply = client.completions.create(model=ALLOWED, prompt="AUDIT-CANARY-PROMPT", max_tokens=5,
                                      user="audit-canary@example.com")
    streamed = list(
        client.chat.completions.create(
            model=ALLOWED,
            messages=[{"role": "user", "content": "AUDIT-CANARY-CHAT"}],
            max_tokens=5,
            safety_identifier="end-user-7",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with pytest.raises(openai.AuthenticationError):
        cluster.client(secret_token + "x").models.list()
    time.sleep(1)
    records = [r for _, r in cluster.audit_lines()]
    completion = next(
        r
        for r in records
        if r["path"] == "/v1/completions"
        and r.get("prompt_tokens") == reply.usage.prompt_tokens
        and r["tenant"] == "team-a"
    )
    assert completion["status"] == 200 and completion["model"] == ALLOWED and completion["subject"] == "user@team-a"
    assert completion["completion_tokens"] == 5 and completion["latency_ms"] > 0 and completion["policy"]
    assert completion["user"].startswith("sha256:")  # the request's `user`, hashed: it looks like an email
    usage = streamed[-1].usage
    assert any(
        r["path"] == "/v1/chat/completions"
        and r.get("prompt_tokens") == usage.prompt_tokens
        and r.get("completion_tokens") == usage.completion_tokens
        and r.get("safety_identifier") == "end-user-7"
        for r in records
    )  # streams settle too
    assert any(r["status"] == 401 and "tenant" not in r for r in records)
    logs = cluster.all_logs()
    output = reply.choices[0].text.strip()
    for secret in ("AUDIT-CANARY", "audit-canary@", secret_token, secret_token.split(".")[2], SECRET_1, SECRET_2, API_KEY):
        assert secret not in logs
    assert len(output) < 8 or output not in logs


def test_live_reload_by_serve_deploy_changes_access_without_restarting_anything(
    cluster: Cluster, keys: dict[str, Any]
) -> None:
    team, strict = cluster.client(token("team-a")), cluster.client(token("strict"))
    assert [m.id for m in team.models.list().data] == [ALLOWED]
    assert [m.id for m in strict.models.list().data] == [ALLOWED]
    replicas_before = cluster.replicas()
    assert len(replicas_before[f"{APP}/ingress"]) == 2 and len(replicas_before) == 3  # the ingress and two models
    in_flight = cluster.client(token("ops", roles=("admin",))).completions.create(**LONG, stream=True)
    chunks = [next(iter(in_flight))]

    policy = e2e_policy(keys)
    policy["tenants"]["team-a"]["models"] = ["*"]  # widen one tenant ...
    del policy["tenants"]["strict"]  # ... and drop another (it becomes an unknown tenant: denied)
    cluster.deploy(policy)

    assert [m.id for m in team.models.list().data] == sorted([ALLOWED, HIDDEN])
    assert team.completions.create(model=HIDDEN, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert strict.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        strict.completions.create(model=ALLOWED, prompt="hi", max_tokens=1)
    chunks += list(in_flight)  # the request in flight during the reload finishes normally
    assert chunks[-1].choices[0].finish_reason == "length"
    assert cluster.replicas() == replicas_before  # same replica ids and PIDs: reconfigured in place

    broken = copy.deepcopy(policy)
    broken["tenants"]["team-a"]["max_tokens"] = 0  # an invalid document must not take the ingress down
    cluster.deploy(broken)
    assert [m.id for m in team.models.list().data] == sorted([ALLOWED, HIDDEN])  # the previous policy still holds
    assert cluster.replicas() == replicas_before
    rejected = [
        line
        for text in cluster.replica_logs("ingress").values()
        for line in text.splitlines()
        if "REJECTED" in line and "tenants.team-a.max_tokens" in line
    ]
    assert len(rejected) == 2  # once per ingress replica
