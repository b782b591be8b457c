"""Building engine requests and reading their chunk streams, shared by the engine tests."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.api import GenerationChunk, GenerationRequest, SamplingParams

_ids = itertools.count()


@dataclass
class Completion:
    """Every chunk of one stream, with the time each arrived."""

    chunks: list[GenerationChunk] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

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


async def drain(stream: AsyncIterator[GenerationChunk], into: Completion) -> Completion:
    async for chunk in stream:
        into.chunks.append(chunk)
        into.arrivals.append(time.perf_counter())
    return into
