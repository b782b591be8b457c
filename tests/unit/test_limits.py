"""Shared rate limits: the buckets and borrowing replicas, settlement, flush, expiry (fake clock, no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.access.limiter_actor import HOLDING_TTL_S, Exchange, Limits, TokenBuckets
from serve_app.access.limiter_client import Allowances


class SharedBuckets:
    """The limiter actor's arithmetic in-process, with a fake clock, serving several replicas' Allowances."""

    def __init__(self) -> None:
        self.buckets = TokenBuckets()
        self.now = 0.0
        self.round_trips = 0

    def replica(self, name: str) -> Allowances:
        async def send(holder: str, tenant: str, limits: Limits, ask: Exchange) -> Any:
            self.round_trips += 1
            return self.buckets.exchange(holder, tenant, limits, ask, self.now)

        def post(holder: str, tenant: str, limits: Limits, ask: Exchange) -> None:
            self.buckets.exchange(holder, tenant, limits, ask, self.now)

        return Allowances(name, send, post)


def admit(replica: Allowances, limits: Limits, reserve: float = 0, tenant: str = "t") -> Any:
    return asyncio.run(replica.acquire(tenant, limits, reserve))


def test_requests_per_minute_are_shared_and_refill_continuously() -> None:
    shared, limits = SharedBuckets(), Limits(requests_per_minute=3)
    a, b = shared.replica("a"), shared.replica("b")
    admitted = [admit(r, limits) for r in (a, b, a, b)]
    assert [x.admitted for x in admitted] == [True, True, True, False]
    assert [x.requests.remaining for x in admitted] == [2, 1, 0, 0]
    refused = admitted[-1]
    assert refused.exceeded == "requests" and refused.retry_after_s == pytest.approx(20.0)
    assert refused.requests.reset_s == pytest.approx(60.0)
    shared.now = 19.9
    assert not admit(a, limits).admitted
    shared.now = 20.0
    assert admit(b, limits).admitted and not admit(a, limits).admitted
    assert admit(a, limits, tenant="other-tenant").admitted


def test_tokens_are_reserved_then_settled_with_real_usage() -> None:
    shared, limits = SharedBuckets(), Limits(tokens_per_minute=40)  # small limit: no borrowing, exact
    a, b = shared.replica("a"), shared.replica("b")
    first = admit(a, limits, 25)
    assert first.admitted and first.tokens.remaining == 15
    refused = admit(b, limits, 25)
    assert not refused.admitted and refused.exceeded == "tokens" and refused.retry_after_s == pytest.approx(15.0)
    a.release(first.lease, used_tokens=5)  # 20 of the 25 reserved come back
    second = admit(b, limits, 25)
    assert second.admitted and second.tokens.remaining == 10
    b.release(second.lease, used_tokens=60)  # used more than reserved: the bucket goes into debt
    debt = admit(a, limits, 1)
    assert not debt.admitted and debt.retry_after_s == pytest.approx((1 + 25) * 60 / 40)
    assert admit(a, limits, 10_000, tenant="t2").admitted  # a reservation is capped at the bucket size


def test_concurrency_slots_are_shared_released_and_expire() -> None:
    shared, limits = SharedBuckets(), Limits(max_concurrent_requests=2)
    a, b = shared.replica("a"), shared.replica("b")
    first, second = admit(a, limits), admit(b, limits)
    assert first.admitted and second.admitted
    assert [x.exceeded for x in (admit(a, limits), admit(b, limits))] == ["concurrency", "concurrency"]
    a.release(first.lease, 0)
    assert shared.buckets.held_slots("t") == 1
    assert admit(b, limits).admitted and not admit(a, limits).admitted
    shared.now = HOLDING_TTL_S + 1  # replica b died holding two slots: they expire
    assert admit(a, limits).admitted and admit(a, limits).admitted


def test_replicas_borrow_so_most_requests_skip_the_round_trip_yet_never_overshoot() -> None:
    shared, limits = SharedBuckets(), Limits(1000, 1_000_000, 400)  # borrows 20 requests, 20k tokens, 50 slots
    replicas = [shared.replica(name) for name in "abc"]
    admitted, refused_in_a_row, turn = 0, 0, 0
    while refused_in_a_row < len(replicas):
        result = admit(replicas[turn % 3], limits, 100)
        turn += 1
        admitted += result.admitted
        refused_in_a_row = 0 if result.admitted else refused_in_a_row + 1
        if result.admitted:
            replicas[(turn - 1) % 3].release(result.lease, 100)
    assert admitted == 1000  # every request credit was spent, none twice
    assert shared.round_trips < 1000 / 10


def test_idle_credit_goes_back_on_flush() -> None:
    shared, limits = SharedBuckets(), Limits(requests_per_minute=1000)
    a, b = shared.replica("a"), shared.replica("b")
    assert admit(a, limits).requests.remaining == 999  # 1 used, 20 borrowed: shared 979 + a's 20
    a.flush()  # busy in the last period: keeps its credit
    assert admit(b, limits).requests.remaining == 958 + 20  # b borrowed too
    a.flush()  # idle for a whole period: hands everything back
    b.flush()
    b.flush()
    assert admit(b, limits).requests.remaining == 997
    assert shared.buckets.held_slots("t") == 0


def test_a_policy_change_applies_to_existing_buckets_and_credit() -> None:
    shared = SharedBuckets()
    a = shared.replica("a")
    for _ in range(10):
        assert admit(a, Limits(requests_per_minute=500)).admitted  # a holds 10 borrowed requests
    lowered = admit(a, Limits(requests_per_minute=5))
    assert lowered.admitted and lowered.requests.limit == 5 and lowered.requests.remaining == 4


def test_remaining_never_exceeds_the_limit_after_an_idle_refill() -> None:
    shared, limits = SharedBuckets(), Limits(requests_per_minute=600, tokens_per_minute=1_000_000)
    replica = shared.replica("a")
    assert admit(replica, limits, 1000).admitted  # borrows request and token credit beyond this request
    shared.now = 3600.0  # an idle hour: the shared bucket refills to the limit while the credit is still held
    again = admit(replica, limits, 600_000)  # more tokens than the credit: a fresh quota from the full bucket
    assert again.admitted
    assert again.requests.remaining <= 600 and again.tokens.remaining <= 1_000_000
