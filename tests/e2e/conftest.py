"""Fixtures of the e2e tests beyond the session's cluster (tests/conftest.py): an admin client, the S3 model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.cli.tokens import mint_token
from tests.support.cluster import TINY_S3, TINY_S3_SOURCE, deploy_with, model_app, model_defaults
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3, subprocess_env


@pytest.fixture(scope="module")
def admin(app_url: str) -> httpx.Client:
    token = mint_token(os.environ["MODELSERVE_JWT_SECRET"], "ops", ["admin"], 3600)
    return httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


@pytest.fixture
def s3_model(config_path: Path, tiny_path: Path, tmp_path: Path) -> Iterator[str]:
    """The tiny model pushed with `modelserve push` to a real S3 server (moto) and served from s3://.

    Deployed only for the tests that ask: its application reaches the server the way replicas reach
    MinIO in production, through AWS_* variables (here its runtime_env), and is removed afterwards.
    """
    with MotoS3() as store:
        store.client().create_bucket(Bucket="models")
        pushed = subprocess.run(
            [sys.executable, "-m", "serve_app.cli", "push", str(tiny_path), TINY_S3_SOURCE],
            capture_output=True, text=True, timeout=120, env=subprocess_env(store.endpoint_url),
        )
        assert pushed.returncode == 0, pushed.stderr
        app = model_app(TINY_S3, TINY_S3_SOURCE, model_defaults(config_path),
                        engine={"n_ctx": 256, "n_threads": 1, "parallel": 2},
                        deployment={"max_queued_requests": 4})
        app["runtime_env"] = {"env_vars": {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": store.endpoint_url}}
        deploy_with(config_path, tmp_path, app)
        try:
            yield TINY_S3
        finally:
            deploy_with(config_path, tmp_path, None)
