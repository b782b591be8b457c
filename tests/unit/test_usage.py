"""Token quotas and usage: the ledger's arithmetic (fixed clock) and its durable log (moto S3 and a directory)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from deployments.strict import ConfigError
from deployments.weights.source import StorageSettings
from serve_app.access.authn import Principal
from serve_app.access.policy import parse_policy
from serve_app.access.usage import Ledger, QuotaLimits, QuotaScope, UsageRecord
from serve_app.access.usage_store import DirObjects, S3Objects, UsageLog
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3

NOON = datetime(2025, 1, 31, 12, 0, tzinfo=timezone.utc)
TENANT_DAY = QuotaScope("tenant:a", QuotaLimits(tokens_per_day=100))


def record(day: str = "2025-01-31", tenant: str = "a", key: str = "api-key:k", model: str = "m",
           prompt: int = 5, completion: int = 5) -> UsageRecord:
    return UsageRecord(day, tenant, key, model, prompt, completion)


def test_reservations_hold_quota_until_settled_with_real_usage() -> None:
    ledger = Ledger()
    assert ledger.reserve("r1", [TENANT_DAY], 60, NOON).admitted
    refused = ledger.reserve("r2", [TENANT_DAY], 50, NOON)
    assert not refused.admitted
    assert (refused.scope, refused.period, refused.limit, refused.remaining) == ("tenant:a", "day", 100, 40)
    assert refused.reset_at == datetime(2025, 2, 1, tzinfo=timezone.utc)
    ledger.settle("r1", record(prompt=4, completion=6))  # used 10 of the 60 reserved
    assert ledger.reserve("r2", [TENANT_DAY], 90, NOON).admitted
    assert not ledger.reserve("r3", [TENANT_DAY], 1, NOON).admitted


def test_day_quota_resets_at_midnight_and_month_quota_on_the_first() -> None:
    scopes = [QuotaScope("tenant:a", QuotaLimits(tokens_per_day=50, tokens_per_month=120))]
    ledger = Ledger()
    ledger.settle(None, record(day="2025-01-30", prompt=40, completion=0))
    ledger.settle(None, record(day="2025-01-31", prompt=40, completion=0))
    day_refusal = ledger.reserve("r", scopes, 20, NOON)
    assert (day_refusal.period, day_refusal.remaining) == ("day", 10)
    assert ledger.reserve("r", scopes, 10, NOON).admitted  # 10 left today, 40 this month
    assert not (refusal := ledger.reserve("s", scopes, 40, NOON)).admitted and refusal.period == "day"
    feb = datetime(2025, 2, 1, 0, 0, 1, tzinfo=timezone.utc)
    assert ledger.reserve("t", scopes, 50, feb).admitted  # new day and new month: both quotas reset


def test_month_refusal_names_the_first_of_next_month() -> None:
    scopes = [QuotaScope("key:api-key:k", QuotaLimits(tokens_per_month=10))]
    ledger = Ledger()
    ledger.settle(None, record(day="2025-01-02", key="api-key:k", prompt=10, completion=0))
    refused = ledger.reserve("r", scopes, 1, NOON)
    assert (refused.scope, refused.period, refused.reset_at) == (
        "key:api-key:k", "month", datetime(2025, 2, 1, tzinfo=timezone.utc))
    assert ledger.reserve("r", [QuotaScope("key:api-key:other", QuotaLimits(tokens_per_month=10))], 10, NOON).admitted


def test_a_reservation_lost_in_a_restart_still_books_its_usage() -> None:
    ledger = Ledger()
    ledger.settle("unknown-to-this-ledger", record(prompt=3, completion=4))
    assert ledger.query(group_by="total")[0]["total_tokens"] == 7


def test_query_filters_by_tenant_key_model_and_dates_and_groups() -> None:
    ledger = Ledger()
    for day, tenant, model in [("2025-01-30", "a", "m"), ("2025-01-31", "a", "m"), ("2025-01-31", "a", "n"),
                               ("2025-02-01", "b", "m")]:
        ledger.settle(None, record(day=day, tenant=tenant, model=model))
    assert [r["period"] for r in ledger.query(tenant="a", model="m")] == ["2025-01-30", "2025-01-31"]
    assert ledger.query(tenant="a", model="m", group_by="month") == [{
        "period": "2025-01", "tenant": "a", "key": "api-key:k", "model": "m",
        "requests": 2, "prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20,
    }]
    in_range = ledger.query(start=date(2025, 1, 31), end=date(2025, 1, 31), group_by="total")
    assert sorted(r["model"] for r in in_range) == ["m", "n"]
    assert ledger.query(key="api-key:nobody") == []


def test_policy_quotas_apply_to_the_tenant_and_the_api_key() -> None:
    document = parse_policy({
        "tenants": {"a": {"models": ["*"], "tokens_per_day": 1000, "tokens_per_month": 20000}},
        "api_keys": [{"name": "ci", "sha256": "0" * 64, "tenant": "a", "tokens_per_day": 100}],
    })
    scopes = document.quota_scopes(Principal("a", frozenset(), "api-key:ci"))
    assert scopes == [QuotaScope("tenant:a", QuotaLimits(1000, 20000)), QuotaScope("key:api-key:ci", QuotaLimits(100))]
    assert document.quota_scopes(Principal("other", frozenset(), "user")) == []
    with pytest.raises(ConfigError, match="tokens_per_day"):
        parse_policy({"tenants": {"a": {"tokens_per_day": 0}}})


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(params=["s3", "dir"])
def usage_objects(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    if request.param == "dir":
        return DirObjects(str(tmp_path))
    moto = request.getfixturevalue("moto")
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"usage-{request.node.name.split('[')[0][-20:].replace('_', '-')}-{id(tmp_path) % 10000}"
    moto.client().create_bucket(Bucket=bucket)
    return S3Objects(bucket, StorageSettings(endpoint_url=moto.endpoint_url))


def test_usage_log_reloads_snapshot_plus_later_log_objects_exactly_once(usage_objects: object) -> None:
    log = UsageLog(usage_objects, "usage/")  # type: ignore[arg-type]
    assert log.load() == ({}, 0)
    written = Ledger()
    for seq, prompt in enumerate([1, 2, 3]):
        batch = [record(prompt=prompt, completion=10), record(model="n", prompt=prompt, completion=0)]
        for item in batch:
            written.settle(None, item)
        log.append(seq, batch)
        if seq == 1:
            log.snapshot(seq, written.rows)
    rows, next_seq = log.load()
    assert next_seq == 3
    assert Ledger(rows).query(group_by="total") == written.query(group_by="total")
    assert Ledger(rows).query(group_by="total")[0]["requests"] == 3  # the snapshot's records are not replayed again
