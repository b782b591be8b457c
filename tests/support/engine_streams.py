"""Building engine requests and reading their chunk streams, shared by the engine tests."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.api import GenerationChunk, GenerationRequest, SamplingParams, Started

_ids = itertools.count()


@contextmanager
def running(path: Path, **engine_settings: Any) -> Iterator[Any]:
    """A started llama.cpp engine (deployments.llama_cpp.engine.BatchedLlamaEngine) on the GGUF at `path`."""
    from deployments.llama_cpp.engine import BatchedLlamaEngine  # llama.cpp loads only for the tests using it
    from deployments.spec import ModelSpec

    engine = BatchedLlamaEngine(ModelSpec(name="test-model", source=str(path), engine=engine_settings))
    asyncio.run(engine.start())
    try:
        yield engine
    finally:
        asyncio.run(engine.stop())


@dataclass
class Completion:
    """Every chunk of one stream, with the time each arrived, and when the engine admitted it (its STARTED)."""

    chunks: list[GenerationChunk] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    started_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def final(self) -> GenerationChunk:
        return self.chunks[-1]


def make_request(
    prompt: str | None = None, messages: tuple[dict[str, str], ...] | None = None, tenant: str = "", **sampling: Any
) -> GenerationRequest:
    return GenerationRequest(
        f"req-{next(_ids)}", SamplingParams(**sampling), messages=messages, prompt=prompt, tenant=tenant
    )


async def drain(stream: AsyncIterator[Started | GenerationChunk], into: Completion) -> Completion:
    async for chunk in stream:
        if isinstance(chunk, Started):
            assert into.started_at is None and not into.chunks, "STARTED comes once, first"
            into.started_at = time.perf_counter()
            continue
        into.chunks.append(chunk)
        into.arrivals.append(time.perf_counter())
    return into
