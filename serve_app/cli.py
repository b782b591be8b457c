"""`modelserve` command line: bring the app up locally, validate configs, and the operator subcommands."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import yaml

from serve_app.config import ConfigError
from serve_app.serve_config import ServeConfigApps, load_serve_config, parse_serve_config, use_serve_process_env

DASHBOARD = "http://127.0.0.1:8265"


def _validate(path: str) -> tuple[dict[str, Any], ServeConfigApps] | None:
    """The Serve config and its modelserve applications, parsed; None after printing what is wrong (by field)."""
    try:
        config = load_serve_config(path)
        return config, parse_serve_config(config, str(path))
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    if (validated := _validate(args.config)) is None:
        return 1
    _, apps = validated
    for app, _ in apps.ingress:
        print(f"ok  ingress  application={app['name']}  route_prefix={app.get('route_prefix', '/')}")
    for _, spec in apps.models:
        print(f"ok  {spec.name}  backend={spec.backend}  source={spec.source}  deployment={spec.deployment_name}")
    return 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Ray CLI command. `ray start` and the `serve` CLI must agree on Ray's token auth, so
    RAY_AUTH_MODE defaults to `token` for all of them (the token lives in ~/.ray/auth_token)."""
    env = {"RAY_AUTH_MODE": "token", **os.environ, **(env or {})}
    return subprocess.run(cmd, check=False, text=True, capture_output=True, env=env)


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
    if (validated := _validate(args.config)) is None:
        return 1
    config, apps = validated
    from serve_app import cli_auth

    state = cli_auth.state_dir()
    secret_env = cli_auth.dev_secret_env(state)  # generated once (0600) unless MODELSERVE_JWT_SECRET[_FILE] is set
    if not _ray_running():
        cpus = str(args.num_cpus or max(4, os.cpu_count() or 1))
        print(f"starting a local Ray head (127.0.0.1, {cpus} CPU slots, dashboard {DASHBOARD}) ...", flush=True)
        ray_env = {**os.environ, **secret_env}
        use_serve_process_env(ray_env)  # what the caller exports wins
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
    model = apps.models[0][1].name
    token = cli_auth.mint_token(cli_auth.dev_secret(state), "dev", [], 12 * 3600)
    print(f"\nmodelserve is up: {base}/v1  (Ray dashboard: {DASHBOARD})")
    print(f"dev token (tenant 'dev', 12 h; `modelserve token --tenant dev` mints more):\n\n  export TOKEN={token}\n")
    print(
        f"curl {base}/v1/chat/completions -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n"
        f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
        f"\"max_tokens\": 32}}'"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not _ray_running():
        print("no local Ray cluster is running")
        return 0
    _run(["serve", "shutdown", "--yes", "--address", DASHBOARD])
    if not args.keep_ray:
        stopped = _run(["ray", "stop"])
        print((stopped.stdout.strip().splitlines() or ["ray stopped"])[-1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)

    up = subparsers.add_parser("up", help="start local Ray if needed, deploy the config, wait until healthy")
    up.add_argument("config", nargs="?", default="serve_config.yaml")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be healthy")
    up.add_argument("--num-cpus", type=int, default=None, help="CPU slots of a newly started local Ray")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser("down", help="remove the Serve apps and stop the local Ray")
    down.add_argument("--keep-ray", action="store_true", help="only shut Serve down")
    down.set_defaults(func=cmd_down)

    validate = subparsers.add_parser("validate", help="check a Serve config without deploying it")
    validate.add_argument("config", nargs="?", default="serve_config.yaml")
    validate.set_defaults(func=cmd_validate)

    for module in _operator_modules():
        module.register(subparsers)
    return parser


def _operator_modules() -> list[Any]:
    from serve_app import cli_auth, cli_render, cli_weights

    return [cli_auth, cli_weights, cli_render]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
