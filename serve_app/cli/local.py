"""`modelserve up` and `down`: the app on this machine's own Ray, started and stopped by the Ray CLI.

`up` starts a local Ray head with the Serve process settings and the dev JWT secret, deploys the
config with `serve deploy`, waits for every application and sends each model one real request.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import yaml

from serve_app.cli import tokens
from serve_app.cli.serve_file import use_serve_process_env, validated_config

DASHBOARD = "http://127.0.0.1:8265"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Ray CLI command. `ray start` and the `serve` CLI must agree on Ray's token auth, so
    RAY_AUTH_MODE defaults to `token` for all of them (the token lives in ~/.ray/auth_token)."""
    env = {"RAY_AUTH_MODE": "token", **os.environ, **(env or {})}
    return subprocess.run(cmd, check=False, text=True, capture_output=True, env=env)


def _ensure_ray_token(env: dict[str, str]) -> str | None:
    """Create Ray's auth token (~/.ray/auth_token) unless it exists: `ray start` with token auth needs one
    and never creates it (only `ray.init()` does, silently). Returns an error message on failure."""
    result = _run(["ray", "get-auth-token", "--generate"], env=env)  # prints the token: never echo stdout
    return None if result.returncode == 0 else f"could not create Ray's auth token: {result.stderr.strip()}"


def local_cpus() -> int:
    """The cores this process may run on (its affinity, not the host's count): what local Ray offers replicas."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ray_running() -> bool:
    return _run(["ray", "status"]).returncode == 0


def _serve_status() -> dict[str, Any]:
    result = _run(["serve", "status", "--address", DASHBOARD])
    if result.returncode != 0:
        return {}
    return yaml.safe_load(result.stdout) or {}


def _wait_until_running(app_names: list[str], timeout_s: float) -> str | None:
    """Poll `serve status` until every app is RUNNING; return an error message on failure."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        apps = (_serve_status().get("applications") or {})
        states = {name: (apps.get(name) or {}).get("status", "NOT_STARTED") for name in app_names}
        if all(state == "RUNNING" for state in states.values()):
            return None
        failed = [name for name, state in states.items() if state in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            return yaml.safe_dump({name: apps[name] for name in failed}, sort_keys=False)
        summary = ", ".join(f"{n}={s}" for n, s in states.items())
        if summary != last:
            print(f"  waiting: {summary}", flush=True)
            last = summary
        time.sleep(2)
    return f"timed out after {timeout_s:.0f}s waiting for {', '.join(app_names)}"


def cmd_up(args: argparse.Namespace) -> int:
    if (validated := validated_config(args.config)) is None:
        return 1
    config, apps = validated
    state = tokens.state_dir()
    secret_env = tokens.dev_secret_env(state)  # generated once (0600) unless MODELSERVE_JWT_SECRET[_FILE] is set
    if not _ray_running():
        # Ray gets the real cores: a llama.cpp replica reserves one CPU per decode thread, so more CPU
        # slots than cores would let Ray put two replicas' threads on the same cores.
        cpus = str(args.num_cpus or local_cpus())
        print(f"starting a local Ray head (127.0.0.1, {cpus} CPUs, dashboard {DASHBOARD}) ...", flush=True)
        ray_env = {**os.environ, **secret_env}
        use_serve_process_env(ray_env)  # what the caller exports wins
        if problem := _ensure_ray_token(ray_env):
            print(f"error: {problem}", file=sys.stderr)
            return 1
        started = _run(
            ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
             "--num-cpus", cpus, "--disable-usage-stats"],
            env=ray_env,
        )
        if started.returncode != 0:
            print(f"error: ray start failed:\n{started.stderr or started.stdout}", file=sys.stderr)
            return 1
    print(f"deploying {args.config} ...", flush=True)
    deployed = _run(["serve", "deploy", args.config, "--address", DASHBOARD])
    if deployed.returncode != 0:
        print(f"error: serve deploy failed:\n{deployed.stderr or deployed.stdout}", file=sys.stderr)
        return 1
    problem = _wait_until_running([app["name"] for app, _ in apps.ingress + apps.models], args.timeout)
    if problem:
        if "no verification keys" in problem:
            problem += (
                "\nThe running Ray cluster was started without the JWT secret: run `modelserve down`, "
                "then `modelserve up` again (or start Ray with MODELSERVE_JWT_SECRET set)."
            )
        print(f"error: the application did not become healthy:\n{problem}", file=sys.stderr)
        return 1
    http = config.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    secret = tokens.dev_secret(state)
    probe_token = tokens.mint_token(secret, "modelserve-up", ["admin"], 600)
    failures = [problem for _, spec in apps.models if (problem := probe_model(base, probe_token, spec.name))]
    if failures:
        print("error: the application is deployed, but not every model answers:", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in failures), file=sys.stderr)
        return 1
    model = apps.models[0][1].name
    token = tokens.mint_token(secret, "dev", [], 12 * 3600)
    print(f"\nmodelserve is up: {base}/v1  (Ray dashboard: {DASHBOARD})")
    print(f"dev token (tenant 'dev', 12 h; `modelserve token --tenant dev` mints more):\n\n  export TOKEN={token}\n")
    print(
        f"curl {base}/v1/chat/completions -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n"
        f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
        f"\"max_tokens\": 32}}'"
    )
    return 0


def call_api(url: str, token: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """One JSON call to the app (GET without a body); (status, parsed body)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError) as exc:
        return 0, {"error": {"message": str(exc)}}


def probe_model(base: str, token: str, model: str, attempts: int = 4, pause_s: float = 5.0) -> str | None:
    """Send one real one-token request to a model; None if it answers, else what went wrong and why.

    Serve calls a replica healthy once it has loaded, but a replica can still die on its first decode
    (llama.cpp's AMX crash); a few attempts give the ingress time to see the crash loop and its reason.
    """
    message = ""
    for attempt in range(attempts):
        status, body = call_api(f"{base}/v1/completions", token, {"model": model, "prompt": "Hi", "max_tokens": 1}, 120)
        if status == 200:
            return None
        message = f"HTTP {status}: {(body.get('error') or {}).get('message', body)}"
        _, admin = call_api(f"{base}/v1/admin/status", token, None, 30)
        state = ((admin.get("models") or {}).get(model) or {})
        if state.get("state") == "failed":
            return f"{model}: failed: {state.get('message')}"
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    return f"{model}: a one-token request failed {attempts} times; last: {message}"


def cmd_down(args: argparse.Namespace) -> int:
    if not _ray_running():
        print("no local Ray cluster is running")
        return 0
    _run(["serve", "shutdown", "--yes", "--address", DASHBOARD])
    if not args.keep_ray:
        stopped = _run(["ray", "stop"])
        print((stopped.stdout.strip().splitlines() or ["ray stopped"])[-1])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start local Ray if needed, deploy the config, wait until healthy")
    up.add_argument("config", nargs="?", default="serve_config.yaml")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be healthy")
    up.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs a newly started local Ray offers (default: this machine's cores)")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser("down", help="remove the Serve apps and stop the local Ray")
    down.add_argument("--keep-ray", action="store_true", help="only shut Serve down")
    down.set_defaults(func=cmd_down)
