"""Token usage per day, tenant, key and model, and the daily/monthly token quotas checked against it.

Plain arithmetic, apart from Ray and storage so it can be tested with a fixed clock. The usage actor
(usage_actor.py) holds one `Ledger`: rows of settled usage (what the usage API reports and what is
persisted), per-quota totals derived from them, and the reservations of requests still running. A
request is admitted only if, for every quota of its tenant and key, used + reserved + its estimate
stays within the limit, as the rate limits do; when it ends the reservation is replaced by real usage.
Periods are calendar days and months in UTC.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

GroupBy = Literal["day", "month", "total"]
RowKey = tuple[str, str, str, str]  # (day YYYY-MM-DD, tenant, key, model)


@dataclass(frozen=True)
class QuotaLimits:
    """Token quotas (prompt + completion) of one tenant or API key; None means unlimited."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.tokens_per_day is None and self.tokens_per_month is None


@dataclass(frozen=True)
class QuotaScope:
    """Who a quota applies to: `tenant:<name>` or `key:<subject>`."""

    name: str
    limits: QuotaLimits


@dataclass(frozen=True)
class UsageRecord:
    """One finished request's usage, as settled and as appended to the durable log."""

    day: str
    tenant: str
    key: str
    model: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def row(self) -> RowKey:
        return (self.day, self.tenant, self.key, self.model)


@dataclass(frozen=True)
class QuotaGrant:
    admitted: bool
    scope: str = ""
    period: str = ""  # "day" | "month"
    limit: int = 0
    remaining: int = 0
    reset_at: datetime | None = None


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, requests: int, prompt: int, completion: int) -> None:
        self.requests += requests
        self.prompt_tokens += prompt
        self.completion_tokens += completion


def period_end(kind: str, now: datetime) -> datetime:
    """When a day or month quota resets: the next UTC midnight, or the first of the next month."""
    today = now.astimezone(timezone.utc).date()
    if kind == "day":
        end = today + timedelta(days=1)
    else:
        end = today.replace(day=calendar.monthrange(today.year, today.month)[1]) + timedelta(days=1)
    return datetime(end.year, end.month, end.day, tzinfo=timezone.utc)


def _periods(limits: QuotaLimits, day: str) -> list[tuple[str, int, str]]:
    """(kind, limit, period key) of each quota that is set: the day key is YYYY-MM-DD, the month key YYYY-MM."""
    pairs = (("day", limits.tokens_per_day, day), ("month", limits.tokens_per_month, day[:7]))
    return [(kind, limit, key) for kind, limit, key in pairs if limit is not None]


class Ledger:
    """Settled usage rows, the totals each quota is checked against, and open reservations."""

    def __init__(self, rows: dict[RowKey, Totals] | None = None) -> None:
        self.rows: dict[RowKey, Totals] = {}
        self._used: dict[tuple[str, str], int] = {}  # (scope name, period key) -> settled tokens
        self._reserved: dict[tuple[str, str], int] = {}
        self._reservations: dict[str, tuple[list[tuple[str, str]], int]] = {}
        for row, totals in (rows or {}).items():
            self._add(row, totals.requests, totals.prompt_tokens, totals.completion_tokens)

    def reserve(self, reservation: str, scopes: Iterable[QuotaScope], tokens: int, now: datetime) -> QuotaGrant:
        """Admit `tokens` against every quota of `scopes` (holding them until `settle`), or refuse naming one."""
        day = now.astimezone(timezone.utc).date().isoformat()
        held = []
        for scope in scopes:
            for kind, limit, period in _periods(scope.limits, day):
                taken = self._used.get((scope.name, period), 0) + self._reserved.get((scope.name, period), 0)
                if taken + tokens > limit:
                    return QuotaGrant(False, scope.name, kind, limit, max(0, limit - taken), period_end(kind, now))
                held.append((scope.name, period))
        for slot in held:
            self._reserved[slot] = self._reserved.get(slot, 0) + tokens
        self._reservations[reservation] = (held, tokens)
        return QuotaGrant(True)

    def settle(self, reservation: str | None, record: UsageRecord | None) -> None:
        """Drop the reservation (if this ledger holds it: not after a restart) and add the real usage."""
        held, tokens = self._reservations.pop(reservation, ([], 0)) if reservation else ([], 0)
        for slot in held:
            left = self._reserved.get(slot, 0) - tokens
            if left > 0:
                self._reserved[slot] = left
            else:
                self._reserved.pop(slot, None)
        if record is not None:
            self._add(record.row, 1, record.prompt_tokens, record.completion_tokens)

    def _add(self, row: RowKey, requests: int, prompt: int, completion: int) -> None:
        self.rows.setdefault(row, Totals()).add(requests, prompt, completion)
        day, tenant, key, _ = row
        for scope in (f"tenant:{tenant}", f"key:{key}"):
            for period in (day, day[:7]):
                self._used[(scope, period)] = self._used.get((scope, period), 0) + prompt + completion

    def query(
        self,
        tenant: str | None = None,
        key: str | None = None,
        model: str | None = None,
        start: date | None = None,
        end: date | None = None,
        group_by: GroupBy = "day",
    ) -> list[dict[str, str | int]]:
        """Usage rows matching the filters (dates inclusive), summed per period, tenant, key and model."""
        grouped: dict[RowKey, Totals] = {}
        for (day, row_tenant, row_key, row_model), totals in self.rows.items():
            if (tenant and row_tenant != tenant) or (key and row_key != key) or (model and row_model != model):
                continue
            if (start and day < start.isoformat()) or (end and day > end.isoformat()):
                continue
            period = {"day": day, "month": day[:7], "total": ""}[group_by]
            grouped.setdefault((period, row_tenant, row_key, row_model), Totals()).add(
                totals.requests, totals.prompt_tokens, totals.completion_tokens
            )
        return [
            {
                "period": period, "tenant": row_tenant, "key": row_key, "model": row_model,
                "requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                "total_tokens": t.prompt_tokens + t.completion_tokens,
            }
            for (period, row_tenant, row_key, row_model), t in sorted(grouped.items())
        ]
