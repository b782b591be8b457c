"""The ingress's early refusal and Retry-After advice (serve_app/ingress/backpressure.py), on a clock the test moves."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from deployments.api import SamplingParams
from serve_app.ingress import backpressure
from serve_app.ingress.backpressure import (
    MAX_RETRY_AFTER_S,
    WINDOW_S,
    Overloaded,
    SlotPressure,
    Ticket,
    token_budget,
)

DEADLINE_S = 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(backpressure.time, "monotonic", fake)
    monkeypatch.setattr(backpressure.random, "uniform", lambda low, high: low)  # no jitter: exact advice
    return fake


def hold(pressure: SlotPressure, tenant: str, count: int, stack: ExitStack) -> None:
    for _ in range(count):
        stack.enter_context(pressure.waiting(tenant))


def test_nothing_is_refused_early_until_a_request_missed_the_deadline(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    with ExitStack() as stack:
        hold(pressure, "a", 50, stack)  # a queue of any length: the replica's deadline decides


def test_after_a_miss_a_tenant_with_its_share_waiting_is_refused_at_once_and_others_are_not(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    pressure.missed("a")
    with ExitStack() as stack:
        hold(pressure, "a", 2, stack)  # at least two may wait however slowly slots free up
        with pytest.raises(Overloaded, match="2 requests of this tenant already wait") as refused:
            hold(pressure, "a", 1, stack)
        assert refused.value.retry_after_s >= 1
        hold(pressure, "b", 2, stack)  # another tenant still reaches the replica's fair queue
    hold(pressure, "a", 2, ExitStack())  # leaving the wait (started, refused, cancelled) frees the room


def test_the_room_grows_with_the_rate_slots_free_up(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    for _ in range(40):  # 8 starts a second over the window: 8 expected in two deadlines
        pressure.started("a")
    pressure.missed("a")
    with ExitStack() as stack:
        hold(pressure, "a", 8, stack)
        with pytest.raises(Overloaded):
            hold(pressure, "a", 1, stack)


def test_shedding_ends_a_window_after_the_last_miss(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    pressure.missed("a")
    clock.now += WINDOW_S + 0.1
    with ExitStack() as stack:
        hold(pressure, "a", 10, stack)


def refuse(pressure: SlotPressure, tenant: str, stack: ExitStack) -> float:
    with pytest.raises(Overloaded) as refused:
        hold(pressure, tenant, 1, stack)
    return refused.value.retry_after_s


def streaming(pressure: SlotPressure, clock: Clock, tenant: str, budget: int, done: int, per_s: float) -> Ticket:
    """A request admitted and streaming: `done` of its `budget` tokens produced, `per_s` a second."""
    with pressure.waiting(tenant, budget) as ticket:
        pass  # started: no longer waiting, still in flight
    clock.now -= done / per_s
    ticket.progress(0)
    clock.now += done / per_s
    ticket.progress(done)
    return ticket


def test_refused_clients_are_told_to_come_back_when_the_streams_in_flight_should_end(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    for _ in range(10):  # two starts a second: past what the streams tell, a slot every 0.5 s
        pressure.started("a")
    ends_in = [streaming(pressure, clock, "a", 100, done, 10.0) for done in (10, 70, 40)]  # 9, 3 and 6 s to go
    assert [ticket.ends_at() - clock.now for ticket in ends_in] == [9.0, 3.0, 6.0]
    with pressure.waiting("a"):
        assert pressure.missed("a") == 3.0  # the first slot to free up
    with ExitStack() as stack:
        hold(pressure, "a", 2, stack)  # two may wait: they take the next two slots, refused clients the ones after
        assert [refuse(pressure, "a", stack) for _ in range(4)] == [9.5, 10.0, 10.5, 11.0]
        ends_in[1].done()  # a stream ended early (a stop): its slot is no longer foreseen
        clock.now += 1.0  # and the line is kept as time passes
        assert refuse(pressure, "a", stack) == 11.0
    with pressure.waiting("a", 10) as fresh:
        fresh.progress(1)
        assert fresh.ends_at() is None  # one chunk gives no pace yet: nothing foreseen
    with pressure.waiting("a") as unbounded:
        unbounded.progress(1), unbounded.progress(2)
        assert unbounded.ends_at() is None  # no token budget: nothing foreseen


def test_without_streams_to_go_by_refused_clients_come_back_as_far_apart_as_slots_free_up(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    for _ in range(10):  # two starts a second: a slot frees up every 0.5 s
        pressure.started("a")
    with pressure.waiting("a"):
        assert pressure.missed("a") == 0.5
    with ExitStack() as stack:
        hold(pressure, "a", 2, stack)  # the first is the refused client coming back: it takes its own place
        assert [refuse(pressure, "a", stack) for _ in range(4)] == [1.5, 2.0, 2.5, 3.0]
        advice = [refuse(pressure, "a", stack) for _ in range(100)]
        assert max(advice) <= MAX_RETRY_AFTER_S  # a flood's line is cut at what clients honour; the rest are spread
        assert advice[-1] == MAX_RETRY_AFTER_S / 2  # over its second half, holding no place in the line
        hold(pressure, "b", 2, stack)  # another tenant: no start of its own yet, so half of the model's slots
        assert refuse(pressure, "b", stack) == 3.0  # behind its own two waiting, not behind the flooder's line
    clock.now += MAX_RETRY_AFTER_S + 1  # a fresh overload after a quiet spell starts a fresh line
    with ExitStack() as stack:
        pressure.started("a")
        hold(pressure, "a", 1, stack)
        assert pressure.missed("a") == WINDOW_S  # one start in the window: one slot in its length


def test_as_many_may_wait_as_streams_should_end_within_two_deadlines(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    for done in (95, 96, 97, 98, 10):  # four end within a second (two deadlines), one in 9 s
        streaming(pressure, clock, "a", 100, done, 10.0)
    pressure.missed("a")
    with ExitStack() as stack:
        hold(pressure, "a", 4, stack)  # not only two: four slots free up before they would miss the deadline
        with pytest.raises(Overloaded):
            hold(pressure, "a", 1, stack)


def test_retry_after_is_jittered_a_little_early(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    pressure = SlotPressure(DEADLINE_S)
    for _ in range(10):
        pressure.started("a")
    monkeypatch.setattr(backpressure.random, "uniform", lambda low, high: high)
    with pressure.waiting("a"):
        assert pressure.missed("a") == 0.25  # 0.5 s to the next slot, less at most half a deadline: it waits there


def test_the_token_budget_counts_every_choice_and_falls_back_to_the_tenants_cap() -> None:
    assert token_budget(SamplingParams(max_tokens=16, n=3)) == 48
    assert token_budget(SamplingParams(max_tokens_cap=100)) == 100
    assert token_budget(SamplingParams()) is None


def test_a_tenants_only_request_in_flight_is_alone_until_its_stream_ends(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    with pressure.waiting("b") as first:
        assert first.alone  # the fair queue admits it first: it is not held to the deadline
    with pressure.waiting("b") as second:  # the first still streams: this one waits behind it
        assert not second.alone
    with pressure.waiting("a") as other:
        assert other.alone  # another tenant's traffic does not count
    first.done(), second.done(), first.done()  # idempotent: a stream ends in several places
    with pytest.raises(RuntimeError), pressure.waiting("b") as failed:
        raise RuntimeError("refused before it started")
    with pressure.waiting("b") as again:
        assert again.alone and failed is not again  # the failed one left the count by itself
