"""Weight faults at a real replica's start: S3 unreachable, a full disk, weights llama.cpp cannot load.

Each model here is an application of its own with its own weight cache directory, reading from a
moto S3 server in this process (stopped and started again on the same port for the outage).
A store outage is waited out with the reason shown; the rest fail the model with the reason, once
(no crash loop); no half-written file is left in any cache.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.cluster import deploy_with, model_app, model_defaults, model_states, wait_until
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3
from tests.support.tiny_gguf import broken_ggufs

LATE = "tiny-s3-late"  # its store is down when it starts
START_BOUND_S = 45.0  # store back -> model ready (the replica's backoff is at most 15 s; measured: bench/README.md)
BROKEN = {  # model -> (object in the store, the reason its failure must give)
    "tiny-truncated": ("bad/truncated.gguf", "data is not within the file bounds, model is corrupted or incomplete"),
    "tiny-garbage": ("bad/garbage.gguf", "failed to read key-value pairs"),
    "tiny-unknown-arch": ("bad/unknown-arch.gguf", "unknown model architecture: 'tinyfoo'"),
}
DISK_FULL = "tiny-disk-full"


class Store:
    """The test's S3 server, which can be stopped and started again at the same endpoint with its objects."""

    def __init__(self) -> None:
        self.server: MotoS3 | None = MotoS3()
        self.port, self.endpoint_url = self.server.port, self.server.endpoint_url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def start(self) -> None:
        self.server = self.server or MotoS3(port=self.port)


@pytest.fixture(scope="module")
def store(tiny_path: Path) -> Iterator[Store]:
    store = Store()
    client = store.server.client()  # type: ignore[union-attr]
    client.create_bucket(Bucket="models")
    good = tiny_path.read_bytes()
    client.put_object(Bucket="models", Key="tiny/tiny.gguf", Body=good)
    for kind, data in broken_ggufs(good).items():
        client.put_object(Bucket="models", Key=f"bad/{kind}.gguf", Body=data)
    yield store
    store.stop()


def s3_model(config_path: Path, name: str, key: str, store: Store, cache: Path, **env: str) -> dict[str, Any]:
    """A tiny model served from `s3://models/<key>` through its own weight cache directory."""
    app = model_app(name, f"s3://models/{key}", model_defaults(config_path), engine={"n_ctx": 256, "n_threads": 1},
                    deployment={"num_replicas": 1})
    app["runtime_env"] = {"env_vars": {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": store.endpoint_url,
                                       "MODELSERVE_CACHE_DIR": str(cache), **env}}
    return app


def leftovers(cache: Path) -> list[str]:
    """Files a fetch left half-written (partial downloads, temporary files) in a cache directory."""
    return sorted(str(p) for p in cache.rglob("*") if p.is_file() and (".partial" in p.name or p.name.endswith(".tmp")))


def test_a_store_down_at_start_is_waited_for(
    store: Store, config_path: Path, tmp_path: Path, client: openai.OpenAI, admin: httpx.Client
) -> None:
    cache = tmp_path / "cache"
    store.stop()
    try:
        deploy_with(config_path, tmp_path, s3_model(config_path, LATE, "tiny/tiny.gguf", store, cache), wait=False)
        waiting = wait_until(lambda: (s := model_states(admin).get(LATE)) and "unreachable" in s["message"] and s,
                             90, "the reason the model waits")
        assert waiting["state"] == "starting", waiting
        assert waiting["message"].startswith("waiting for weights (attempt "), waiting["message"]
        assert f"S3 endpoint {store.endpoint_url} is unreachable" in waiting["message"]
        store.start()
        back_at = time.monotonic()
        wait_until(lambda: model_states(admin)[LATE]["state"] == "ready", START_BOUND_S, "the model to start")
        print(f"S3 down at start: model ready {time.monotonic() - back_at:.1f} s after the store came back")
        assert client.completions.create(model=LATE, prompt="hi", max_tokens=2).usage.completion_tokens > 0
        assert model_states(admin)[LATE]["message"] == ""  # the note is gone once started
        assert leftovers(cache) == []
    finally:
        store.start()
        deploy_with(config_path, tmp_path, None)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], str]]:
    """A cache directory on a 256 KB tmpfs (smaller than the tiny model) where the test may mount one,
    else a cache size budget smaller than the model: (directory, its environment, the expected reason)."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=False,
                             capture_output=True).returncode == 0
    if mounted:
        yield disk, {}, "disk full"
        subprocess.run(["umount", str(disk)], check=True)
    else:
        yield disk, {"MODELSERVE_CACHE_MAX_BYTES": "200000"}, "cache budget exceeded"


def test_unusable_weights_fail_the_model_with_the_reason(
    store: Store, config_path: Path, tmp_path: Path, admin: httpx.Client,
    small_disk: tuple[Path, dict[str, str], str],
) -> None:
    disk, disk_env, disk_reason = small_disk
    caches = {name: tmp_path / name for name in BROKEN} | {DISK_FULL: disk}
    apps = [s3_model(config_path, name, key, store, caches[name]) for name, (key, _) in BROKEN.items()]
    apps.append(s3_model(config_path, DISK_FULL, "tiny/tiny.gguf", store, disk, **disk_env))
    try:
        deploy_with(config_path, tmp_path, apps, wait=False)
        failed = wait_until(lambda: (s := model_states(admin)) and all(s.get(n, {}).get("state") == "failed"
                                                                      for n in caches) and s, 180, "the failures")
        reasons = {name: failed[name]["message"] for name in caches}
        print("\n".join(f"{name}: {reason}" for name, reason in reasons.items()))
        for name, (_, reason) in BROKEN.items():
            assert reasons[name].startswith(f"model '{name}': llama.cpp could not load {Path(BROKEN[name][0]).name}: ")
            assert reason in reasons[name], reasons[name]
        prefix = f"model '{DISK_FULL}': cannot fetch weights from s3://models/tiny/tiny.gguf: {disk_reason}"
        assert reasons[DISK_FULL].startswith(prefix), reasons[DISK_FULL]
        assert all(failed[name]["replica_deaths"] == 0 for name in caches)  # failed starts, not a crash loop
        for name, cache in caches.items():
            assert leftovers(cache) == [], name
        assert [p for p in (disk / "entries").rglob("*") if p.is_file()] == []  # nothing of the download stays
    finally:
        deploy_with(config_path, tmp_path, None)
