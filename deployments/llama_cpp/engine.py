"""Continuous-batching llama.cpp engine: many concurrent streams per GGUF replica.

The Engine facade: it leases the GGUF from the weight cache, loads it, and bridges the replica's
event loop to the one decode thread (`deployments.llama_cpp.scheduler`) that admits, batches and
samples every request's sequence. The event loop only moves chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any

from deployments.api import Engine, EngineStats, EngineUnavailable, GenerationChunk, GenerationRequest, Started
from deployments.llama_cpp.chat_prompt import ChatTemplate
from deployments.llama_cpp.model import RepackChoice, choose_repack, open_model
from deployments.llama_cpp.prompt import Prompt, prepare_prompt
from deployments.llama_cpp.scheduler import DONE, DecodeLoop
from deployments.llama_cpp.sequence import Submission
from deployments.llama_cpp.tools import streams_arguments
from deployments.spec import ModelSpec
from deployments.tool_stream import read_tool_calls
from deployments.weights.cache import WeightCache

logger = logging.getLogger(__name__)


class BatchedLlamaEngine(Engine):
    """A GGUF model serving up to `parallel` requests at once through one continuously batched context."""

    def __init__(self, spec: ModelSpec, cache: WeightCache | None = None) -> None:
        self._spec = spec
        self._cache = cache or WeightCache()
        self._resources = ExitStack()
        self._decode_loop: DecodeLoop | None = None
        self._repack: RepackChoice | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        settings = self._spec.engine
        try:
            self._repack = choose_repack(settings.repack)
            model = open_model(self._spec, self._cache, self._resources, self._repack)
            template = ChatTemplate(model, settings.chat_format, settings.chat_template)

            def prepare(request: GenerationRequest) -> Prompt:
                return prepare_prompt(request, model, template, settings.n_ctx, settings.default_max_tokens)

            decode_loop = DecodeLoop(model, settings, prepare, self._spec.name)
            self._resources.callback(decode_loop.close)
        except BaseException:
            self._resources.close()
            raise
        self._decode_loop = decode_loop
        logger.info(
            "model %s loaded from %s (%d slots x %d tokens, %d threads, weight repacking %s)",
            self._spec.name, self._spec.source, settings.parallel, settings.n_ctx, settings.n_threads, self._repack.describe(),
        )

    def placement(self) -> dict[str, Any]:
        settings = self._spec.engine
        return {
            "backend": "llama_cpp",
            "slots": settings.parallel,
            "busy_slots": self._decode_loop.busy_slots if self._decode_loop else 0,  # leaks show as a count stuck > 0
            "threads": settings.n_threads,
            "ray_cpus_per_replica": self._spec.deployment.ray_actor_options.get("num_cpus"),
            "weight_repack": self._repack.describe() if self._repack else None,
        }

    async def check_health(self) -> None:
        if self._decode_loop is None:
            raise EngineUnavailable(f"model {self._spec.name!r} is not loaded")
        if not self._decode_loop.thread.is_alive():
            raise EngineUnavailable(f"model {self._spec.name!r}: decode thread has stopped")

    async def stop(self) -> None:
        await asyncio.to_thread(self._resources.close)

    def stats(self) -> EngineStats | None:
        return self._decode_loop.stats() if self._decode_loop is not None else None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Started | GenerationChunk]:
        """STARTED once a slot takes the request, then its chunks; with tools, each choice's calls read out of its
        text (deployments.tool_stream)."""
        generated = self._generate(request)
        async with contextlib.aclosing(generated):  # closing it cancels the request
            chunks = generated
            if request.tools is not None:
                chunks = read_tool_calls(generated, request.tools, streams_arguments(request.tools))
            async for chunk in chunks:
                yield chunk

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Started | GenerationChunk]:
        if self._decode_loop is None:
            raise EngineUnavailable(f"model {self._spec.name!r} is not loaded")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        settings, decode_loop = self._spec.engine, self._decode_loop
        outbox = Outbox(
            asyncio.get_running_loop(), queue.put_nowait, settings.stream_interval_ms / 1000,
            settings.stream_items_per_s, lambda: decode_loop.active_count,
        )
        submission = Submission(request, outbox.put)
        decode_loop.submit(submission)
        try:
            while (item := await queue.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            decode_loop.cancel(submission)


class Outbox:
    """One request's chunks on their way from the decode thread to the replica's event loop.

    Every hand-over wakes the event loop and becomes a Serve stream item that costs a few ms of
    CPU on its way to the client (taken from the decode threads on a small node). So after the
    first chunk, which goes at once, chunks made within the interval since the last hand-over
    travel merged: the next chunk after the interval, the finishing chunk or an error sends them.
    The interval is `interval_s`, grown when several streams share the replica to (active streams /
    `items_per_s`), so the replica's items per second stay bounded however many streams it decodes.
    Chunks of a request's different choices (`n`) are merged only with their own choice's.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Any], None],
        interval_s: float,
        items_per_s: float,
        active_streams: Callable[[], int],
    ) -> None:
        self._loop, self._deliver = loop, deliver
        self._interval_s, self._items_per_s, self._active_streams = interval_s, items_per_s, active_streams
        self._pending: dict[int, GenerationChunk] = {}  # by choice index
        self._sent_at: float | None = None  # None until the first chunk went out

    def put(self, item: Any) -> None:
        """Called on the decode thread with STARTED, a GenerationChunk, an exception or DONE."""
        if isinstance(item, GenerationChunk):
            pending = self._pending.pop(item.index, None)
            item = pending.merge(item) if pending is not None else item
            now = time.monotonic()
            if item.finish_reason is None and self._sent_at is not None and now - self._sent_at < self._interval():
                self._pending[item.index] = item
                return
            self._sent_at = now
        else:  # an error or the end: what is pending goes first
            for pending in self._pending.values():
                self._send(pending)
            self._pending.clear()
        self._send(item)

    def _interval(self) -> float:
        streams = self._active_streams()
        if self._items_per_s <= 0 or streams <= 1:  # one stream alone keeps the configured interval
            return self._interval_s
        return max(self._interval_s, streams / self._items_per_s)

    def _send(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the replica's event loop has closed: nobody is listening any more
            pass
