"""The session's test cluster as the e2e tests see it: its ports and models, and how to change what it runs.

The app is deployed with `serve deploy` from a test copy of serve_config.yaml (tests/conftest.py);
these helpers deploy that config again with an extra model application, and read model states.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.config import MODEL_IMPORT_PATH

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT = 8000
DASHBOARD_PORT = 8265
METRICS_PORT = 8089
BASE_URL = f"http://127.0.0.1:{HTTP_PORT}"
APP_NAME = "modelserve"
GEMMA = "gemma-3-270m"
TINY = "tiny-llama"
TINY_ZERO = "tiny-llama-autoscaled"  # starts at zero replicas, scales 0..2 with short delays
TINY_DEFAULT_MAX_TOKENS = 12  # the tiny models' engine.default_max_tokens: what a request without max_tokens gets
EMBED = "gemma-3-270m-embed"  # the demo Gemma as an embedding model (mean pooling)
WEB_ORIGIN = "https://chat.example.com"  # the one web origin the test deployment allows (ingress.cors)
OTHER_TENANT = "dev-b"  # allowed what `dev` is (the session's policy); caches keep the two apart
TRACE_SERVICE = "modelserve-e2e"  # service.name of the session app's spans (its ingress, TINY and EMBED trace)
WEIGHTED_TENANTS = {"fair-heavy": 3.0, "fair-light": 1.0}  # policy weights: shares of a replica's slots
TINY_S3 = "tiny-llama-s3"  # deployed only while a test uses it (the s3_model fixture)
TINY_S3_SOURCE = "s3://models/tiny/tiny.gguf"


def model_app(name: str, source: str, defaults: dict[str, Any], **entry: Any) -> dict[str, Any]:
    """A model application as serve_config.yaml writes one: named after the model, no HTTP route."""
    return {
        "name": name,
        "route_prefix": None,
        "import_path": MODEL_IMPORT_PATH,
        "args": {"model_defaults": defaults, "model": {"name": name, "source": source, **entry}},
    }


def model_defaults(config_path: Path) -> dict[str, Any]:
    """The `model_defaults` the deployed test config gives its model applications."""
    return yaml.safe_load(config_path.read_text())["applications"][1]["args"]["model_defaults"]


def serve_cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `serve` CLI against the test cluster's dashboard."""
    cmd = ["serve", *argv, "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"]
    result = subprocess.run(cmd, text=True, capture_output=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for_apps(timeout_s: float = 300) -> dict[str, Any]:
    """Wait until `serve status` reports every application RUNNING; fail with the status on DEPLOY_FAILED."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = yaml.safe_load(serve_cli("status").stdout) or {}
        apps = status.get("applications") or {}
        if failed := {name: app for name, app in apps.items() if app.get("status") == "DEPLOY_FAILED"}:
            raise AssertionError(f"deploy failed: {failed}")
        if apps and all(app.get("status") == "RUNNING" for app in apps.values()):
            return apps
        time.sleep(1)
    raise AssertionError(f"applications not running after {timeout_s}s: {status}")


def deploy_with(
    config_path: Path, tmp_path: Path, extra_app: dict[str, Any] | list[dict[str, Any]] | None, wait: bool = True
) -> None:
    """`serve deploy` the session's config plus applications (None: the config as it is), and wait
    for every application to run (`wait=False`: for a deploy meant to fail)."""
    config = yaml.safe_load(config_path.read_text())
    config["applications"] += extra_app if isinstance(extra_app, list) else [extra_app] if extra_app else []
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve_cli("deploy", str(path))
    time.sleep(2)  # let the controller take the new config before polling its status
    if wait:
        wait_for_apps()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def model_states(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every model's state in the admin status (`admin` carries an admin token)."""
    response = admin.get("/v1/admin/status")
    assert response.status_code == 200, response.text
    return response.json()["models"]


def chat_text(chunks: list[Any], index: int = 0) -> str:
    """The text a streamed chat completion gave choice `index` (the SDK's chunks)."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
