"""The weight cache as a starting replica uses it: a store outage is waited out, not a failed start.

Serve gives up on a deployment whose replicas fail to start a few times in a row (DEPLOY_FAILED,
and no further attempts until the next deploy), so a replica that failed on an unreachable S3
would need an operator once S3 is back. Here a transient fetch error (the store unreachable or
failing; an interrupted download keeps its partial file and resumes) is retried with backoff for
as long as it lasts, and each wait is reported, so the model shows as starting with the reason.
Anything else (no such object, access denied, disk full, corrupt transfer) fails at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from deployments.spec import StorageSettings
from deployments.weights.cache import Progress, WeightCache
from deployments.weights.entries import WeightFetchError

logger = logging.getLogger("modelserve.weights")

FIRST_WAIT_S = 1.0
MAX_WAIT_S = 15.0


class PatientWeightCache(WeightCache):
    """`fetch` retries transient failures with backoff, telling `report` why it waits (None: no longer)."""

    def __init__(self, report: Callable[[str | None], None], root: Path | str | None = None,
                 first_wait_s: float = FIRST_WAIT_S, max_wait_s: float = MAX_WAIT_S) -> None:
        super().__init__(root)
        self._report = report
        self._first_wait_s, self._max_wait_s = first_wait_s, max_wait_s

    def fetch(
        self, source: str, storage: StorageSettings | None = None, *, label: str = "", progress: Progress | None = None
    ) -> Path:
        attempt = 0
        try:
            while True:
                try:
                    return super().fetch(source, storage, label=label, progress=progress)
                except WeightFetchError as exc:
                    if not exc.transient:
                        raise
                    attempt += 1
                    wait = min(self._max_wait_s, self._first_wait_s * 2 ** (attempt - 1))
                    logger.warning("%s (attempt %d); retrying in %.0f s", exc, attempt, wait)
                    self._report(f"waiting for weights (attempt {attempt}, next in {wait:.0f} s): {exc}")
                    time.sleep(wait)
        finally:
            self._report(None)
