"""Auth + policy overhead: median latency per request with access control on vs off, in the same run.

One private local Ray (started and stopped by this script) runs the same app twice with the tiny GGUF:
`/on` with a policy (HS256 JWT, glob allowlist, RPM/TPM/concurrency limits in the shared limiter actor)
and `/off` with `enabled: false`. Requests alternate between the two so drift hits both alike. Measured:
GET /v1/models (auth + model filter) and a 1-token POST /v1/completions (auth + allowlist + cap + limits)
for tenant `dev`, whose large limits let the replica borrow credit (most requests skip the actor round
trip), and for tenant `exact`, whose small concurrency limit admits every request with a round trip.
The target is under 2 ms added per request (`dev`); the last line holds the deltas and ratios.

    python bench/bench_auth.py              # 300 requests per endpoint and mode
    python bench/bench_auth.py --quick      # 60
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from harness import free_port

from serve_app.cli.serve_file import application_entries, use_serve_process_env
from tests.support.tiny_gguf import write_tiny_llama_gguf

MODEL = "tiny"
TENANTS = {
    "dev": {
        "models": ["*"],
        "requests_per_minute": 600_000,
        "tokens_per_minute": 100_000_000,
        "max_concurrent_requests": 64,
    },
    "exact": {"models": ["*"], "max_concurrent_requests": 4},  # too small to borrow: one round trip each
}


def applications(model_path: Path) -> list[dict[str, Any]]:
    """Two ingress applications, /on with the policy and /off without, in front of one model application."""
    model = {
        "name": MODEL,
        "source": str(model_path),
        "engine": {"n_ctx": 256, "n_threads": 1, "parallel": 8},
        "deployment": {"num_replicas": 1},
    }
    ingress = {
        "ingress": {
            "deployment": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}}
        }
    }
    on = {"default": {"models": []}, "tenants": TENANTS}
    return application_entries([model], ingress, name="auth-on", route_prefix="/on", policy=on) + application_entries(
        [], ingress, name="auth-off", route_prefix="/off", policy={"enabled": False}
    )


def timed(call: Callable[[str], httpx.Response], prefix: str) -> float:
    started = time.perf_counter()
    response = call(prefix)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="per endpoint and mode")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 60 if args.quick else args.requests

    os.environ["MODELSERVE_JWT_SECRET"] = secrets.token_urlsafe(48)  # fresh per run; inherited by replicas
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private loopback cluster; leaves the user's Ray token alone
    use_serve_process_env()  # the Ray settings modelserve ships with
    import ray
    from ray import serve

    from serve_app.app import run_targets
    from serve_app.cli.tokens import mint_token

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = write_tiny_llama_gguf(Path(tmp) / "tiny.gguf")
        ray.init(
            address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="error"
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run_many(run_targets(applications(model_path)))
            tokens = {t: mint_token(os.environ["MODELSERVE_JWT_SECRET"], t, [], 3600) for t in TENANTS}
            results = measure(f"http://127.0.0.1:{port}", tokens, count)
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"{'endpoint':<32}{'off p50 ms':>12}{'on p50 ms':>12}{'added ms':>11}{'ratio':>8}")
    summary = []
    for endpoint, (off, on) in results.items():
        off_ms, on_ms = statistics.median(off) * 1000, statistics.median(on) * 1000
        print(f"{endpoint:<32}{off_ms:>12.2f}{on_ms:>12.2f}{on_ms - off_ms:>11.2f}{on_ms / off_ms:>8.2f}")
        summary.append(f"{endpoint} {on_ms - off_ms:+.2f} ms (x{on_ms / off_ms:.2f})")
    print("auth+policy overhead (median, target < 2 ms): " + "; ".join(summary))
    return 0


def measure(base: str, tokens: dict[str, str], count: int) -> dict[str, tuple[list[float], list[float]]]:
    """Alternate off/on requests per endpoint; returns (off latencies, on latencies) in seconds."""
    dev, exact = ({"Authorization": f"Bearer {tokens[t]}"} for t in ("dev", "exact"))
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 0}
    results: dict[str, tuple[list[float], list[float]]] = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        calls = {
            "GET /v1/models": lambda prefix: client.get(f"{prefix}/v1/models", headers=dev),
            "POST /v1/completions": lambda prefix: client.post(
                f"{prefix}/v1/completions", json=completion, headers=dev
            ),
            "POST /v1/completions (exact)": lambda prefix: client.post(
                f"{prefix}/v1/completions", json=completion, headers=exact
            ),
        }
        for endpoint, call in calls.items():
            for prefix in ("/off", "/on"):  # warm-up: connections, handles, the limiter actor
                for _ in range(20):
                    timed(call, prefix)
            off, on = [], []
            for _ in range(count):
                off.append(timed(call, "/off"))
                on.append(timed(call, "/on"))
            results[endpoint] = (off, on)
    return results


if __name__ == "__main__":
    sys.exit(main())
