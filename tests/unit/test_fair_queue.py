"""Fair admission in the llama.cpp engine, driven directly on the tiny GGUF with one slot.

Each request's STARTED marks its admission; the order of admissions shows who the engine lets in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine_streams import Completion, drain, make_request, running
from tests.support.tiny_gguf import EOS_TOKEN_ID

NO_EOS = ((EOS_TOKEN_ID, -100.0),)  # every request runs its full budget: equal requests cost equal tokens


@pytest.fixture(scope="module")
def one_slot(tiny_path: Path) -> Iterator[Any]:
    # no prefix reuse: each request is prefilled afresh and frees its cells, so the counts below are exact
    with running(tiny_path, n_ctx=256, parallel=1, n_threads=1, stream_interval_ms=0, prefix_reuse=False) as engine:
        yield engine


def request(tenant: str, max_tokens: int = 16, **fields: Any) -> Any:
    plain = make_request("Hello the quick brown fox", max_tokens=max_tokens, logit_bias=NO_EOS, temperature=0)
    return dataclasses.replace(plain, tenant=tenant, **fields)


def settled(engine: Any) -> Any:
    """The engine's stats once every slot is free (a finished request's slot frees just after its last chunk),
    with the steps of every look taken meanwhile (each look takes them)."""
    deadline, steps = time.monotonic() + 5, []
    while True:
        stats = engine.stats()
        steps.extend(stats.steps)
        if not stats.slots_busy or time.monotonic() > deadline:
            return dataclasses.replace(stats, steps=tuple(steps))
        time.sleep(0.01)


async def admission_order(engine: Any, blocker: Any, queued: list[tuple[str, Any]]) -> list[str]:
    """Names of `queued` requests in the order the engine admits them, sent while `blocker` holds the slot."""
    first = Completion()
    hold = asyncio.create_task(drain(engine.generate(blocker), first))
    while first.started_at is None:
        await asyncio.sleep(0.001)
    runs = {name: Completion() for name, _ in queued}
    tasks = [asyncio.create_task(drain(engine.generate(r), runs[name])) for name, r in queued]
    await asyncio.gather(hold, *tasks)
    assert all(run.chunks[-1].finish_reason == "length" for run in runs.values())
    return sorted(runs, key=lambda name: runs[name].started_at)


def test_a_tenant_arriving_behind_a_flood_gets_the_next_slot(one_slot: Any) -> None:
    flood = [(f"a{i}", request("a")) for i in range(6)]
    order = asyncio.run(admission_order(one_slot, request("a", max_tokens=48), [*flood, ("b", request("b"))]))
    assert order.index("b") == 0, order  # first come, first served would put it last


def test_weights_share_the_slot_in_proportion(one_slot: Any) -> None:
    queued = [(f"{tenant}{i}", request(tenant, weight=weight)) for i in range(6) for tenant, weight in (("h", 3.0), ("l", 1.0))]
    order = asyncio.run(admission_order(one_slot, request("x", max_tokens=48), queued))
    assert sum(name.startswith("h") for name in order[:8]) == 6, order  # 3:1 while both wait


def test_priority_orders_a_tenants_own_requests(one_slot: Any) -> None:
    queued = [("late", request("a", priority=5)), ("normal", request("a")), ("urgent", request("a", priority=-1))]
    order = asyncio.run(admission_order(one_slot, request("a", max_tokens=48), queued))
    assert order == ["urgent", "normal", "late"]


def test_a_request_cancelled_while_waiting_leaves_the_queue_at_once(one_slot: Any) -> None:
    async def scenario() -> tuple[Any, int, Completion]:
        first, waiter, after = Completion(), Completion(), Completion()
        hold = asyncio.create_task(drain(one_slot.generate(request("a", max_tokens=64)), first))
        while first.started_at is None:
            await asyncio.sleep(0.001)
        waiting = asyncio.create_task(drain(one_slot.generate(request("b")), waiter))
        while one_slot.stats().waiting == 0:
            await asyncio.sleep(0.001)
        queued = one_slot.stats()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        left = one_slot.stats().waiting
        await asyncio.gather(hold, drain(one_slot.generate(request("c", max_tokens=4)), after))
        return queued, left, waiter

    queued, left, waiter = asyncio.run(scenario())
    assert (queued.waiting, queued.slots_busy, left) == (1, 1, 0)
    assert 0 < queued.kv_cells_used <= 256  # the running request's prompt and tokens so far
    assert waiter.started_at is None and not waiter.chunks  # never admitted
    assert settled(one_slot).slots_busy == 0  # no slot leaked


def test_stats_count_what_the_engine_did(one_slot: Any) -> None:
    before = settled(one_slot)
    done = asyncio.run(drain(one_slot.generate(request("a", max_tokens=10)), Completion()))
    after = settled(one_slot)
    assert (after.slots_total, after.kv_cells_total) == (1, 256)
    assert after.generated_tokens - before.generated_tokens == done.final.completion_tokens == 10
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == done.final.prompt_tokens
    assert after.kv_cells_used == 0  # without prefix reuse a finished request's cells are freed
    assert {kind for kind, _ in after.steps} == {"prefill", "decode"} and all(s > 0 for _, s in after.steps)
    assert one_slot.stats().steps == ()  # steps are handed over once
