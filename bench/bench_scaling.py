"""Scale from zero: time from a request for a model at zero replicas to its first token, cold vs warm cache.

One private local Ray runs the ingress and the demo Gemma model as its own application that
autoscales 0..1 (back to zero after 2 s idle). The weights live in a moto S3 server on
127.0.0.1 (its own process), as they would in MinIO. Each round measures, over HTTP:

- cold: the node's weight cache is empty: scale-up + download + load + first token;
- warm: the model went back to zero, its weights stayed cached: scale-up + load + first token;
- hot (the baseline): a replica already running: first token only.

Prints each round, then the medians and the ratios on the last line.

    python bench/bench_scaling.py            # 3 rounds
    python bench/bench_scaling.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from harness import Stream, demo_model, free_port, http_stream, wait_http

from deployments.weight_cache import WeightCache, WeightFetchError
from serve_app.cli_weights import push_path
from serve_app.config import model_deployment_name
from tests.s3_server import TEST_CREDENTIALS, MotoS3

MODEL = "gemma"
SOURCE = "s3://models/gemma.gguf"
PROMPT = "Write one sentence about the sea:"


def time_to_first_token(stream: Stream) -> float:
    started = time.perf_counter()
    for _ in stream(PROMPT, 4):
        return time.perf_counter() - started
    raise RuntimeError("the model answered with no text")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(MODEL)
    deployment = app.deployments.get(model_deployment_name(MODEL)) if app else None
    return sum(deployment.replica_states.values()) if deployment else -1


def wait_for_zero(timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while running_replicas() != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the model did not scale back to zero")
        time.sleep(0.5)


def empty_cache(cache: WeightCache, timeout_s: float = 60) -> None:
    """Drop the model's cache entry once the stopped replica has released its lease."""
    deadline = time.monotonic() + timeout_s
    while any(entry.source == SOURCE for entry in cache.entries()):
        try:
            cache.remove(SOURCE)
        except WeightFetchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds

    model_path, _ = demo_model()
    with MotoS3(in_subprocess=True) as store, tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        store.client().create_bucket(Bucket="models")
        size = push_path(store.client(), Path(model_path), SOURCE)[0][1]
        os.environ.update(TEST_CREDENTIALS, AWS_ENDPOINT_URL=store.endpoint_url, RAY_AUTH_MODE="disabled",
                          MODELSERVE_CACHE_DIR=str(Path(scratch) / "cache"),
                          MODELSERVE_JWT_SECRET=secrets.token_urlsafe(48))  # all inherited by the replicas
        cache = WeightCache(Path(scratch) / "cache")
        results = measure(rounds, cache)
    print(f"model: Gemma 3 270M Q4_K_M, {size / 1e6:.0f} MB from S3 (moto on 127.0.0.1); {os.cpu_count()} CPUs")
    cold, warm, hot = (statistics.median(r[i] for r in results) for i in range(3))
    print(f"median zero -> first token: cold cache {cold:.2f} s, warm cache {warm:.2f} s; "
          f"running replica {hot * 1000:.0f} ms")
    print(f"ratios: cold/warm {cold / warm:.2f}x, warm/running {warm / hot:.1f}x, "
          f"download share of a cold start {(cold - warm) / cold:.0%}")


def measure(rounds: int, cache: WeightCache) -> list[tuple[float, float, float]]:
    import ray
    from ray import serve

    from serve_app.app import run_targets
    from serve_app.serve_config import application_entries, use_serve_process_env

    port = free_port()
    use_serve_process_env()  # the Ray settings modelserve ships with
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level="error", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        gemma = {
            "name": MODEL, "source": SOURCE,
            "engine": {"n_ctx": 1024, "n_threads": 2, "chat_format": "gemma"},
            "deployment": {
                "autoscaling_config": {
                    "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
                    "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            },
        }
        ingress = {"ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}}}}
        serve.run_many(run_targets(application_entries([gemma], ingress, name="bench", policy={"enabled": False})))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health")
        stream = http_stream(base, MODEL)
        results = []
        for round_number in range(1, rounds + 1):
            wait_for_zero()
            empty_cache(cache)
            cold = time_to_first_token(stream)
            wait_for_zero()
            warm = time_to_first_token(stream)
            hot = statistics.median(time_to_first_token(stream) for _ in range(3))
            print(f"round {round_number}: cold {cold:.2f} s, warm {warm:.2f} s, running {hot * 1000:.0f} ms",
                  flush=True)
            results.append((cold, warm, hot))
        return results
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
