"""A starting replica's weight fetch waits out an S3 outage (moto stopped, or cut mid-download) and resumes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.spec import StorageSettings
from deployments.weights.entries import WeightFetchError
from deployments.weights.patience import PatientWeightCache
from deployments.weights.retry import RetryPolicy
from tests.support.s3_server import FaultProxy, MotoS3, use_test_credentials

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_test_credentials(monkeypatch)


@pytest.fixture
def store() -> Iterator[MotoS3]:
    server = MotoS3()
    server.client().create_bucket(Bucket="models")
    yield server
    server.stop()


def upload(store: MotoS3, key: str, size: int) -> bytes:
    data = os.urandom(size)
    store.client().put_object(Bucket="models", Key=key, Body=data)
    return data


QUICK_RETRY = RetryPolicy(attempts=2, first_backoff_s=0.1, max_backoff_s=0.2, budget_s=5, call_retries=0)


class Fetch:
    """One patient fetch in a thread, with every report it made (its waits and retries short, as its S3 calls)."""

    def __init__(self, root: Path, source: str, endpoint: str) -> None:
        self.reports: list[str | None] = []
        self.cache = PatientWeightCache(self.reports.append, root, first_wait_s=0.1, max_wait_s=0.5)
        self.cache.retry = QUICK_RETRY
        self.result: Path | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(source, StorageSettings(endpoint_url=endpoint)))
        self._thread.start()

    def _run(self, source: str, storage: StorageSettings) -> None:
        try:
            self.result = self.cache.fetch(source, storage, label="m")
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.result = exc

    def wait_for_report(self, check: Callable[[str], bool], timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found := next((r for r in self.reports if r and check(r)), None):
                return found
            assert self._thread.is_alive(), f"the fetch ended: {self.result!r}"
            time.sleep(0.05)
        raise AssertionError(f"no such report in {self.reports}")

    def join(self, timeout_s: float = 60) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the fetch did not finish"
        return self.result


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "entries").rglob("*") if p.is_file())


def test_a_store_down_at_start_is_waited_for(store: MotoS3, tmp_path: Path) -> None:
    data = upload(store, "tiny.gguf", 200_000)
    store.stop()
    fetch = Fetch(tmp_path, "s3://models/tiny.gguf", store.endpoint_url)
    reason = fetch.wait_for_report(lambda r: "attempt 2" in r)
    prefix = "model 'm': cannot fetch weights from s3://models/tiny.gguf"
    assert f"{prefix}: S3 endpoint {store.endpoint_url} is unreachable" in reason, reason
    assert files(tmp_path) == []  # nothing in the cache while the store is away
    back = MotoS3(port=store.port)  # same endpoint, same objects (moto's state lives in this process)
    try:
        path = fetch.join()
    finally:
        back.stop()
    assert isinstance(path, Path) and path.read_bytes() == data
    assert fetch.reports[-1] is None  # the note is cleared once the weights are in place
    assert [f for f in files(tmp_path) if ".partial" in f] == []


def test_a_download_cut_off_resumes_when_the_store_is_back(store: MotoS3, tmp_path: Path) -> None:
    data = upload(store, "big.gguf", 3 * MB)
    proxy = FaultProxy(store.port, rate_bytes_per_s=2 * MB)
    try:
        fetch = Fetch(tmp_path, "s3://models/big.gguf", proxy.endpoint_url)
        deadline = time.monotonic() + 30
        while proxy.bytes_served < MB:
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.02)
        proxy.set_down(True)
        reason = fetch.wait_for_report(lambda r: "resumes" in r)
        assert "network error" in reason, reason
        in_cache = files(tmp_path)
        assert [f for f in in_cache if not f.endswith((".partial", ".partial.json"))] == [], in_cache  # none served
        served_before = proxy.bytes_served
        proxy.rate_bytes_per_s = None  # only the cut needed a slow download: the rest comes at full speed
        proxy.set_down(False)
        path = fetch.join()
    finally:
        proxy.close()
    assert isinstance(path, Path) and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert served_before >= MB and proxy.bytes_served < 2 * len(data)  # resumed, not started over
    assert [f for f in files(tmp_path) if ".partial" in f] == []


def test_an_error_that_waiting_cannot_fix_fails_at_once(store: MotoS3, tmp_path: Path) -> None:
    fetch = Fetch(tmp_path, "s3://models/missing.gguf", store.endpoint_url)
    error = fetch.join(30)
    assert isinstance(error, WeightFetchError) and not error.transient and "does not exist" in str(error)
    assert [r for r in fetch.reports if r] == []
