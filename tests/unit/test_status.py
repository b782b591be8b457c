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


def test_a_model_whose_only_replica_died_is_starting_while_serve_replaces_it() -> None:
    replacing = classify("UNHEALTHY", {"STARTING": 1}, "A replica's health check failed.", "HEALTH_CHECK_FAILED")
    assert replacing.state == "starting" and replacing.starting_replicas == 1
    retrying = classify("UNHEALTHY", {"STARTING": 1}, "A replica failed to start.", "REPLICA_STARTUP_FAILED")
    assert retrying.state == "failed"
    assert classify("UNHEALTHY", {}, "A replica's health check failed.", "HEALTH_CHECK_FAILED").state == "failed"


def test_a_failed_model_gives_the_last_line_of_serves_message_without_the_exception_path() -> None:
    message = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
               "  File \"x.py\", line 1\ndeployments.api.EngineUnavailable: model 'm': llama.cpp could not load m.gguf")
    assert classify("DEPLOY_FAILED", {}, message).message == "model 'm': llama.cpp could not load m.gguf"
    assert classify("DEPLOY_FAILED", {}, "ValueError: bad").message == "ValueError: bad"
