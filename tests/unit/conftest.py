"""Unit-test fixtures: the real ingress app in this process (tests/support/ingress_app.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.support.ingress_app import InProcessIngress, ingress_in_process


@pytest.fixture(scope="module")
def ingress() -> Iterator[InProcessIngress]:
    """One in-process ingress for a test module (stand-in models, no Ray)."""
    with pytest.MonkeyPatch.context() as monkeypatch, ingress_in_process(monkeypatch) as running:
        yield running


def pytest_configure(config: pytest.Config) -> None:
    """What the imports made so far (Ray, FastAPI, schemathesis, ...: most of the ~200k objects that live as long as
    the session) is frozen: the garbage collector stops walking it in every full collection (a third of its time)."""
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    """And what importing the test modules added (llama.cpp, moto, ...)."""
    gc.freeze()
