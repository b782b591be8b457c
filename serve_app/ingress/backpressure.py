"""Refusing early and cheaply when a model has no slot to give, and telling refused clients when to come back.

Under overload the costly part of a refusal is what comes before it: the limiter's round trip, the
call to a replica and the wait for the queue deadline, all on the cores the admitted requests decode
on (bench/bench_overload.py). So each ingress replica watches its own traffic to each model: once a
request missed the deadline, a tenant that already has as many requests waiting as slots free up in
two deadlines is refused at once (another tenant still reaches the replica's fair queue). A tenant's
only request in flight is not held to the deadline at all: the fair queue admits it first, so it
waits at most for the next free slot, however busy other tenants keep the model.

Retry-After is a place in line, per tenant: refused clients are told to come back one after another,
as far apart as slots free up for that tenant (its own start rate, at least its fair share of the
model's), so clients that honour it (the OpenAI SDK does) find a slot when they return instead of
returning as one herd, or staying away while slots sit idle. A flooding tenant's long line is not
given to a tenant that sends little.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

WINDOW_S = 5.0  # rates are measured over the last few seconds; shedding lasts this long after a missed deadline
MAX_RETRY_AFTER_S = 30.0  # the OpenAI SDK honours a Retry-After of up to 60 s
MIN_RETRY_AFTER_S = 0.1  # what `retry-after-ms` says at least; `Retry-After` says whole seconds


class Overloaded(Exception):
    """The request cannot start in time; `retry_after_s` is how long its client should wait."""

    def __init__(self, why: str, retry_after_s: float) -> None:
        super().__init__(why)
        self.why, self.retry_after_s = why, retry_after_s


def release(counts: Counter[str], tenant: str) -> None:
    """One fewer for the tenant; a tenant at zero leaves the counter, so it holds only tenants with traffic."""
    counts[tenant] -= 1
    if not counts[tenant]:
        del counts[tenant]


class Ticket:
    """A request's place in its tenant's count of requests in flight, from admission to the end of its stream."""

    def __init__(self, in_flight: Counter[str], tenant: str) -> None:
        self._in_flight, self._tenant = in_flight, tenant
        self.alone = not in_flight[tenant]  # nothing else of its tenant in flight: the fair queue puts it first
        in_flight[tenant] += 1
        self._open = True

    def done(self) -> None:
        """Idempotent: a stream ends in one of several places."""
        if self._open:
            self._open = False
            release(self._in_flight, self._tenant)


class SlotPressure:
    """One model's queue as this ingress replica sees it: who waits, how fast slots free up, how often we refuse."""

    def __init__(self, deadline_s: float) -> None:
        self._deadline_s = deadline_s
        self._waiting: Counter[str] = Counter()  # tenant -> requests not yet started
        self._in_flight: Counter[str] = Counter()  # tenant -> requests admitted and not yet ended
        self._starts: deque[tuple[float, str]] = deque()  # (when, tenant) over the last window
        self._returns: dict[str, float] = {}  # tenant -> when its last refused client was told to come back
        self._missed_at = -math.inf

    @contextmanager
    def waiting(self, tenant: str) -> Iterator[Ticket]:
        """Count the request as waiting for its slot, or refuse it at once if its tenant's share already waits.
        The ticket counts it in flight until `done()` (at the end of its stream, or here if it fails before)."""
        now = time.monotonic()
        room = self._room(now)
        if now - self._missed_at < WINDOW_S and self._waiting[tenant] >= room:
            raise Overloaded(f"{self._waiting[tenant]} requests of this tenant already wait for a slot",
                             self._advise(tenant, now, ahead=self._waiting[tenant]))
        self._waiting[tenant] += 1
        ticket = Ticket(self._in_flight, tenant)
        try:
            yield ticket
        except BaseException:
            ticket.done()
            raise
        finally:
            release(self._waiting, tenant)

    def started(self, tenant: str) -> None:
        self._starts.append((time.monotonic(), tenant))

    def missed(self, tenant: str) -> float:
        """A request (still counted as waiting) waited the whole deadline: shed from now on; returns its Retry-After."""
        self._missed_at = time.monotonic()
        return self._advise(tenant, self._missed_at, ahead=self._waiting[tenant] - 1)

    def _advise(self, tenant: str, now: float, ahead: int) -> float:
        """The Retry-After for a refused request: one slot's time after the tenant's last refused client and after
        the `ahead` requests of the tenant already waiting; jittered within that slot's time, so clients keep order."""
        self._forget_past_returns(now)
        spacing = self._spacing(tenant, now)
        at = max(self._returns.get(tenant, -math.inf), now + spacing * ahead) + spacing
        self._returns[tenant] = at = min(at, now + MAX_RETRY_AFTER_S)
        return max(MIN_RETRY_AFTER_S, at - now + random.uniform(-0.5, 0.5) * spacing)

    def _spacing(self, tenant: str, now: float) -> float:
        """Seconds between two of the tenant's slots: its own start rate, at least an equal share of the model's."""
        self._count(self._starts, now)
        mine = sum(who == tenant for _, who in self._starts)
        tenants = len(self._in_flight.keys() | {tenant})
        return WINDOW_S / max(mine, max(1, len(self._starts)) / tenants)

    def _forget_past_returns(self, now: float) -> None:
        for tenant in [t for t, at in self._returns.items() if at < now - WINDOW_S]:
            del self._returns[tenant]

    def _room(self, now: float) -> int:
        """Waiting requests per tenant that can expect a slot within two deadlines (at least two)."""
        per_second = self._count(self._starts, now) / WINDOW_S
        return max(2, math.ceil(2 * per_second * self._deadline_s))

    @staticmethod
    def _count(events: deque[tuple[float, str]], now: float) -> int:
        while events and events[0][0] < now - WINDOW_S:
            events.popleft()
        return len(events)
