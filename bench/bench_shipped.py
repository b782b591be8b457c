"""The shipped serve_config.yaml, unedited, brought up by `modelserve up`, against llama-server -np 8 and raw llama.cpp.

What a new user gets: the README's first command on this machine (local Ray with the machine's
cores, the config exactly as committed), called over HTTP with the token it prints. In one run:

- raw `llama_cpp.Llama` in-process at c=1, right before modelserve and right after (their mean
  is the c=1 baseline), with the replica's thread count;
- `llama-server -np 8 --cont-batching` (built from the llama.cpp source vendored in the
  installed llama-cpp-python) with the replica's threads and context per slot, c=1/4/8/16: issue 14's
  anchor; where the shipped config has more slots than 8, llama-server with as many slots at c=16 too
  (below 16 the extra slots change nothing), so the table also shows it against an equal slot count;
- modelserve at c=1/4/8/16, then c=8 again after an autoscale event: c=8 load runs until Serve
  decides to add a replica (8 in flight > target_ongoing_requests), then c=8 is measured again.
  Where the node has no free cores the new replica waits for one (on KubeRay the autoscaler adds
  a pod); it never puts a second replica's threads on cores already decoding.

On a CPU with AMX, raw and llama-server run without weight repacking (`--no-repack`), as the
replica's `repack: auto` does there. Refuses to run while a Ray is up (`modelserve down` stops it).

    python bench/bench_shipped.py --llama-server PATH [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from bench_serving import mean_result, raw_backend, requests
from harness import (
    ROOT,
    Backend,
    Result,
    cpu_seconds,
    demo_model,
    http_stream,
    llama_server,
    run_load,
    shipped_model,
    summarize,
)

from deployments.llama_cpp.model import choose_repack, cpu_has_amx
from serve_app.cli import tokens as cli_auth

MAX_TOKENS = 64
SETTLE_S = 10.0
CONCURRENCIES = [1, 4, 8, 16]
ANCHOR_SLOTS = 8  # issue 14 compares against `llama-server -np 8`


def modelserve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(bin_dir / "modelserve"), *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=900, check=False)


def modelserve_up(model: str, config: str = "serve_config.yaml", env: dict[str, str] | None = None
                  ) -> tuple[Backend, str]:
    """`modelserve up` on this config (the shipped one unless named), Ray started with `env` added to ours:
    the stream, its stop, and the base URL."""
    up = modelserve("up", config, env=env)
    if up.returncode != 0:
        raise RuntimeError(f"modelserve up failed:\n{up.stdout}\n{up.stderr}")
    token = re.search(r"export TOKEN=(\S+)", up.stdout).group(1)
    base = re.search(r"^curl (http://\S+)/v1/chat/completions", up.stdout, re.MULTILINE).group(1)
    return (http_stream(base, model, headers={"Authorization": f"Bearer {token}"}), lambda: modelserve("down")), base


def replicas(base: str, model: str) -> dict[str, Any]:
    token = cli_auth.mint_token(cli_auth.dev_secret(cli_auth.state_dir()), "bench", ["admin"], 600)
    status = httpx.get(f"{base}/v1/admin/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return status.json()["models"][model]


def load_until_upscale(stream: Any, base: str, model: str, timeout_s: float = 180) -> str:
    """Keep c=8 load on the model until Serve has decided to add a replica; what happened to it."""
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            run_load(stream, 8, 8, MAX_TOKENS)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    deadline, state = time.monotonic() + timeout_s, {}
    try:
        while time.monotonic() < deadline:
            state = replicas(base, model)
            if state["running_replicas"] + state["starting_replicas"] > 1:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"no upscale within {timeout_s:.0f}s: {state}")
        time.sleep(10)  # a replica that can be placed has loaded by now; one that cannot still waits
        state = replicas(base, model)
    finally:
        done.set()
        worker.join()
    return f"{state['running_replicas']} running, {state['starting_replicas']} waiting for cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="llama-server built from the vendored llama.cpp")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; the best counts")
    args = parser.parse_args()
    if subprocess.run(["ray", "status"], capture_output=True, check=False).returncode == 0:
        sys.exit("a Ray is already running here: this bench brings up its own with `modelserve up`")
    spec = shipped_model()
    threads, slots, n_ctx = spec.engine.n_threads, spec.engine.parallel, spec.engine.n_ctx
    repack = choose_repack(spec.engine.repack)
    path, count_tokens = demo_model()

    def measure(name: str, stream: Any, concurrency: int, label: str = "") -> Result:
        load = (stream, concurrency, requests(concurrency, False), MAX_TOKENS)
        kept = max((summarize(name, concurrency, *run_load(*load), count_tokens) for _ in range(args.rounds)),
                   key=lambda result: result.tokens_per_s)
        print(kept.line() + label, flush=True)
        return kept

    def warmed(backend: Backend, settle_s: float) -> Backend:
        run_load(backend[0], 1, 2, 8)
        time.sleep(settle_s)
        return backend

    results: dict[str, Result] = {}
    stream, stop = warmed(llama_server(args.llama_server, path, n_ctx, ANCHOR_SLOTS, threads, repack=repack.enabled), SETTLE_S)
    try:
        for concurrency in CONCURRENCIES:
            results[f"llama-server c{concurrency}"] = measure(f"llama-server -np {ANCHOR_SLOTS}", stream, concurrency)
    finally:
        stop()
    if slots > ANCHOR_SLOTS:
        stream, stop = warmed(llama_server(args.llama_server, path, n_ctx, slots, threads, repack=repack.enabled), SETTLE_S)
        try:
            results["llama-server c16 equal slots"] = measure(f"llama-server -np {slots}", stream, 16)
        finally:
            stop()
    bracket = []
    stream, stop = warmed(raw_backend(path, 1024, threads, repack=repack.enabled), 0)
    bracket.append(measure("raw", stream, 1, "  (before modelserve)"))
    stop()
    (stream, stop), base = modelserve_up(spec.name)
    try:
        warmed((stream, stop), SETTLE_S)
        for concurrency in CONCURRENCIES:
            cpu_before, started = cpu_seconds(spec.name), time.monotonic()
            results[f"modelserve c{concurrency}"] = measure("modelserve", stream, concurrency)
            cpu, elapsed = cpu_seconds(spec.name), time.monotonic() - started
            cpu.subtract(cpu_before)
            print(f"  CPU at c={concurrency} (cores busy on average): " + ", ".join(
                f"{role} {seconds / elapsed:.2f}" for role, seconds in cpu.most_common()), flush=True)
        scaled = load_until_upscale(stream, base, spec.name)
        results["modelserve c8 scaled"] = measure("modelserve", stream, 8, f"  (after the upscale: {scaled})")
    finally:
        stop()
    stream, stop = warmed(raw_backend(path, 1024, threads, repack=repack.enabled), 0)
    bracket.append(measure("raw", stream, 1, "  (after modelserve)"))
    stop()
    raw = mean_result(bracket)

    print(f"machine: {os.cpu_count()} CPUs, AMX: {'yes' if cpu_has_amx() else 'no'}, weight repacking "
          f"{repack.describe()}; shipped config: {slots} slots x {n_ctx} tokens, {threads} threads = Ray CPUs per "
          f"replica; llama-server -np {ANCHOR_SLOTS} -t {threads}{' --no-repack' if not repack.enabled else ''}; {MAX_TOKENS} tokens")
    ratios = [f"c1 modelserve/raw={results['modelserve c1'].tokens_per_s / raw.tokens_per_s:.2f}"]
    for key in ["c1", "c4", "c8", "c16", "c8 scaled"]:
        theirs = results[f"llama-server {key.split()[0]}"].tokens_per_s
        ratios.append(f"{key} modelserve/llama-server={results[f'modelserve {key}'].tokens_per_s / theirs:.2f}")
    if equal := results.get("llama-server c16 equal slots"):
        ratios.append(f"c16 modelserve/llama-server -np {slots}={results['modelserve c16'].tokens_per_s / equal.tokens_per_s:.2f}")
    print("ratios (decode tokens/s): " + "; ".join(ratios))


if __name__ == "__main__":
    main()
