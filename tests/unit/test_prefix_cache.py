"""Prefix KV reuse in the llama.cpp engine: what a prompt may reuse, and the cached tokens it reports; and
which slot a new sequence takes when it reuses nothing.

Driven through the Engine interface on the tiny random-weight GGUF (reuse is about which cells are
kept, not about the model); the time it saves is measured on Gemma in test_batched_engine.py. The slot
choice is checked on `PrefixPolicy` itself: which sequence id a sequence gets shows nowhere else, only in
decode speed (llama.cpp decodes each run of consecutive busy ids as a micro-batch of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.llama_cpp.prefix_cache import PrefixPolicy
from deployments.llama_cpp.sequence import Slot
from deployments.settings import EngineSettings
from deployments.spec import ModelSpec
from tests.support.engine_streams import Completion, drain, make_request
from tests.support.tiny_gguf import write_tiny_llama_gguf

PROMPT = ("Once upon a time there was a dog who lived near the big port and " * 3).strip()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@contextmanager
def engine(path: Path, **settings: Any) -> Iterator[BatchedLlamaEngine]:
    running = BatchedLlamaEngine(ModelSpec(name="prefix", source=str(path), engine={
        "n_ctx": 256, "parallel": 2, "n_threads": 1, **settings,
    }))
    asyncio.run(running.start())
    try:
        yield running
    finally:
        asyncio.run(running.stop())


@pytest.fixture
def per_tenant(tiny_path: Path) -> Iterator[BatchedLlamaEngine]:
    with engine(tiny_path) as running:
        yield running


def complete(engine: BatchedLlamaEngine, prompt: str, tenant: str = "a", max_tokens: int = 8) -> Completion:
    request = make_request(prompt, tenant=tenant, max_tokens=max_tokens, temperature=0)
    return asyncio.run(drain(engine.generate(request), Completion()))


def test_a_repeated_prompt_reuses_all_but_its_last_token(per_tenant: BatchedLlamaEngine) -> None:
    first = complete(per_tenant, PROMPT).final
    again = complete(per_tenant, PROMPT).final
    assert first.cached_tokens == 0
    assert again.prompt_tokens == first.prompt_tokens
    assert again.cached_tokens == again.prompt_tokens - 1  # the last one is decoded again for its logits


def test_a_next_turn_reuses_the_previous_turn_and_its_answer(per_tenant: BatchedLlamaEngine) -> None:
    turn = complete(per_tenant, PROMPT, max_tokens=12)
    follow_up = complete(per_tenant, PROMPT + turn.text + " And then what happened?").final
    # The answer's tokens were cached as generated; re-tokenized text may differ only where the two meet.
    assert follow_up.cached_tokens >= turn.final.prompt_tokens
    assert follow_up.cached_tokens < follow_up.prompt_tokens


def test_another_tenant_reuses_nothing_and_evicts_nothing(per_tenant: BatchedLlamaEngine) -> None:
    complete(per_tenant, PROMPT, tenant="a")
    other = complete(per_tenant, PROMPT, tenant="b").final
    again = complete(per_tenant, PROMPT, tenant="a").final
    assert other.cached_tokens == 0
    assert again.cached_tokens == again.prompt_tokens - 1  # b took the other slot: a's prefix is still there


def test_a_shared_prefix_cache_serves_every_tenant(tiny_path: Path) -> None:
    with engine(tiny_path, prefix_cache="shared") as shared:
        complete(shared, PROMPT, tenant="a")
        other = complete(shared, PROMPT, tenant="b").final
        assert other.cached_tokens == other.prompt_tokens - 1


def test_a_seeded_request_is_prefilled_in_full_so_it_reproduces(per_tenant: BatchedLlamaEngine) -> None:
    complete(per_tenant, PROMPT)
    seeded = asyncio.run(drain(per_tenant.generate(make_request(PROMPT, tenant="a", max_tokens=4, seed=5)), Completion()))
    assert seeded.final.cached_tokens == 0


def test_without_prefix_reuse_every_prompt_is_prefilled(tiny_path: Path) -> None:
    with engine(tiny_path, prefix_reuse=False) as cold:
        complete(cold, PROMPT)
        assert complete(cold, PROMPT).final.cached_tokens == 0


def free_slots(busy: set[int], coldest: int) -> list[Slot]:
    """16 slots minus `busy`, each last used in id order except `coldest`, the least recently used."""
    return [Slot(seq_id, used=0 if seq_id == coldest else 10 + seq_id) for seq_id in range(16) if seq_id not in busy]


@pytest.mark.parametrize("reuse", [True, False])
def test_a_new_sequence_goes_beside_the_busy_slots_not_to_the_coldest(reuse: bool) -> None:
    policy = PrefixPolicy(EngineSettings(parallel=16, prefix_reuse=reuse))
    request = make_request(PROMPT, tenant="a")
    assert policy.choose(free_slots({4, 5, 6}, coldest=12), [1, 2, 3], request).seq_id in {3, 7}
    assert policy.choose(free_slots({0, 1, 3, 4}, coldest=12), [1, 2, 3], request).seq_id == 2  # joins two runs
    assert policy.coldest(free_slots({4, 5, 6}, coldest=12)).seq_id in {3, 7}


def test_a_slot_holding_the_prompt_wins_wherever_it_is() -> None:
    policy = PrefixPolicy(EngineSettings(parallel=16))
    request = make_request(PROMPT, tenant="a")
    free = free_slots({4, 5, 6}, coldest=0)
    cached = next(slot for slot in free if slot.seq_id == 12)
    cached.cached, cached.owner = [1, 2, 3, 4], "a"
    assert policy.choose(free, [1, 2, 3, 4, 5], request) is cached
