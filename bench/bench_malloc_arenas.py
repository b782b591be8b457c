"""What glibc's malloc arena cap costs the model replica's decode: the shipped config (`MALLOC_ARENA_MAX=2` in
the model applications' `runtime_env`) against the same without it (glibc's default, 8 arenas per core).

The cap keeps a many-threaded replica's freed memory in 2 arenas instead of up to 16 on 2 cores (probe
in bench/README.md); this asks what it costs. Each round brings the app up with `modelserve up` (the
shipped config, and the variant written to a temporary file; the order alternates between rounds),
checks the model replicas' start-up environment, and streams 64-token completions from the demo model
at each concurrency. The means over rounds count. Refuses to run while a Ray is up.

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
from serve_app.cli.serve_file import model_applications

CONCURRENCIES = (1, 8, 16)
ARENA_MAX = "MALLOC_ARENA_MAX"


def model_env_vars(config: dict[str, Any]) -> list[dict[str, str]]:
    """Every model application's `runtime_env.env_vars` (its defaults' and its own) in this config."""
    found = []
    for app in model_applications(config):
        for entry in (app["args"].get("model_defaults") or {}, app["args"]["model"]):
            options = (entry.get("deployment") or {}).get("ray_actor_options") or {}
            found.append((options.get("runtime_env") or {}).get("env_vars") or {})
    return found


def uncapped_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the cap taken out of every model application (the ingress keeps its own)."""
    uncapped = copy.deepcopy(config)
    for env_vars in model_env_vars(uncapped):
        env_vars.pop(ARENA_MAX, None)
    return uncapped


def arena_caps(model: str) -> set[str | None]:
    """MALLOC_ARENA_MAX in the start-up environment of each of the model's replicas (None: not set)."""
    return {process_env(pid).get(ARENA_MAX) for pid, role in ray_processes(model).items() if role == "model replica"}


def session(config_path: Path, model: str, count_tokens: Any, cap: str | None) -> dict[int, float]:
    """One `modelserve up` on this config: decode tokens/s at each concurrency."""
    (stream, stop), _ = modelserve_up(model, str(config_path))
    try:
        if (caps := arena_caps(model)) != {cap}:
            raise RuntimeError(f"model replicas run with {ARENA_MAX} {caps}, expected {cap}")
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
    shipped = yaml.safe_load(shipped_path.read_text())
    cap = next((env[ARENA_MAX] for env in model_env_vars(shipped) if ARENA_MAX in env), None)
    if cap is None:
        sys.exit(f"serve_config.yaml sets no {ARENA_MAX} for its models: nothing to compare")
    uncapped_path = Path(tempfile.mkdtemp(prefix="arenas-")) / "serve_config.yaml"
    uncapped_path.write_text(yaml.safe_dump(uncapped_config(shipped), sort_keys=False))
    model = shipped_model().name
    _, count_tokens = demo_model()
    runs: dict[str, list[dict[int, float]]] = {"default": [], "capped": []}
    for round_ in range(args.rounds):
        order = [("default", uncapped_path, None), ("capped", shipped_path, cap)]
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
