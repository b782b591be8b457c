"""Every route fuzzed from the app's own OpenAPI document, in-process: no 5xx, every error OpenAI-shaped.

schemathesis generates valid and invalid requests (bodies, path parameters, wrong types, methods) for
each operation of the real ingress app (tests/support/ingress_app.py: stand-in models, no Ray), checked
as tests/support/fuzzing.py says; every stream the app opened must be finished or cancelled, and a
normal chat still works afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi
from starlette.testclient import TestClient

from tests.support.fuzzing import check_case
from tests.support.ingress_app import CHAT_MODEL, EMBED_MODEL, InProcessIngress

# Fuzzed cases per operation, after the coverage phase's deterministic boundary cases of every operation (~960 cases,
# ~1,900 requests, both modes). Ten still draw both positive and negative bodies for every operation that takes one
# (chat 7+3, completions 5+5, embeddings 4+6, usage 8+2); twenty cost 3 s more, most of it drawing recursive JSON.
# Derandomized: every run sends the same cases, so a failure reproduces.
EXAMPLES_PER_OPERATION = 10


@pytest.fixture(scope="module")
def session(ingress: InProcessIngress) -> Iterator[Any]:
    """One client for every call: each call starting its own event loop thread would cost the most. The app is in
    this process: no proxy or netrc to look up in the environment for each of ~2,000 requests."""
    with asgi.get_client(ingress.app) as client:
        client.trust_env = False
        yield client


@pytest.fixture(scope="module")
def app_schema(ingress: InProcessIngress) -> Any:
    schema = schemathesis.openapi.from_dict(ingress.app.openapi())
    schema.app = ingress.app
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_fuzzed_input_without_a_server_error(
    case: Any, ingress: InProcessIngress, session: Any
) -> None:
    check_case(case, lambda sent: sent.call(session=session, headers=ingress.auth), CHAT_MODEL, EMBED_MODEL)
    assert ingress.open_streams() == 0


def test_a_normal_chat_works_after_the_fuzzing(ingress: InProcessIngress) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    response = TestClient(ingress.app).post("/v1/chat/completions", json=body, headers=ingress.auth)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == " ok ok"
    assert ingress.open_streams() == 0
    assert ingress.usage.settled[-1] == ("fuzz", "fuzz", CHAT_MODEL, 2, 2)  # booked once the response ended
