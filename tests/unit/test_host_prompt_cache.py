"""The host-RAM prompt cache of the llama.cpp engine (`deployments.llama_cpp.host_cache`) on a tiny random Gemma 3.

Gemma 3 has sliding-window layers, whose saved state holds only the window: a restored prompt must still decode
its next turn as a full prefill does (greedy), and a prompt needing cells before the window is not restored. The
random-weight tiny Gemma 3 (tests/support/tiny_gguf.py) has the demo Gemma's layer pattern, with a window of
WINDOW tokens: it runs the module in half a second, where the demo model took ~10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.llama_cpp.context import SavedState
from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.llama_cpp.host_cache import MAX_SAVED_PROMPTS, PromptStore, SavedPrompt
from deployments.strict import ConfigError
from serve_app.config import parse_model_args
from tests.support.engine_streams import Completion, drain, make_request, running
from tests.support.tiny_gguf import write_tiny_gemma3_gguf

Messages = list[dict[str, str]]
WINDOW = 64  # the sliding window of the tiny Gemma 3, in tokens


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("tiny-gemma3") / "tiny-gemma3.gguf", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def two_slots(gemma3_path: Path) -> Iterator[BatchedLlamaEngine]:
    """Two slots, tenant-scoped reuse and the default host cache: a third conversation pushes one out to host RAM."""
    with running(gemma3_path, n_ctx=1024, parallel=2, n_threads=1, chat_format="gemma") as engine:
        yield engine


@pytest.fixture(scope="module")
def one_slot_shared(gemma3_path: Path) -> Iterator[BatchedLlamaEngine]:
    """One slot, a shared prefix cache and 1 MiB of host cache: one of its conversations (~0.9 MB) fits, not two."""
    with running(gemma3_path, n_ctx=1024, parallel=1, n_threads=1, chat_format="gemma", prefix_cache="shared",
                 prompt_cache_ram_mib=1) as engine:
        yield engine


def ask(engine: BatchedLlamaEngine, messages: Messages, tenant: str, max_tokens: int = 1, **sampling: Any) -> Completion:
    """A greedy completion of one token unless asked: the slot then caches the prompt alone. (The tiny model answers
    in byte tokens that the next turn's prompt spells differently, and a saved prompt past the window is restored only
    for a prompt continuing all of it.)"""
    request = make_request(messages=tuple(messages), tenant=tenant, max_tokens=max_tokens, temperature=0, **sampling)
    return asyncio.run(drain(engine.generate(request), Completion()))


def first_turn(engine: BatchedLlamaEngine, topic: str, tenant: str = "a", system: str = "") -> tuple[Messages, int]:
    """A conversation's first turn; returns the messages of its second turn and the first turn's prompt tokens."""
    system = system or "You are a patient teacher. Answer in one short sentence and cite your source. " * 3
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {topic}."}]
    done = ask(engine, messages, tenant)
    return [*messages, {"role": "assistant", "content": done.text}, {"role": "user", "content": "Why?"}], \
        done.final.prompt_tokens


def test_more_conversations_than_slots_stay_warm(two_slots: BatchedLlamaEngine) -> None:
    before = two_slots.stats()
    assert before is not None
    turns = [first_turn(two_slots, topic) for topic in ("tides", "glaciers", "volcanoes")]
    for messages, first_prompt in turns:  # each one's slot was taken by the two conversations after it
        second = ask(two_slots, messages, "a").final
        assert second.cached_tokens >= first_prompt  # its whole first turn, not just the shared system prompt
        assert second.cached_tokens < second.prompt_tokens
    after = two_slots.stats()
    assert after is not None
    assert after.prompt_cache_hits - before.prompt_cache_hits == 3
    assert after.prompt_cache_entries >= 1 and after.prompt_cache_bytes > 0  # three conversations, two slots


def test_a_prompt_saved_past_the_sliding_window_is_restored_for_its_next_turn_only(
    two_slots: BatchedLlamaEngine,
) -> None:
    long_system = "You are a patient teacher. Answer in one short sentence and cite your source. " * 6
    messages, first_prompt = first_turn(two_slots, "lighthouses", system=long_system)
    for topic in ("chess", "bridges"):  # other system prompts: the second one takes the long conversation's slot
        first_turn(two_slots, topic)
    stats = two_slots.stats()
    assert stats is not None and stats.prompt_cache_entries >= 1
    assert first_prompt > 2 * WINDOW  # its saved state holds the sliding-window layers' last WINDOW cells only
    # The same system prompt with another question needs the window's cells before the question: not restored.
    first_turn(two_slots, "harbours", system=long_system)
    after = two_slots.stats()
    assert after is not None and after.prompt_cache_hits == stats.prompt_cache_hits
    restored = ask(two_slots, messages, "a", max_tokens=24)
    full = ask(two_slots, messages, "a", max_tokens=24, seed=0)  # prefilled in full (seeded); greedy ignores the seed
    assert restored.final.cached_tokens >= first_prompt
    assert full.final.cached_tokens == 0
    assert restored.text and restored.text == full.text


def test_a_tenants_saved_prompt_is_never_restored_for_another(two_slots: BatchedLlamaEngine) -> None:
    messages, first_prompt = first_turn(two_slots, "printing presses", tenant="x")
    for topic in ("tea", "rivers"):
        first_turn(two_slots, topic, tenant="x")
    stats = two_slots.stats()
    assert stats is not None
    other = ask(two_slots, messages, "y").final
    after = two_slots.stats()
    assert after is not None
    assert other.cached_tokens == 0
    assert after.prompt_cache_hits == stats.prompt_cache_hits
    assert ask(two_slots, messages, "x").final.cached_tokens >= first_prompt  # still there for its own tenant


def test_a_shared_cache_restores_for_every_tenant_and_evicts_the_least_recent_by_bytes(
    one_slot_shared: BatchedLlamaEngine,
) -> None:
    conversations = [first_turn(one_slot_shared, topic, tenant=topic, system=f"{topic.title()} are all you talk about. " * 5)
                     for topic in ("owls", "comets", "maps")]
    stats = one_slot_shared.stats()
    assert stats is not None
    assert stats.prompt_cache_entries == 1 and 0 < stats.prompt_cache_bytes <= 1 << 20
    (owls, _), (comets, comets_prompt), _ = conversations
    assert ask(one_slot_shared, comets, "someone else").final.cached_tokens >= comets_prompt  # the most recent one
    assert ask(one_slot_shared, owls, "owls").final.cached_tokens < 8  # saved first, evicted: only the template's start


def saved(owner: str, tokens: list[int], size: int) -> SavedPrompt:
    return SavedPrompt(owner, tokens, SavedState((ctypes.c_uint8 * size)(), 0))


def test_the_prompt_store_keeps_the_most_recent_within_its_bytes() -> None:
    store = PromptStore(limit=100)
    first, second = saved("a", [1, 2, 3], 40), saved("a", [4, 5], 40)
    store.put(first)
    store.put(second)
    store.put(saved("a", [6], 101))  # alone over the limit: not kept, nothing evicted
    assert (len(store), store.bytes) == (2, 80)
    store.put(saved("b", [7, 8], 30))
    assert (len(store), store.bytes) == (2, 70) and store.of("a") == [second]
    store.put(saved("a", [4, 5, 9], 20))  # holds all of `second`, which goes
    assert [entry.tokens for entry in store.of("a")] == [[4, 5, 9]] and store.bytes == 50
    assert store.holds("a", [4, 5]) and not store.holds("b", [4, 5])


def test_the_prompt_store_keeps_a_bounded_count_however_small_the_prompts() -> None:
    store = PromptStore(limit=1 << 20, count=3)  # bytes for thousands: every admission scans them all
    for token in range(5):
        store.put(saved("a", [token], 1))
    assert len(store) == 3 and [entry.tokens for entry in store.of("a")] == [[2], [3], [4]]  # the least recent went
    assert PromptStore(limit=1).count == MAX_SAVED_PROMPTS


def test_the_host_cache_size_is_checked() -> None:
    model = {"name": "m", "source": "/models/m.gguf"}
    assert parse_model_args({"model": model}).engine.prompt_cache_ram_mib == 512
    assert parse_model_args({"model": {**model, "engine": {"prompt_cache_ram_mib": 0}}}).engine.prompt_cache_ram_mib == 0
    with pytest.raises(ConfigError, match="prompt_cache_ram_mib"):
        parse_model_args({"model": {**model, "engine": {"prompt_cache_ram_mib": -1}}})


def test_a_cached_prefix_moves_beside_the_busy_slots_and_decodes_as_a_full_prefill(gemma3_path: Path) -> None:
    """Three slots: conversations X and Y cache their first turns in slots 0 and 1, then a long answer takes slot 2.
    X's next turn would add a micro-batch in slot 0 (not beside slot 2): its prefix is copied into slot 1, and Y's
    turn there goes to host RAM, to be restored at Y's next turn."""
    with running(gemma3_path, n_ctx=1024, parallel=3, n_threads=1, chat_format="gemma") as engine:
        x_next, x_prompt = first_turn(engine, "tides")
        y_next, _ = first_turn(engine, "glaciers", system="You answer in the style of a sea shanty. " * 4)
        before = engine.stats()

        async def next_turn_beside_a_long_answer() -> tuple[Completion, bool]:
            long = engine.generate(make_request(prompt="Count slowly:", tenant="b", max_tokens=900, temperature=0))
            async with contextlib.aclosing(long):
                await anext(long)  # admitted: it holds a slot
                request = make_request(messages=tuple(x_next), tenant="a", max_tokens=24, temperature=0)
                turn = await drain(engine.generate(request), Completion())
                still_running = await anext(long, None) is not None
            return turn, still_running

        moved, still_running = asyncio.run(next_turn_beside_a_long_answer())
        assert still_running
        assert before is not None and (after := engine.stats()) is not None
        assert after.prompt_cache_hits == before.prompt_cache_hits  # X's prefix was copied, not restored
        assert ask(engine, y_next, "a").final.cached_tokens > 0
        assert (last := engine.stats()) is not None and last.prompt_cache_hits == before.prompt_cache_hits + 1
        full = ask(engine, x_next, "a", max_tokens=24, seed=0)  # prefilled in full (seeded); greedy ignores the seed
        assert moved.final.cached_tokens >= x_prompt
        assert moved.text and moved.text == full.text
