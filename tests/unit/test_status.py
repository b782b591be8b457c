"""Model states from Serve's deployment overview: what users see in /v1/models and what answers 503 at once."""

from __future__ import annotations

import pytest

from serve_app.ingress.status import classify


@pytest.mark.parametrize(
    ("status", "replicas", "state"),
    [
        ("HEALTHY", {"RUNNING": 2}, "ready"),
        ("UPSCALING", {"RUNNING": 1, "STARTING": 1}, "scaling"),
        ("HEALTHY", {}, "at_zero"),
        ("UPDATING", {"STARTING": 1}, "starting"),
        ("DEPLOY_FAILED", {"RUNNING": 1}, "failed"),
        ("UNHEALTHY", {"RUNNING": 0, "STARTING": 1}, "failed"),
        # One replica died while another serves: requests go to the healthy one, not a 503 for everyone.
        ("UNHEALTHY", {"RUNNING": 1, "STARTING": 1}, "ready"),
    ],
)
def test_serve_states_map_to_model_states(status: str, replicas: dict[str, int], state: str) -> None:
    assert classify(status, replicas, "A replica's health check failed.").state == state
