"""A Serve config file as modelserve reads it: one ingress application plus one application per model.

`modelserve validate`, `up`, `render` and `policy sync` check the whole file here, so a
config with a typo or a misnamed application is refused before `serve deploy` starts any of it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from serve_app.config import (
    INGRESS_DEPLOYMENT,
    INGRESS_IMPORT_PATH,
    MODEL_IMPORT_PATH,
    IngressArgs,
    parse_ingress_args,
    parse_model_args,
)

# Environment of every Ray process modelserve runs in (`ray start` in `modelserve up`, the KubeRay pods,
# tests and benches). Ray's defaults suit large nodes; on a small CPU node every Ray process's timers
# and every hop of a stream item take CPU from the model's decode threads.
# - The controller reconciles twice a second instead of ten times (autoscaling delays are in seconds).
# - Replicas, proxies and handles export Serve's cached metrics once a second instead of ten times
#   (Prometheus scrapes every 10-15 s).
# - Proxy -> ingress -> model calls and their streams stay on Ray actor calls, not Serve's direct gRPC data
#   plane (part of Ray's "throughput optimized" mode): grpcio 1.85 keeps ~230 bytes of native memory per
#   cancelled stream (grpc/grpc#43360, open; bench/grpc_cancel_leak.py), on the proxy, the ingress and
#   the model alike, and every client disconnect cancels one. In a soak its leftovers were all of the
#   ingress's and the model replica's growth in live native memory (heaptrack). The plane was worth +5%
#   decode tokens/s at c=1 in paired runs on 2 vCPUs, within spread on the full benchmark (bench/README.md).
#   Export RAY_SERVE_USE_GRPC_BY_DEFAULT=1 to take it back once grpcio is fixed (the message limit below
#   keeps the plane's 4 MiB default from failing large requests then).
# - Replicas run our code on their own event loop rather than on a second loop in another thread, so
#   a stream item does not cross threads inside the replica (also part of that mode). Our deployments
#   never block their loop: weight fetches, model loads and Serve status reads go to threads.
# Measured on 2 vCPUs (bench_serving.py, c=1): idle Ray CPU 10.8% -> 7% of a core; decode tokens/s
# +4% (intervals) and +3-8% (one loop); time to first token -10 ms.
# - The gRPC plane, when on, refuses messages over 4 MiB by default: a request the ingress admits (a body
#   up to ingress.limits.max_body_bytes, 8 MiB) or a batch of embeddings failed between replicas with a 500.
# - glibc keeps 2 malloc arenas per process, not 8 per core: Ray's processes run 20-40 threads each, and
#   freed memory kept in many arenas was most of what Serve's proxy and controller and the model replicas
#   gained in a soak (proxy +0.9 MB after warm-up capped, +5.0 not). No decode cost measured
#   (bench/bench_malloc_arenas.py). serve_config.yaml sets it for our deployments too, for clusters
#   started without this environment.
# - Not set: RAY_task_events_max_num_task_in_gcs. Serve's handle calls record no task events and neither do
#   our limiter's and usage ledger's (enable_task_events=False), so the GCS holds none per request.
SERVE_PROCESS_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "MALLOC_ARENA_MAX": "2",
}


def use_serve_process_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add SERVE_PROCESS_ENV to an environment (the process's own by default) where it sets nothing else.

    Before `ray.init` or `ray start`: every Ray process started from there inherits it.
    """
    for key, value in SERVE_PROCESS_ENV.items():
        environ.setdefault(key, value)


@dataclass(frozen=True)
class ServeConfigApps:
    """The validated modelserve applications of a Serve config, each with its application entry."""

    ingress: list[tuple[dict[str, Any], IngressArgs]]
    models: list[tuple[dict[str, Any], ModelSpec]]


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (the one `serve deploy` takes)."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict) or not isinstance(config.get("applications"), list):
        raise ConfigError(f"{path}: not a Serve config (no 'applications' list)")
    return config


def ingress_applications(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app for app in config["applications"] if app.get("import_path") == INGRESS_IMPORT_PATH]


def model_applications(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app for app in config["applications"] if app.get("import_path") == MODEL_IMPORT_PATH]


def application_entries(
    models: list[dict[str, Any]],
    ingress_args: dict[str, Any] | None = None,
    *,
    name: str = "modelserve",
    route_prefix: str = "/",
    policy: dict[str, Any] | None = None,
    model_defaults: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The `applications` of a Serve config for an ingress and these model entries, shaped as serve_config.yaml."""
    ingress: dict[str, Any] = {
        "name": name, "route_prefix": route_prefix, "import_path": INGRESS_IMPORT_PATH, "args": ingress_args or {}
    }
    if policy is not None:
        ingress["deployments"] = [{"name": INGRESS_DEPLOYMENT, "user_config": policy}]
    return [ingress] + [
        {
            "name": model["name"],
            "route_prefix": None,
            "import_path": MODEL_IMPORT_PATH,
            "args": {"model_defaults": model_defaults or {}, "model": model},
        }
        for model in models
    ]


def parse_serve_config(config: dict[str, Any], where: str = "serve config") -> ServeConfigApps:
    """Validate every modelserve application; raise ConfigError naming the application and the bad field."""
    ingress, models = ingress_applications(config), model_applications(config)
    if not ingress:
        raise ConfigError(f"{where}: no application with import_path {INGRESS_IMPORT_PATH}")
    if not models:
        raise ConfigError(f"{where}: no model application (import_path {MODEL_IMPORT_PATH})")
    parsed = ServeConfigApps([], [])
    for app in ingress:
        parsed.ingress.append((app, _parse(where, app, parse_ingress_args)))
    for app in models:
        spec = _parse(where, app, parse_model_args)
        name = app.get("name")
        if name != spec.name:
            raise ConfigError(
                f"{where}: application {name!r} serves model {spec.name!r}: name the application after its "
                "model (the ingress finds each model by its application's name)"
            )
        if "route_prefix" not in app or app["route_prefix"] is not None:
            raise ConfigError(
                f"{where}: application {name!r}: set `route_prefix: null` (a model is reached only through "
                "the ingress, which authenticates and applies policy)"
            )
        parsed.models.append((app, spec))
    return parsed


def _parse(where: str, app: dict[str, Any], parse: Any) -> Any:
    try:
        return parse(app.get("args"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: application {app.get('name', '?')!r}: {exc}") from None


def validated_config(path: str | Path) -> tuple[dict[str, Any], ServeConfigApps] | None:
    """The Serve config and its modelserve applications, parsed; None after printing what is wrong (by field)."""
    try:
        config = load_serve_config(path)
        return config, parse_serve_config(config, str(path))
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
