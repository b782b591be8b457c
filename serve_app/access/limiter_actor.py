"""Per-tenant rate limits shared by every ingress replica, without Redis: one named, detached Ray actor.

The actor holds the truth: per tenant a requests bucket and a tokens bucket (capacity = the per-minute
limit, refilled continuously) and the concurrency slots each ingress replica holds. Replicas talk to it in
`Exchange`s (limiter_client.py): each takes what a request needs plus a small extra to admit the
next requests locally, or hands spare credit back. An exchange is atomic, and everything a replica admits
was first taken here, so the sum over replicas never exceeds a limit. A tokens bucket may go into debt
(real usage above the reservation) that later requests wait out. Slots of a replica that died free
themselves after HOLDING_TTL_S. The actor restarts on failure with full buckets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import ray

HOLDING_TTL_S = 30.0
BORROW_FRACTION = 0.02
SLOT_BORROW_DIVISOR = 8


@dataclass(frozen=True)
class Limits:
    """One tenant's limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests) == (None, None, None)

    def extra_requests(self) -> int:
        return int((self.requests_per_minute or 0) * BORROW_FRACTION)

    def extra_tokens(self) -> int:
        return int((self.tokens_per_minute or 0) * BORROW_FRACTION)

    def extra_slots(self) -> int:
        return (self.max_concurrent_requests or 0) // SLOT_BORROW_DIVISOR


@dataclass(frozen=True)
class Quota:
    """One bucket's state for the OpenAI `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Exchange:
    """One replica-to-actor message: credit handed back and, to admit a request, what it needs (+ extra)."""

    need_requests: int = 0
    need_tokens: float = 0.0
    need_slots: int = 0
    extra_requests: int = 0
    extra_tokens: int = 0
    extra_slots: int = 0
    give_requests: float = 0.0
    give_tokens: float = 0.0  # negative: tokens used beyond those taken (debt)
    give_slots: int = 0

    @property
    def admits(self) -> bool:
        return bool(self.need_requests or self.need_tokens or self.need_slots)


@dataclass(frozen=True)
class Grant:
    admitted: bool
    requests: int = 0
    tokens: float = 0.0
    slots: int = 0
    exceeded: str | None = None  # "requests" | "tokens" | "concurrency"
    retry_after_s: float = 0.0
    requests_quota: Quota | None = None
    tokens_quota: Quota | None = None


@dataclass
class Bucket:
    """A token bucket refilled at capacity/60 per second; `level` may go negative (debt)."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float, capacity: float) -> None:
        self.capacity = capacity  # a policy change keeps the debt and caps the credit
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def quota(self) -> Quota:
        return Quota(int(self.capacity), max(0, math.floor(self.level)), self.seconds_until(self.capacity))


@dataclass
class Holding:
    slots: int
    expires: float


@dataclass
class TenantBuckets:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    holdings: dict[str, Holding] = field(default_factory=dict)


def _bucket(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(capacity=limit, level=limit, updated=now)
    bucket.refill(now, limit)
    return bucket


def _take(bucket: Bucket, need: float, extra: float) -> float:
    taken = need + min(extra, max(0.0, math.floor(bucket.level - need)))
    bucket.level -= taken
    return taken


class TokenBuckets:
    """The actor's arithmetic, apart from Ray so it can be tested with a fake clock."""

    def __init__(self) -> None:
        self._tenants: dict[str, TenantBuckets] = {}

    def exchange(self, holder: str, tenant: str, limits: Limits, ask: Exchange, now: float) -> Grant:
        """Take back spare credit, then grant what the request needs (+ extra) or refuse; atomic."""
        state = self._tenants.setdefault(tenant, TenantBuckets())
        state.requests = _bucket(state.requests, limits.requests_per_minute, now)
        state.tokens = _bucket(state.tokens, limits.tokens_per_minute, now)
        for name in [h for h, holding in state.holdings.items() if holding.expires <= now]:
            del state.holdings[name]
        holding = state.holdings.setdefault(holder, Holding(0, now))
        holding.expires = now + HOLDING_TTL_S
        if state.requests is not None:
            state.requests.level = min(state.requests.capacity, state.requests.level + ask.give_requests)
        if state.tokens is not None:
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + ask.give_tokens)
        holding.slots = max(0, holding.slots - ask.give_slots)
        grant = self._grant(state, holding, limits, ask) if ask.admits else Grant(True)
        if holding.slots == 0:
            del state.holdings[holder]
        return replace(grant, requests_quota=_quota(state.requests), tokens_quota=_quota(state.tokens))

    @staticmethod
    def _grant(state: TenantBuckets, holding: Holding, limits: Limits, ask: Exchange) -> Grant:
        free_slots = (limits.max_concurrent_requests or 0) - sum(h.slots for h in state.holdings.values())
        requests, tokens = state.requests, state.tokens
        if ask.need_requests and requests is not None and requests.level < ask.need_requests:
            return Grant(False, exceeded="requests", retry_after_s=requests.seconds_until(ask.need_requests))
        if ask.need_tokens and tokens is not None and tokens.level < ask.need_tokens:
            return Grant(False, exceeded="tokens", retry_after_s=tokens.seconds_until(ask.need_tokens))
        if ask.need_slots and limits.max_concurrent_requests is not None and free_slots < ask.need_slots:
            return Grant(False, exceeded="concurrency", retry_after_s=1.0)
        take_requests = _take(requests, ask.need_requests, ask.extra_requests) if ask.need_requests and requests else 0
        take_tokens = _take(tokens, ask.need_tokens, ask.extra_tokens) if ask.need_tokens and tokens else 0.0
        take_slots = ask.need_slots + min(ask.extra_slots, max(0, free_slots - ask.need_slots)) if ask.need_slots else 0
        holding.slots += take_slots
        return Grant(True, int(take_requests), take_tokens, take_slots)

    def held_slots(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return sum(h.slots for h in state.holdings.values()) if state else 0


def _quota(bucket: Bucket | None) -> Quota | None:
    return bucket.quota() if bucket is not None else None


# Calls record no task events, like the usage ledger's (usage_actor.py says why).
@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class RateLimiter:
    """The one place the buckets live; methods run one at a time, so each exchange is atomic."""

    def __init__(self) -> None:
        self._buckets = TokenBuckets()

    def exchange(self, holder: str, tenant: str, limits: Limits, ask: Exchange) -> Grant:
        return self._buckets.exchange(holder, tenant, limits, ask, time.monotonic())

    def held_slots(self, tenant: str) -> int:
        return self._buckets.held_slots(tenant)
