"""A private Ray cluster for the access-control end-to-end tests, and the app deployed on it.

`ray start --block` runs in its own temp dir (so nothing else on the machine connects to it by accident)
with ports of its own; the app goes on with `serve deploy`, as an operator would; stopping signals only
that `ray start` process, which takes down what it started, then sweeps anything left carrying the temp dir.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import yaml

from serve_app.access.authn import api_key_hash
from serve_app.cli.serve_file import application_entries
from tests.support.auth_helpers import SECRET_1, claims
from tests.support.ray_nodes import RayNode, cluster_env, free_ports, processes_carrying, sweep

ISSUER, AUDIENCE = "https://idp.test/", "modelserve-test"
API_KEY = "msk-test-service-account-key"
APP = "authtest"
ROUTE_PREFIX = "/ms"  # not "/": the app must not care where Serve mounts it
ALLOWED, HIDDEN = "tiny-chat", "secret-model"
# A few seconds of greedy tiny-model decoding that never meets EOS: holds a request open.
LONG = {"model": ALLOWED, "prompt": "hello there", "max_tokens": 1500, "temperature": 0}
# The tiny model makes ~2000 tokens/s: a stream that must still be running when the test acts next.
HELD = {**LONG, "max_tokens": 7000}


def e2e_policy(keys: dict[str, Any]) -> dict[str, Any]:
    return {
        "auth": {
            "algorithms": ["HS256", "RS256"],
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "public_key_files": {"rsa-1": str(keys["rsa_path"])},
        },
        "default": {"models": []},
        "tenants": {
            "team-a": {"models": ["tiny-*"], "max_tokens": 8},
            "strict": {"models": ["tiny-*"], "max_tokens": 8, "over_max_tokens": "reject"},
            "rpm": {"models": ["tiny-*"], "requests_per_minute": 6},
            "tpm": {"models": ["tiny-*"], "tokens_per_minute": 2000},
            "conc": {"models": ["tiny-*"], "max_concurrent_requests": 1},
        },
        "api_keys": [{"name": "svc", "sha256": api_key_hash(API_KEY), "tenant": "team-a"}],
    }


def token(tenant: str, roles: tuple[str, ...] = (), kid: str = "k1", secret: str = SECRET_1, **extra: Any) -> str:
    return jwt.encode(
        claims(tenant, roles=list(roles), **{"iss": ISSUER, "aud": AUDIENCE, **extra}),
        secret,
        "HS256",
        headers={"kid": kid},
    )


class Cluster:
    """A private Ray head (`ray start --block` in its own temp dir) and the app deployed on it by `serve deploy`."""

    def __init__(self, root: Path, keys: dict[str, Any], model_path: Path, ingress_settings: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.ingress_settings = ingress_settings or {}
        self.keys = keys
        self.model_path = model_path
        self.temp_dir = Path(tempfile.mkdtemp(prefix="msauth-", dir="/tmp"))  # short: Ray puts sockets here
        (http,) = free_ports(1)
        self.base_url = f"http://127.0.0.1:{http}{ROUTE_PREFIX}"
        self.http_port = http
        self.env = cluster_env(
            MODELSERVE_JWT_SECRET_FILE=str(keys["secret_dir"]),
            MODELSERVE_CACHE_DIR=str(root / "weight-cache"),
            **(env or {}),
        )
        self.head = RayNode("head", root, self.temp_dir, self.env, num_cpus=4)
        self.gcs, self.dashboard = self.head.address, self.head.dashboard

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.head.check_running()
            try:
                # `serve deploy` first reads /api/version: the dashboard can serve Serve's API before it
                if httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=5).status_code == 200:
                    httpx.get(f"{self.dashboard}/api/version", timeout=5).json()
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError("the Ray dashboard did not come up")

    def stop(self) -> None:
        """Stop only this cluster: SIGTERM its `ray start --block` (which stops what it started), then sweep."""
        self.head.stop()
        sweep(self.temp_dir, self.root)

    def leftover_pids(self) -> list[int]:
        return processes_carrying(self.temp_dir)

    def config(self, policy: dict[str, Any]) -> dict[str, Any]:
        model = {
            "source": str(self.model_path),
            "engine": {"n_ctx": 8192, "n_threads": 1, "stream_interval_ms": 20, "parallel": 8},
            "deployment": {"num_replicas": 1},
        }
        ingress = {
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}},
            **self.ingress_settings,
        }
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": application_entries(
                [{"name": ALLOWED, **model}, {"name": HIDDEN, **model}],
                {"ingress": ingress},
                name=APP,
                route_prefix=ROUTE_PREFIX,
                policy=policy,
            ),
        }

    def deploy(self, policy: dict[str, Any], timeout_s: float = 180) -> None:
        """`serve deploy` the app with this policy as the ingress user_config; wait until every replica runs it."""
        path = self.root / "serve_config.yaml"
        path.write_text(yaml.safe_dump(self.config(policy), sort_keys=False))
        result = subprocess.run(
            ["serve", "deploy", str(path), "--address", self.dashboard],
            check=False,
            env={**self.env, "RAY_ADDRESS": self.gcs},
            text=True,
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            apps = self.details().get("applications", {})
            if failed := [a.get("message") for a in apps.values() if a.get("status") == "DEPLOY_FAILED"]:
                raise AssertionError(f"deploy failed: {failed}")
            ingress = apps.get(APP, {}).get("deployments", {}).get("ingress", {})
            if (
                set(apps) == {APP, ALLOWED, HIDDEN}
                and all(a.get("status") == "RUNNING" for a in apps.values())
                and ingress.get("status") == "HEALTHY"
                and ingress.get("deployment_config", {}).get("user_config") == policy
            ):
                return
            time.sleep(0.5)
        raise AssertionError(f"app not running with the new policy after {timeout_s}s: {self.details()}")

    def details(self) -> dict[str, Any]:
        return httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10).json()

    def replicas(self) -> dict[str, set[tuple[str, int]]]:
        """Replica ids and PIDs of every deployment of every application."""
        return {
            f"{app}/{name}": {(r["replica_id"], r["pid"]) for r in d["replicas"]}
            for app, details in self.details()["applications"].items()
            for name, d in details["deployments"].items()
        }

    def replica_logs(self, deployment: str, app: str = APP) -> dict[str, str]:
        logs = self.temp_dir / "session_latest" / "logs" / "serve"
        return {p.name: p.read_text(errors="replace") for p in logs.glob(f"replica_{app}_{deployment}_*.log")}

    def all_logs(self) -> str:
        logs = self.temp_dir / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())

    def audit_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(replica log file, audit record) for every request an ingress replica logged."""
        lines = []
        for name, text in self.replica_logs("ingress").items():
            for line in text.splitlines():
                if '{"event":"request"' in line:
                    lines.append((name, json.loads(line[line.index('{"event":"request"') :])))
        return lines

    def client(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
