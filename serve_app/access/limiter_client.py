"""An ingress replica's side of the shared rate limits: admit from borrowed credit, settle, hand back.

A round trip to the limiter actor (limiter_actor.py) costs about a millisecond, so a replica borrows:
when its allowance for a tenant runs short it makes one exchange, taking what the request needs plus a
small extra (2% of a per-minute limit, an eighth of a concurrency limit: nothing for small limits, which
therefore stay exact), and admits the following requests locally. Tokens are reserved from an estimate
and settled with the real usage when the response ends. Spare credit goes back at once when it exceeds
the extra, and entirely within FLUSH_S once a tenant goes idle; held slots are renewed while in use.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve import metrics

from serve_app.access.limiter_actor import Exchange, Grant, Limits, Quota, RateLimiter

logger = logging.getLogger("ray.serve.modelserve.limits")

LIMITER_NAMESPACE = "modelserve"
CALL_TIMEOUT_S = 10.0
FLUSH_S = 1.0


@dataclass(frozen=True)
class Lease:
    """An admitted request's claim, settled when its response ends."""

    tenant: str
    reserved_tokens: float


@dataclass(frozen=True)
class Admission:
    admitted: bool
    lease: Lease | None = None
    exceeded: str | None = None
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None


@dataclass
class Allowance:
    """One replica's credit for one tenant, taken from the shared buckets."""

    limits: Limits
    requests: float = 0.0
    tokens: float = 0.0
    slots: int = 0
    in_use: int = 0
    busy: bool = False
    requests_quota: Quota | None = None
    tokens_quota: Quota | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def shortfall(self, reserve: float) -> Exchange | None:
        """What to ask the shared buckets for before admitting a request (None: local credit covers it)."""
        limits = self.limits
        need_requests = int(limits.requests_per_minute is not None and self.requests < 1)
        need_tokens = max(0.0, reserve - self.tokens) if limits.tokens_per_minute is not None else 0.0
        need_slots = int(limits.max_concurrent_requests is not None and self.slots <= self.in_use)
        if not (need_requests or need_tokens or need_slots):
            return None
        return Exchange(
            need_requests, need_tokens, need_slots, limits.extra_requests(), limits.extra_tokens(), limits.extra_slots()
        )

    def credit(self, grant: Grant) -> None:
        self.requests += grant.requests
        self.tokens += grant.tokens
        self.slots += grant.slots
        self.requests_quota = grant.requests_quota or self.requests_quota
        self.tokens_quota = grant.tokens_quota or self.tokens_quota

    def admit(self, reserve: float) -> None:
        if self.limits.requests_per_minute is not None:
            self.requests -= 1
        if self.limits.tokens_per_minute is not None:
            self.tokens -= reserve
        self.in_use += 1
        self.busy = True

    def quotas(self) -> tuple[Quota | None, Quota | None]:
        """(requests, tokens) as the caller sees them: the shared bucket plus this replica's unspent credit."""
        return self._view(self.requests_quota, self.requests), self._view(self.tokens_quota, self.tokens)

    def spare(self, keep: bool) -> Exchange | None:
        """Credit beyond what is kept on hand (nothing kept when `keep` is False), removed from here."""
        keep_requests, keep_tokens, keep_slots = (
            (self.limits.extra_requests(), self.limits.extra_tokens(), self.limits.extra_slots()) if keep else (0, 0, 0)
        )
        give_requests = max(0.0, self.requests - keep_requests)
        give_tokens = self.tokens - min(max(self.tokens, 0.0), keep_tokens)  # debt is always handed over
        give_slots = max(0, self.slots - self.in_use - keep_slots)
        self.requests -= give_requests
        self.tokens -= give_tokens
        self.slots -= give_slots
        if not (give_requests or give_tokens or give_slots):
            return None
        return Exchange(give_requests=give_requests, give_tokens=give_tokens, give_slots=give_slots)

    @staticmethod
    def _view(quota: Quota | None, local: float) -> Quota | None:
        """What the tenant has left: the shared bucket plus this replica's credit, never above the limit
        (credit borrowed before an idle refill would otherwise count twice)."""
        if quota is None:
            return None
        return Quota(quota.limit, min(quota.limit, quota.remaining + max(0, math.floor(local))), quota.reset_s)


Send = Callable[[str, str, Limits, Exchange], Awaitable[Grant]]
Post = Callable[[str, str, Limits, Exchange], None]


class Allowances:
    """A replica's side: admit from local credit, exchange with the shared buckets only when short."""

    def __init__(self, holder: str, send: Send, post: Post) -> None:
        self.holder = holder
        self._send = send
        self._post = post
        self._tenants: dict[str, Allowance] = {}

    async def acquire(self, tenant: str, limits: Limits, reserve_tokens: float) -> Admission:
        reserve = min(reserve_tokens, limits.tokens_per_minute or reserve_tokens)
        allowance = self._allowance(tenant, limits)
        if allowance.shortfall(reserve) is not None:
            async with allowance.lock:  # one exchange per tenant at a time; waiters reuse its extra
                ask = allowance.shortfall(reserve)
                if ask is not None:
                    grant = await self._send(self.holder, tenant, limits, ask)
                    allowance.credit(grant)
                    if not grant.admitted:
                        return Admission(
                            False,
                            exceeded=grant.exceeded,
                            retry_after_s=grant.retry_after_s,
                            requests=grant.requests_quota,
                            tokens=grant.tokens_quota,
                        )
                allowance.admit(reserve)  # no await since the grant: nobody else spent it
        else:
            allowance.admit(reserve)
        requests, tokens = allowance.quotas()
        return Admission(True, Lease(tenant, reserve), requests=requests, tokens=tokens)

    def release(self, lease: Lease, used_tokens: int) -> None:
        """Settle: free the slot, replace the reservation by the real usage, hand back what is spare."""
        allowance = self._tenants.get(lease.tenant)
        if allowance is None:
            return
        allowance.in_use -= 1
        if allowance.limits.tokens_per_minute is not None:
            allowance.tokens += lease.reserved_tokens - used_tokens
        spare = allowance.spare(keep=True)
        if spare is not None:
            self._post(self.holder, lease.tenant, allowance.limits, spare)

    def flush(self) -> None:
        """Periodic: tenants idle since the last flush hand everything back; held slots renew their TTL."""
        for tenant, allowance in list(self._tenants.items()):
            if allowance.lock.locked():
                continue
            spare = allowance.spare(keep=allowance.busy)
            allowance.busy = False
            if spare is not None or allowance.slots:
                self._post(self.holder, tenant, allowance.limits, spare or Exchange())
            if not (allowance.slots or allowance.in_use or allowance.requests or allowance.tokens):
                del self._tenants[tenant]

    def _allowance(self, tenant: str, limits: Limits) -> Allowance:
        allowance = self._tenants.get(tenant)
        if allowance is None:
            allowance = self._tenants[tenant] = Allowance(limits)
        elif allowance.limits != limits:  # the policy changed: hand back everything spare under the old one
            spare = allowance.spare(keep=False)
            if spare is not None:
                self._post(self.holder, tenant, allowance.limits, spare)
            allowance.limits = limits
        return allowance


class LimiterUnavailable(Exception):
    """The shared limiter did not answer; the ingress refuses rather than serve unlimited (fail closed)."""


class LimiterHealth:
    """Whether the limiter answers, as metrics: while it does not, limited requests get 503 (fail closed)."""

    def __init__(self, name: str) -> None:
        self._tags = {"limiter": name}
        self._available = metrics.Gauge(
            "modelserve_limiter_available", tag_keys=("limiter",),
            description="1 while the shared rate limiter answers, 0 from a failed call until the next one succeeds.",
        )
        self._failures = metrics.Counter(
            "modelserve_limiter_failures", tag_keys=("limiter",),
            description="Calls to the shared rate limiter that failed or timed out (each request refused with 503).",
        )

    def up(self) -> None:
        self._available.set(1, tags=self._tags)

    def failed(self) -> None:
        self._available.set(0, tags=self._tags)
        self._failures.inc(tags=self._tags)


class SharedLimiter:
    """An ingress replica's link to the named limiter actor (created by whichever replica comes first)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor: ray.actor.ActorHandle | None = None
        self._allowances = Allowances(uuid.uuid4().hex, self._send, self._post)
        self._flusher: asyncio.Task[None] | None = None
        self._health = LimiterHealth(name)

    def connect(self) -> None:
        """Look up (or create) the actor now, so its process is up before the first limited request."""
        self._handle()
        self._health.up()

    async def acquire(self, tenant: str, limits: Limits, reserve_tokens: float) -> Admission:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        try:
            return await self._allowances.acquire(tenant, limits, reserve_tokens)
        except (RayActorError, GetTimeoutError, asyncio.TimeoutError) as exc:
            self._actor = None  # the next call looks the actor up again (Ray restarts it, or it is created anew)
            self._health.failed()
            raise LimiterUnavailable(str(exc)) from None

    def release(self, lease: Lease, used_tokens: int) -> None:
        self._allowances.release(lease, used_tokens)

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = RateLimiter.options(
                name=self.name, namespace=LIMITER_NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote()
        return self._actor

    async def _send(self, holder: str, tenant: str, limits: Limits, ask: Exchange) -> Grant:
        grant = await asyncio.wait_for(self._submit(holder, tenant, limits, ask), CALL_TIMEOUT_S)
        self._health.up()
        return grant

    def _post(self, holder: str, tenant: str, limits: Limits, ask: Exchange) -> None:
        """Fire-and-forget: handing credit back never delays a response (a lost message only under-admits)."""
        try:
            self._submit(holder, tenant, limits, ask)
        except RayActorError:
            self._actor = None

    def _submit(self, holder: str, tenant: str, limits: Limits, ask: Exchange) -> ray.ObjectRef:
        """Call the actor on behalf of this replica, never as a child task of the request being served.

        Ray makes an actor call the child of the request task in whose context it is made, and Serve cancels
        that task recursively when the client disconnects. A limiter call cancelled before it was sent leaves a
        gap in this replica's ordered calls to the actor, which then holds every later call from this replica
        (each arrival restarts its wait for the missing one): after one unlucky disconnect every limited request
        through this replica got 503. A call made from an empty context has no request parent to be cancelled by.
        """
        return contextvars.Context().run(lambda: self._handle().exchange.remote(holder, tenant, limits, ask))

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self._allowances.flush()
            except Exception:  # keep flushing: a stopped flusher would strand credit and expire held slots
                logger.exception("rate-limit flush failed")
