"""Per-tenant rate limits shared by every ingress replica: one named, detached Ray actor holds the buckets.

Requests per minute and tokens per minute are token buckets (capacity = the per-minute limit, refilled
continuously); concurrency is a count of open leases. A request takes one request token, reserves an
estimate of its tokens and opens a lease in one atomic actor call; when the response ends the ingress
settles the lease with the real usage (fire-and-forget), so the tokens bucket may go into debt that later
requests wait out. A replica that dies mid-request cannot settle: its leases expire after LEASE_TTL_S.
The actor restarts on failure with fresh (full) buckets.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

LIMITER_NAMESPACE = "modelserve"
LEASE_TTL_S = 900.0
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Limits:
    """One tenant's limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests) == (None, None, None)


@dataclass(frozen=True)
class Quota:
    """One bucket's state for the OpenAI `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Admission:
    admitted: bool
    lease_id: int | None = None
    exceeded: str | None = None  # "requests" | "tokens" | "concurrency"
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None


@dataclass
class Bucket:
    """A token bucket refilled at capacity/60 per second; `level` may go negative (debt) after settlement."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float, capacity: float) -> None:
        if capacity != self.capacity:  # the policy changed: keep the debt, cap the credit
            self.capacity = capacity
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def quota(self) -> Quota:
        return Quota(int(self.capacity), max(0, math.floor(self.level)), self.seconds_until(self.capacity))


@dataclass
class Lease:
    tenant: str
    reserved_tokens: int
    expires: float


@dataclass
class TenantState:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    leases: set[int] = field(default_factory=set)


def _bucket(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(capacity=limit, level=limit, updated=now)
    bucket.refill(now, limit)
    return bucket


class TokenBuckets:
    """The limiter's arithmetic, apart from Ray so it can be tested with a fake clock."""

    def __init__(self) -> None:
        self._tenants: dict[str, TenantState] = {}
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)

    def acquire(self, tenant: str, limits: Limits, reserve_tokens: int, now: float) -> Admission:
        """Admit one request (taking a request token, reserving tokens, opening a lease) or say why not."""
        state = self._tenants.setdefault(tenant, TenantState())
        state.requests = _bucket(state.requests, limits.requests_per_minute, now)
        state.tokens = _bucket(state.tokens, limits.tokens_per_minute, now)
        self._expire(state, now)
        reserve = min(reserve_tokens, limits.tokens_per_minute or reserve_tokens)

        def refusal(exceeded: str, wait_s: float) -> Admission:
            requests, tokens = (b.quota() if b else None for b in (state.requests, state.tokens))
            return Admission(False, exceeded=exceeded, retry_after_s=wait_s, requests=requests, tokens=tokens)

        if state.requests is not None and state.requests.level < 1:
            return refusal("requests", state.requests.seconds_until(1))
        if state.tokens is not None and state.tokens.level < reserve:
            return refusal("tokens", state.tokens.seconds_until(reserve))
        if limits.max_concurrent_requests is not None and len(state.leases) >= limits.max_concurrent_requests:
            return refusal("concurrency", 1.0)
        if state.requests is not None:
            state.requests.level -= 1
        if state.tokens is not None:
            state.tokens.level -= reserve
        lease_id = next(self._ids)
        self._leases[lease_id] = Lease(tenant, reserve if state.tokens is not None else 0, now + LEASE_TTL_S)
        state.leases.add(lease_id)
        return Admission(
            True,
            lease_id=lease_id,
            requests=state.requests.quota() if state.requests else None,
            tokens=state.tokens.quota() if state.tokens else None,
        )

    def release(self, lease_id: int, used_tokens: int) -> None:
        """Close a lease and replace its token reservation by the real usage."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return  # expired, or issued before a restart: nothing is held for it any more
        state = self._tenants[lease.tenant]
        state.leases.discard(lease_id)
        if state.tokens is not None and lease.reserved_tokens:
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + lease.reserved_tokens - used_tokens)

    def open_leases(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return len(state.leases) if state else 0

    def _expire(self, state: TenantState, now: float) -> None:
        for lease_id in [i for i in state.leases if self._leases[i].expires <= now]:
            state.leases.discard(lease_id)
            del self._leases[lease_id]


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimiter:
    """The one place the buckets live; methods run one at a time, so each acquire is atomic."""

    def __init__(self) -> None:
        self._buckets = TokenBuckets()

    def acquire(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission:
        return self._buckets.acquire(tenant, limits, reserve_tokens, time.monotonic())

    def release(self, lease_id: int, used_tokens: int) -> None:
        self._buckets.release(lease_id, used_tokens)

    def open_leases(self, tenant: str) -> int:
        return self._buckets.open_leases(tenant)


class LimiterUnavailable(Exception):
    """The shared limiter did not answer; the ingress refuses rather than serve unlimited."""


class SharedLimiter:
    """An ingress replica's handle on the named limiter actor (created by whichever replica comes first)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor: ray.actor.ActorHandle | None = None

    def connect(self) -> None:
        """Look up (or create) the actor now, so its process is up before the first limited request."""
        self._handle()

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = RateLimiter.options(
                name=self.name, namespace=LIMITER_NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote()
        return self._actor

    async def acquire(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission:
        try:
            return await asyncio.wait_for(
                self._handle().acquire.remote(tenant, limits, reserve_tokens), CALL_TIMEOUT_S
            )
        except (RayActorError, GetTimeoutError, asyncio.TimeoutError) as exc:
            self._actor = None
            raise LimiterUnavailable(str(exc)) from None

    def release(self, lease_id: int, used_tokens: int) -> None:
        """Fire-and-forget: settlement never delays a response, and a lost one expires with its lease."""
        try:
            self._handle().release.remote(lease_id, used_tokens)
        except RayActorError:
            self._actor = None
