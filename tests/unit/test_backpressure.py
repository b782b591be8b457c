"""The ingress's early refusal and Retry-After advice (serve_app/ingress/backpressure.py), on a clock the test moves."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from serve_app.ingress import backpressure
from serve_app.ingress.backpressure import MAX_RETRY_AFTER_S, WINDOW_S, Overloaded, SlotPressure

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
    monkeypatch.setattr(backpressure.random, "uniform", lambda low, high: 1.0)  # no jitter: exact advice
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
        pressure.started()
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


def test_retry_after_doubles_while_refusals_outnumber_starts_and_falls_back_when_they_do_not(clock: Clock) -> None:
    pressure = SlotPressure(DEADLINE_S)
    advice = []
    for _ in range(40):  # one start and many refusals each second: the advice climbs to its cap
        pressure.started()
        for _ in range(10):
            last = pressure.refused("a", clock.now)
        advice.append(last)
        clock.now += 1.0
    # it doubles only once the clients it advised had the time to follow it
    assert advice[:8] == [1.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0, 8.0] and advice[-1] == MAX_RETRY_AFTER_S
    assert pressure.refused("b", clock.now) == 1.0  # another tenant refused once is not told the flooder's wait
    for _ in range(4):  # starts now outnumber refusals: the advice halves each second
        for _ in range(40):
            pressure.started()
        clock.now += 1.0
        last = pressure.refused("a", clock.now)
    assert last < MAX_RETRY_AFTER_S / 4
    clock.now += WINDOW_S + 1  # a fresh overload after a quiet spell starts from a short wait again
    assert pressure.refused("a", clock.now) == 1.0


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
