"""Refusing early and cheaply when a model has no slot to give, and telling refused clients how long to stay away.

Under overload the costly part of a refusal is what comes before it: the limiter's round trip, the
call to a replica and the wait for the queue deadline, all on the cores the admitted requests decode
on (bench/bench_overload.py). So each ingress replica watches its own traffic to each model: once a
request missed the deadline, a tenant that already has as many requests waiting as slots free up in
two deadlines is refused at once (another tenant still reaches the replica's fair queue). A tenant's
only request in flight is not held to the deadline at all: the fair queue admits it first, so it
waits at most for the next free slot, however busy other tenants keep the model. Retry-After
follows the load, per tenant: it doubles (once clients had the time to follow it) while the tenant's
refusals outnumber the model's starts and halves each second when they do not, so clients that honour it (the OpenAI SDK does) come back about as fast as
slots free up, and a flooding tenant's long advice is not given to a tenant that sends little.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

WINDOW_S = 5.0  # rates are measured over the last few seconds; shedding lasts this long after a missed deadline
MAX_RETRY_AFTER_S = 30.0  # the OpenAI SDK honours a Retry-After of up to 60 s
ADVICE_INTERVAL_S = 1.0  # Retry-After shrinks at most once a second


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


@dataclass
class Advice:
    """One tenant's recent refusals and the wait its refusals advise."""

    refusals: deque[float] = field(default_factory=deque)
    wait_s: float = 1.0
    at: float = -math.inf


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
        self._starts: deque[float] = deque()
        self._advice: dict[str, Advice] = {}
        self._missed_at = -math.inf

    @contextmanager
    def waiting(self, tenant: str) -> Iterator[Ticket]:
        """Count the request as waiting for its slot, or refuse it at once if its tenant's share already waits.
        The ticket counts it in flight until `done()` (at the end of its stream, or here if it fails before)."""
        now = time.monotonic()
        room = self._room(now)
        if now - self._missed_at < WINDOW_S and self._waiting[tenant] >= room:
            raise Overloaded(f"{self._waiting[tenant]} requests of this tenant already wait for a slot",
                             self.refused(tenant, now))
        self._waiting[tenant] += 1
        ticket = Ticket(self._in_flight, tenant)
        try:
            yield ticket
        except BaseException:
            ticket.done()
            raise
        finally:
            release(self._waiting, tenant)

    def started(self) -> None:
        self._starts.append(time.monotonic())

    def missed(self, tenant: str) -> float:
        """A request waited the whole deadline: shed from now on; returns its Retry-After."""
        self._missed_at = time.monotonic()
        return self.refused(tenant, self._missed_at)

    def refused(self, tenant: str, now: float) -> float:
        """Count a refusal; the Retry-After to send, jittered so that refused clients do not return as one herd."""
        advice = self._advice.get(tenant)
        if advice is None:
            self._forget_quiet_tenants(now)
            advice = self._advice[tenant] = Advice()
        quiet = not advice.refusals or now - advice.refusals[-1] > WINDOW_S
        advice.refusals.append(now)
        if quiet:
            advice.wait_s, advice.at = 1.0, now  # a fresh overload starts from a short wait
        else:
            starts, refusals = self._count(self._starts, now), self._count(advice.refusals, now)
            factor = 2.0 if not starts else min(2.0, max(0.5, refusals / starts))
            # it grows once clients had the time to follow the last advice (else it overshoots and slots go idle)
            if now - advice.at >= (advice.wait_s if factor > 1 else ADVICE_INTERVAL_S):
                advice.wait_s = min(MAX_RETRY_AFTER_S, max(1.0, advice.wait_s * factor))
                advice.at = now
        return advice.wait_s * random.uniform(0.5, 1.5)

    def _forget_quiet_tenants(self, now: float) -> None:
        for tenant in [t for t, advice in self._advice.items() if now - advice.refusals[-1] > WINDOW_S]:
            del self._advice[tenant]

    def _room(self, now: float) -> int:
        """Waiting requests per tenant that can expect a slot within two deadlines (at least two)."""
        per_second = self._count(self._starts, now) / WINDOW_S
        return max(2, math.ceil(2 * per_second * self._deadline_s))

    @staticmethod
    def _count(events: deque[float], now: float) -> int:
        while events and events[0] < now - WINDOW_S:
            events.popleft()
        return len(events)
