"""Token quotas and usage shared by every ingress replica: one named, detached Ray actor beside the limiter.

Quotas need one truth across replicas, and usage must outlive every process: the actor holds the
`Ledger` (usage.py), loads it from the usage log (usage_store.py) when it starts, and writes settled
usage there every `flush_interval_s`. Quota checks are exact (one call per request, no borrowing: a
daily budget has no burst to amortise). If the store cannot be read the actor fails to start and
restarts, and the ingress refuses quota-limited requests meanwhile rather than admit them unchecked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import date, datetime, timezone

import ray

from serve_app.access.usage import GroupBy, Ledger, QuotaGrant, QuotaScope, UsageRecord
from serve_app.access.usage_store import UsageSettings, describe_location, usage_log

logger = logging.getLogger("ray.serve.modelserve.usage")


# Calls record no task events (nor do Serve's handle calls): the GCS would keep one for each request's `settle`,
# up to Ray's 100,000-task cap, so the head's memory would grow with traffic (tests/e2e/test_gcs_footprint.py).
@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class UsageLedger:
    """Methods run on one event loop, so each reservation is atomic; storage I/O runs in a thread."""

    def __init__(self, settings: dict) -> None:
        self._settings = UsageSettings.model_validate(settings)
        self._log = usage_log(self._settings)
        rows, self._seq = self._log.load()
        self._ledger = Ledger(rows)
        self._pending: list[UsageRecord] = []
        self._since_snapshot = 0
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # one flush at a time: each takes the next seq
        logger.info("usage loaded from %s: %d rows, next log object %d", describe_location(self._settings),
                    len(rows), self._seq)

    async def reserve(self, reservation: str, scopes: list[QuotaScope], tokens: int) -> QuotaGrant:
        self._start_flusher()
        return self._ledger.reserve(reservation, scopes, tokens, datetime.now(timezone.utc))

    async def settle(self, reservation: str | None, tenant: str, key: str, model: str, prompt: int,
                     completion: int) -> None:
        self._start_flusher()
        record = None
        if model and (prompt or completion):
            day = datetime.now(timezone.utc).date().isoformat()
            record = UsageRecord(day, tenant, key, model, prompt, completion)
            self._pending.append(record)
        self._ledger.settle(reservation, record)

    async def query(self, tenant: str | None, key: str | None, model: str | None, start: date | None,
                    end: date | None, group_by: GroupBy) -> list[dict[str, str | int]]:
        return self._ledger.query(tenant, key, model, start, end, group_by)

    async def flush(self) -> int:
        """Write what was settled since the last flush as one log object (and now and then a snapshot)."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> int:
        records, self._pending = self._pending, []
        if not records:
            return self._seq
        seq = self._seq
        try:
            await asyncio.to_thread(self._log.append, seq, records)
        except Exception:
            self._pending = records + self._pending  # kept for the next flush: nothing is lost while S3 is down
            raise
        self._seq += 1
        self._since_snapshot += 1
        if self._since_snapshot >= self._settings.snapshot_every:
            rows = {row: replace(t) for row, t in self._ledger.rows.items()}  # through `seq`: copied before any await
            await asyncio.to_thread(self._log.snapshot, seq, rows)
            self._since_snapshot = 0
        return self._seq

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # keep flushing: the records stay pending until the store answers again
                logger.exception("writing usage to %s failed", describe_location(self._settings))
