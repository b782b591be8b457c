"""Chunked prefill feeds the shortest rest of a prompt first (deployments/llama_cpp/scheduler.py).

A follow-up turn brings a few new tokens; a new conversation brings hundreds. While other sequences
stream, each decode step has room for only `prefill_chunk` prompt tokens, so feeding prompts in
admission order would hold the short one behind every chunk of the long one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.engine_streams import Completion, drain, make_request, running
from tests.support.tiny_gguf import write_tiny_llama_gguf


def test_a_short_prompt_is_not_held_behind_a_long_one_admitted_before_it(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    settings = {"n_ctx": 256, "parallel": 3, "n_threads": 1, "prefill_chunk": 4, "prefix_reuse": False}

    async def scenario(engine: object) -> tuple[bool, Completion, Completion]:
        hog = Completion()
        streaming = asyncio.create_task(drain(engine.generate(make_request("Hello the quick brown fox", max_tokens=240,
                                                                          temperature=0)), hog))
        while not hog.chunks:  # it streams: from now on a step feeds at most 4 prompt tokens
            await asyncio.sleep(0.005)
        long, short = Completion(), Completion()
        await asyncio.gather(  # submitted in this order: the long prompt is admitted first
            drain(engine.generate(make_request("Once upon a time there was a dog " * 20, max_tokens=2)), long),
            drain(engine.generate(make_request("The house", max_tokens=2)), short),
        )
        hog_streamed_throughout = not streaming.done()
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
        return hog_streamed_throughout, long, short

    with running(path, **settings) as engine:
        hog_streamed_throughout, long, short = asyncio.run(scenario(engine))
    assert long.final.prompt_tokens > 100 and short.final.prompt_tokens < 8
    assert hog_streamed_throughout, "prompts are chunked only while another sequence streams"
    assert short.arrivals[0] < long.arrivals[0]  # in admission order it would come after the long prompt's ~30 chunks
