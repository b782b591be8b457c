"""Weight cache throughput against raw boto3, both measured in this run on the same object.

Starts moto's S3 server on 127.0.0.1 (in its own process, so the client's CPU use does not
slow the server), uploads a random object, then times: raw boto3 `download_file`, a cold
WeightCache fetch (download + verification + fsync + atomic rename), and a warm fetch (one
HEAD). boto3 with the cache's range size and concurrency is printed as well, to show what the
verification and durability cost on their own.
The last line prints the cold-pull ratio, best round against best round (the machine may be
shared, so the best round is the least disturbed one); the median ratio is printed too.

    python bench/bench_weights.py            # ~200 MB object
    python bench/bench_weights.py --quick    # ~64 MB object, well under a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boto3.s3.transfer import TransferConfig

from deployments.weights.cache import WeightCache
from deployments.weights.s3 import CHUNK_BYTES, WORKERS
from deployments.weights.source import StorageSettings
from serve_app.cli.weights import push_path
from tests.support.s3_server import TEST_CREDENTIALS, FaultProxy, MotoS3

MB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller object (finishes within a minute)")
    parser.add_argument("--size-mb", type=int, help="object size in MiB (default 200, 64 with --quick)")
    parser.add_argument("--rounds", type=int, help="alternating raw/cache rounds (default 5, 5 with --quick)")
    args = parser.parse_args()
    size = (args.size_mb or (64 if args.quick else 200)) * MB
    rounds = args.rounds or 5
    os.environ.update(TEST_CREDENTIALS)

    with MotoS3(in_subprocess=True) as store, tempfile.TemporaryDirectory(prefix="bench-weights-") as scratch:
        work = Path(scratch)
        client = store.client()
        client.create_bucket(Bucket="bench")
        model = work / "model.gguf"
        with open(model, "wb") as handle:
            handle.writelines(os.urandom(MB) for _ in range(size // MB))
        push_path(client, model, "s3://bench/model.gguf")
        storage = StorageSettings(endpoint_url=store.endpoint_url)
        raw_client = store.client()
        same_ranges = TransferConfig(multipart_chunksize=CHUNK_BYTES, max_concurrency=WORKERS)

        raw_times, tuned_times, cache_times = [], [], []
        for round_index in range(rounds):  # alternate so drift in the server hits all alike
            for times, config in ((raw_times, None), (tuned_times, same_ranges)):
                target = work / "raw.bin"
                started = time.perf_counter()
                raw_client.download_file("bench", "model.gguf", str(target), Config=config)
                times.append(time.perf_counter() - started)
                target.unlink()

            cache = WeightCache(work / f"cache-{round_index}")
            started = time.perf_counter()
            cache.fetch("s3://bench/model.gguf", storage, label="bench")
            cache_times.append(time.perf_counter() - started)

        proxy = FaultProxy(store.port)  # counts the bytes a warm start transfers
        started = time.perf_counter()
        warm = cache.fetch("s3://bench/model.gguf", StorageSettings(endpoint_url=proxy.endpoint_url), label="bench")
        warm_seconds = time.perf_counter() - started
        assert warm.stat().st_size == size and cache.last_stats and cache.last_stats.cache_hit
        warm_bytes = proxy.bytes_served
        proxy.close()

    mib = size / MB
    print(f"object: {size // MB} MiB, {rounds} alternating rounds each; best (median) MiB/s")
    for what, times in (
        ("raw boto3 download_file", raw_times),
        (f"  same, {CHUNK_BYTES // MB} MiB ranges x{WORKERS}", tuned_times),  # isolates verification/fsync cost
        ("WeightCache cold pull", cache_times),
    ):
        rounds_s = ", ".join(f"{t:.2f}s" for t in times)
        print(f"{what:<28} {mib / min(times):7.1f} ({mib / statistics.median(times):.1f})  [{rounds_s}]")
    print(f"warm start: {warm_seconds * 1000:.0f} ms, {warm_bytes} bytes from the store (one HEAD, no body)")
    print(f"median ratio: {statistics.median(raw_times) / statistics.median(cache_times):.2f}x")
    print(
        f"cold pull ratio WeightCache / boto3 (best of {rounds}): {min(raw_times) / min(cache_times):.2f}x (target >= 0.9x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
