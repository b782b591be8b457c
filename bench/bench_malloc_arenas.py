"""What glibc's malloc arena cap costs decode: modelserve as shipped (`MALLOC_ARENA_MAX=2` in every Ray
process through SERVE_PROCESS_ENV, and in the ingress's and models' `runtime_env`) against glibc's default
(8 arenas per core) everywhere.

The cap keeps a many-threaded process's freed memory in 2 arenas instead of up to 16 on 2 cores (probe
and soaks in bench/README.md); this asks what it costs. Each round brings the app up with `modelserve up`
twice, the order alternating between rounds: as shipped, and with the cap taken out of the config
(written to a temporary file) and Ray started with glibc's default count. It checks the start-up
environment of the ingress, the proxy and the model replicas, then streams 64-token completions from
the demo model at each concurrency. The means over rounds count. Refuses to run while a Ray is up.

    python bench/bench_malloc_arenas.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from bench_serving import requests
from bench_shipped import MAX_TOKENS, modelserve_up
from harness import ROOT, demo_model, process_env, ray_processes, run_load, shipped_model, summarize

from deployments.llama_cpp.model import cpu_has_amx
from serve_app.cli.serve_file import SERVE_PROCESS_ENV, ingress_applications, model_applications

CONCURRENCIES = (1, 8, 16)
ARENA_MAX = "MALLOC_ARENA_MAX"


def runtime_env_vars(config: dict[str, Any]) -> list[dict[str, str]]:
    """Every modelserve application's `runtime_env.env_vars` in this config (a model's defaults' and its own)."""
    found = []
    for app in ingress_applications(config) + model_applications(config):
        args = app.get("args") or {}
        for entry in (args.get("ingress"), args.get("model_defaults"), args.get("model")):
            options = ((entry or {}).get("deployment") or {}).get("ray_actor_options") or {}
            found.append((options.get("runtime_env") or {}).get("env_vars") or {})
    return found


def uncapped_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the cap taken out of every application."""
    uncapped = copy.deepcopy(config)
    for env_vars in runtime_env_vars(uncapped):
        env_vars.pop(ARENA_MAX, None)
    return uncapped


def arena_caps(model: str) -> dict[str, set[str | None]]:
    """MALLOC_ARENA_MAX in the start-up environment of the ingress, proxy and model replicas (None: not set)."""
    caps: dict[str, set[str | None]] = {}
    for pid, role in ray_processes(model).items():
        if role in ("ingress", "proxy", "model replica"):
            caps.setdefault(role, set()).add(process_env(pid).get(ARENA_MAX))
    return caps


def session(config_path: Path, model: str, count_tokens: Any, cap: str) -> dict[int, float]:
    """One `modelserve up` on this config, Ray started with this cap: decode tokens/s at each concurrency."""
    (stream, stop), _ = modelserve_up(model, str(config_path), env={ARENA_MAX: cap})
    try:
        if (caps := arena_caps(model)) != {role: {cap} for role in ("ingress", "proxy", "model replica")}:
            raise RuntimeError(f"processes run with {ARENA_MAX} {caps}, expected {cap}")
        run_load(stream, 1, 2, 8)  # warm-up
        return {
            c: summarize("", c, *run_load(stream, c, requests(c, False), MAX_TOKENS), count_tokens).tokens_per_s
            for c in CONCURRENCIES
        }
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if subprocess.run(["ray", "status"], capture_output=True, check=False).returncode == 0:
        sys.exit("a Ray is already running here: this bench brings up its own with `modelserve up`")
    shipped_path = ROOT / "serve_config.yaml"
    cap = SERVE_PROCESS_ENV.get(ARENA_MAX)
    if cap is None:
        sys.exit(f"SERVE_PROCESS_ENV sets no {ARENA_MAX}: nothing to compare")
    uncapped_path = Path(tempfile.mkdtemp(prefix="arenas-")) / "serve_config.yaml"
    uncapped_path.write_text(yaml.safe_dump(uncapped_config(yaml.safe_load(shipped_path.read_text())), sort_keys=False))
    glibc_default = str(8 * os.cpu_count())  # glibc's count on 64-bit: 8 arenas per core
    model = shipped_model().name
    _, count_tokens = demo_model()
    runs: dict[str, list[dict[int, float]]] = {"default": [], "capped": []}
    for round_ in range(args.rounds):
        order = [("default", uncapped_path, glibc_default), ("capped", shipped_path, cap)]
        for name, path, expected in order if round_ % 2 == 0 else order[::-1]:
            runs[name].append(result := session(path, model, count_tokens, expected))
            rates = ", ".join(f"c={c} {tps:.1f}" for c, tps in result.items())
            print(f"round {round_ + 1} {name}: {rates}", flush=True)
    print(
        f"machine: {os.cpu_count()} CPUs, AMX: {'yes' if cpu_has_amx() else 'no'}; "
        f"{args.rounds} rounds, {MAX_TOKENS}-token streams, decode tokens/s"
    )
    for c in CONCURRENCIES:
        default, capped = (statistics.mean(run[c] for run in runs[name]) for name in ("default", "capped"))
        spread = {name: f"{min(r[c] for r in runs[name]):.1f}-{max(r[c] for r in runs[name]):.1f}" for name in runs}
        print(
            f"c={c}: default {default:.1f} ({spread['default']}), capped {capped:.1f} ({spread['capped']}), "
            f"capped/default={capped / default:.2f}"
        )


if __name__ == "__main__":
    main()
