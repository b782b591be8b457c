"""Unit-test fixtures: the real ingress app in this process (tests/support/ingress_app.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ingress_app import InProcessIngress, ingress_in_process


@pytest.fixture(scope="module")
def ingress() -> Iterator[InProcessIngress]:
    """One in-process ingress for a test module (stand-in models, no Ray)."""
    with pytest.MonkeyPatch.context() as monkeypatch, ingress_in_process(monkeypatch) as running:
        yield running
