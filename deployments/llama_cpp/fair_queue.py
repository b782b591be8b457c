"""The requests a replica holds waiting for a free slot, admitted by weighted fair share across tenants.

FIFO admission lets one tenant's burst put everyone else behind it. Here each tenant has a virtual
token counter (the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024): the tenant with the lowest counter is admitted next, and admitting a request charges its
tenant the tokens it may cost (prompt plus completion budget) divided by the tenant's `weight`; what a
request did not use is given back when it ends. A tenant that starts waiting is lifted to the lowest
counter of those already waiting, so idle time earns no credit to burst with later. Within a tenant,
lower `priority` goes first, then arrival order. Admitted sequences are never preempted.

Not thread-safe: the decode loop calls it under its own lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from deployments.llama_cpp.sequence import Feed, Submission


@dataclass
class _Tenant:
    counter: float = 0.0
    admitted_at: int = -1  # when it last had a request admitted (admission count): ties go to the longest unserved
    waiting: list[tuple[int, int, Submission]] = field(default_factory=list)  # (priority, arrival, submission)


class FairQueue:
    """Waiting submissions by tenant; `pop` takes the next one by fair share."""

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._arrivals = itertools.count()
        self._admissions = 0
        self._floor = 0.0  # the counter of the tenant admitted last: where a tenant arriving to an empty queue starts

    def __len__(self) -> int:
        return sum(len(tenant.waiting) for tenant in self._tenants.values())

    def __iter__(self) -> Iterator[Submission]:
        return (entry[2] for tenant in self._tenants.values() for entry in tenant.waiting)

    def push(self, submission: Submission) -> None:
        request = submission.request
        tenant = self._tenants.setdefault(request.tenant, _Tenant())
        if not tenant.waiting:
            tenant.counter = max(tenant.counter, self._lowest_waiting_counter())
        tenant.waiting.append((request.priority, next(self._arrivals), submission))
        tenant.waiting.sort(key=lambda entry: entry[:2])

    def remove(self, submission: Submission) -> None:
        """Drop a submission (its request was cancelled while it waited); absent ones are ignored."""
        tenant = self._tenants.get(submission.request.tenant)
        if tenant is not None:
            tenant.waiting = [entry for entry in tenant.waiting if entry[2] is not submission]

    def take(self, free_slots: int) -> list[Submission]:
        """The submissions to admit into `free_slots` (one per choice), in fair order; stops at one that does not fit,
        so a request asking for many choices is not passed over for ever."""
        taken = []
        while (head := self.peek()) is not None and head.request.sampling.n <= free_slots:
            taken.append(head)
            free_slots -= head.request.sampling.n
            self.pop()
        return taken

    def peek(self) -> Submission | None:
        """The submission admitted next: the head of the waiting tenant with the lowest counter (ties: the tenant
        served longest ago, so one lifted to a busy tenant's counter goes before it)."""
        waiting = [tenant for tenant in self._tenants.values() if tenant.waiting]
        if not waiting:
            return None
        return min(waiting, key=lambda tenant: (tenant.counter, tenant.admitted_at)).waiting[0][2]

    def pop(self) -> Submission | None:
        submission = self.peek()
        if submission is not None:
            tenant = self._tenants[submission.request.tenant]
            tenant.waiting.pop(0)
            tenant.admitted_at, self._admissions = self._admissions, self._admissions + 1
            self._floor = tenant.counter
            self._forget_idle()
        return submission

    def charge(self, feeds: list[Feed]) -> None:
        """Count the tokens a decode step fed (prompt or generated) against their requests' tenants."""
        for feed in feeds:
            request = feed.sequence.submission.request
            tenant = self._tenants.setdefault(request.tenant, _Tenant(self._floor))
            tenant.counter += len(feed.tokens) / request.weight

    def _lowest_waiting_counter(self) -> float:
        counters = [tenant.counter for tenant in self._tenants.values() if tenant.waiting]
        return min(counters) if counters else self._floor

    def _forget_idle(self) -> None:
        """Idle tenants at or below the floor would be lifted to it anyway: keep no state for them."""
        floor = self._lowest_waiting_counter()
        for name in [n for n, t in self._tenants.items() if not t.waiting and t.counter <= floor]:
            del self._tenants[name]
