"""The per-model Serve deployment: hosts one engine and streams its chunks to the ingress.

Each streamed item costs Serve a few milliseconds, so chunks produced within
`stream_interval_ms` travel as one item; the first chunk always goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.engine import Engine, GenerationChunk, GenerationRequest
from serve_app.config import ModelSpec

logger = logging.getLogger(__name__)


def make_engine(spec: ModelSpec) -> Engine:
    """The engine for a model's backend; heavy imports happen only for the backend in use."""
    if spec.backend == "llama_cpp":
        from deployments.llama_cpp_batched import BatchedLlamaEngine

        return BatchedLlamaEngine(spec)
    raise ValueError(f"model {spec.name!r}: backend {spec.backend!r} is not available in this build")


async def coalesce(chunks: AsyncIterator[GenerationChunk], interval_s: float) -> AsyncIterator[GenerationChunk]:
    """Yield the first chunk at once, then merge the chunks that arrive within each interval."""
    source = chunks.__aiter__()
    pending: asyncio.Future[GenerationChunk] | None = None
    first = True
    try:
        while True:
            try:
                chunk = await (pending or source.__anext__())
            except StopAsyncIteration:
                return
            pending = None
            if not first and interval_s > 0:
                deadline = asyncio.get_running_loop().time() + interval_s
                while chunk.finish_reason is None:
                    pending = asyncio.ensure_future(source.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=deadline - asyncio.get_running_loop().time())
                    if not done:
                        break
                    try:
                        chunk = chunk.merge(pending.result())
                    except StopAsyncIteration:
                        pending = None
                        yield chunk
                        return
                    pending = None
            first = False
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await source.aclose()


@serve.deployment(name="model")
class ModelServer:
    """One replica of one model. Serve options (replicas, autoscaling, queue bounds) come from the app builder."""

    async def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = ModelSpec.model_validate(spec)
        self._engine = make_engine(self._spec)
        await self._engine.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in coalesce(self._engine.generate(request), self._spec.engine.stream_interval_ms / 1000):
            yield chunk

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def __del__(self) -> None:
        await self._engine.stop()
