"""Refusing early and cheaply when a model has no slot to give, and telling refused clients when to come back.

Under overload the costly part of a refusal is what comes before it: the limiter's round trip, the
call to a replica and the wait for the queue deadline, all on the cores the admitted requests decode
on (bench/bench_overload.py). So each ingress replica watches its own traffic to each model: once a
request missed the deadline, a tenant that already has as many requests waiting as slots free up in
two deadlines (as fast as requests started lately, or as the streams in flight should end; at least
two) is refused at once (another tenant still reaches the replica's fair queue). A tenant's
only request in flight is not held to the deadline at all: the fair queue admits it first, so it
waits at most for the next free slot, however busy other tenants keep the model.

Retry-After is a place in line, per tenant: the tenant's refused clients are told to come back one
after another, each when the next slot should free up. The ingress knows when: it sees every stream
it admitted progress towards its token budget. Past the slots it can foresee, they are spaced as far
apart as slots free up for the tenant; beyond 30 s (what clients honour) they are spread over its
second half, holding no place. So clients that honour it (the OpenAI SDK does) find a slot when
they return, instead of returning as one herd, or staying away while slots sit idle; and a
flooding tenant's long line is not given to a tenant that sends little.
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect_right, insort
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from deployments.api import SamplingParams

WINDOW_S = 5.0  # rates are measured over the last few seconds; shedding lasts this long after a missed deadline
MAX_RETRY_AFTER_S = 30.0  # the OpenAI SDK honours a Retry-After of up to 60 s
MIN_RETRY_AFTER_S = 0.1  # what `retry-after-ms` says at least; `Retry-After` says whole seconds


class Overloaded(Exception):
    """The request cannot start in time; `retry_after_s` is how long its client should wait."""

    def __init__(self, why: str, retry_after_s: float) -> None:
        super().__init__(why)
        self.why, self.retry_after_s = why, retry_after_s


def token_budget(sampling: SamplingParams) -> int | None:
    """The most completion tokens a request may produce over all its choices, as far as the ingress knows."""
    limit = sampling.max_tokens if sampling.max_tokens is not None else sampling.max_tokens_cap
    return None if limit is None else limit * sampling.n


def release(counts: Counter[str], tenant: str) -> None:
    """One fewer for the tenant; a tenant at zero leaves the counter, so it holds only tenants with traffic."""
    counts[tenant] -= 1
    if not counts[tenant]:
        del counts[tenant]


class Ticket:
    """A request's place in its tenant's count of requests in flight, from admission to the end of its stream, and
    how far its generation got (so when it should give its slot back)."""

    def __init__(self, live: set[Ticket], in_flight: Counter[str], tenant: str, budget: int | None) -> None:
        self._live, self._in_flight, self._tenant, self._budget = live, in_flight, tenant, budget
        self.alone = not in_flight[tenant]  # nothing else of its tenant in flight: the fair queue puts it first
        in_flight[tenant] += 1
        live.add(self)
        self._open, self.opened_at = True, time.monotonic()
        self._first: tuple[float, int] | None = None  # (when, completion tokens) at its first chunk
        self._last: tuple[float, int] | None = None  # and at its latest

    def progress(self, completion_tokens: int) -> None:
        """A chunk passed with this many completion tokens so far."""
        mark = (time.monotonic(), completion_tokens)
        if self._first is None:
            self._first = mark
        else:
            self._last = mark

    @property
    def streaming(self) -> bool:
        return self._first is not None

    def ends_at(self) -> float | None:
        """When it runs out of token budget at its pace so far (it may stop sooner); None while that is unknown."""
        if self._budget is None or self._first is None or self._last is None or self._last[1] <= self._first[1]:
            return None
        (since, before), (now, tokens) = self._first, self._last
        return now + max(0, self._budget - tokens) * (now - since) / (tokens - before)

    def done(self) -> None:
        """Idempotent: a stream ends in one of several places."""
        if self._open:
            self._open = False
            self._live.discard(self)
            release(self._in_flight, self._tenant)


class SlotPressure:
    """One model's queue as this ingress replica sees it: who waits, how fast slots free up, how often we refuse."""

    def __init__(self, deadline_s: float) -> None:
        self._deadline_s = deadline_s
        self._waiting: Counter[str] = Counter()  # tenant -> requests not yet started
        self._in_flight: Counter[str] = Counter()  # tenant -> requests admitted and not yet ended
        self._live: set[Ticket] = set()  # the tickets of those requests
        self._starts: deque[tuple[float, str]] = deque()  # (when, tenant) over the last window
        self._returns: dict[str, list[float]] = {}  # tenant -> when its refused clients were told to come back
        self._missed_at = -math.inf

    @contextmanager
    def waiting(self, tenant: str, budget: int | None = None) -> Iterator[Ticket]:
        """Count the request as waiting for its slot, or refuse it at once if its tenant's share already waits.
        The ticket counts it in flight until `done()` (at the end of its stream, or here if it fails before);
        `budget` is the most completion tokens it may produce, if known."""
        now = time.monotonic()
        if now - self._missed_at < WINDOW_S and self._waiting[tenant] >= self._room(now):
            raise Overloaded(f"{self._waiting[tenant]} requests of this tenant already wait for a slot",
                             self._advise(tenant, now, ahead=self._waiting[tenant]))
        self._arrived(tenant, now)
        self._waiting[tenant] += 1
        ticket = Ticket(self._live, self._in_flight, tenant, budget)
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
        return self._advise(tenant, self._missed_at, ahead=max(0, self._waiting[tenant] - 1))

    def _advise(self, tenant: str, now: float, ahead: int) -> float:
        """The Retry-After for a refused request: when the next slot should free up that neither the tenant's `ahead`
        requests already waiting nor its clients refused before are told to take, less up to half a deadline
        (jitter; a client that comes a little early waits for the slot in the queue)."""
        self._forget_past_returns(now)
        told = self._returns.setdefault(tenant, [])
        foreseen = [(end, ticket.opened_at) for ticket in self._live if (end := ticket.ends_at()) is not None]
        ends = sorted(max(now, end) for end, _ in foreseen)
        place = len(told) + ahead
        if place < len(ends):
            at = ends[place]
        else:  # past what the streams in flight tell: a slot's time apart, after the last slot foreseen or promised
            spacing = self._spacing(tenant, now, foreseen)
            at = max([(ends[-1] if ends else now) + spacing * (place - len(ends) + 1), *(t + spacing for t in told[-1:])])
        if at > now + MAX_RETRY_AFTER_S:  # beyond the line clients honour: spread out, and not holding a place in it
            return random.uniform(0.5, 1.0) * MAX_RETRY_AFTER_S
        insort(told, at)
        return max(MIN_RETRY_AFTER_S, at - now - random.uniform(0, 0.5) * self._deadline_s)

    def _spacing(self, tenant: str, now: float, foreseen: list[tuple[float, float]]) -> float:
        """Seconds between two of the tenant's slots. The model's slots free up as fast as requests started lately,
        or, if faster, as the streams running take (each frees its slot once in as long as the foreseen ones take
        on average); the tenant gets its share of them (of the starts, at least an equal share)."""
        self._count(self._starts, now)
        starts = len(self._starts)
        per_s = max(1, starts) / WINDOW_S
        if foreseen:
            running = sum(ticket.streaming for ticket in self._live)
            per_s = max(per_s, running * len(foreseen) / sum(max(end - opened, self._deadline_s) for end, opened in foreseen))
        mine = sum(who == tenant for _, who in self._starts)
        share = max(mine / starts if starts else 0.0, 1 / len(self._in_flight.keys() | {tenant}))
        return 1 / (share * per_s)

    def _arrived(self, tenant: str, now: float) -> None:
        """A request that comes when a refused client of its tenant is due (up to a deadline early) takes that
        client's place: it now waits, or starts, and must not be counted twice."""
        told = self._returns.get(tenant)
        if told and told[0] <= now + self._deadline_s:
            del told[0]

    def _forget_past_returns(self, now: float) -> None:
        for tenant, told in list(self._returns.items()):
            del told[: bisect_right(told, now)]  # they came back, or gave up
            if not told:
                del self._returns[tenant]

    def _room(self, now: float) -> int:
        """Waiting requests per tenant that can expect a slot within two deadlines: as many as started in that time
        lately, or as the streams in flight should end in it; at least two."""
        within = now + 2 * self._deadline_s
        ending = sum(end is not None and end <= within for end in map(Ticket.ends_at, self._live))
        per_second = self._count(self._starts, now) / WINDOW_S
        return max(2, math.ceil(2 * per_second * self._deadline_s), ending)

    @staticmethod
    def _count(events: deque[tuple[float, str]], now: float) -> int:
        while events and events[0][0] < now - WINDOW_S:
            events.popleft()
        return len(events)
