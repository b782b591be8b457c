"""The per-model Serve deployment: hosts one engine and streams its chunks to the ingress.

Each streamed item costs Serve a few milliseconds, so engines hand over chunks made within
`stream_interval_ms` as one (the first at once): the llama.cpp engine on its decode thread,
Ray Serve LLM for vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve
from ray.serve import metrics

from deployments.api import Engine, GenerationChunk, GenerationRequest, Started
from deployments.embedding import EmbeddingRequest, EmbeddingResult
from deployments.engine_metrics import EngineMetrics
from deployments.generation_trace import GenerationTrace
from deployments.prefix_metrics import PrefixMetrics
from deployments.spec import ModelSpec
from deployments.startup_notes import StartupNote
from deployments.tracing import Tracing, remote_parent
from deployments.weights.cache import FetchStats, WeightCache
from deployments.weights.patience import PatientWeightCache

logger = logging.getLogger(__name__)


def make_engine(spec: ModelSpec, cache: WeightCache) -> Engine:
    """The engine for a model's backend; heavy imports happen only for the backend in use."""
    if spec.backend == "llama_cpp" and spec.engine.embedding:
        from deployments.llama_cpp.embed import LlamaEmbeddingEngine

        return LlamaEmbeddingEngine(spec, cache)
    if spec.backend == "llama_cpp":
        from deployments.llama_cpp.engine import BatchedLlamaEngine

        return BatchedLlamaEngine(spec, cache)
    raise ValueError(f"model {spec.name!r}: backend {spec.backend!r} is not available in this build")


class ModelMetrics:
    """Replica-side metrics (Ray's Prometheus endpoint): queue wait and weight fetches."""

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self.queue_wait = metrics.Histogram(
            "modelserve_queue_wait_seconds", description="From the ingress sending a request to a slot taking it.",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0], tag_keys=("model",),
        )
        self.fetches = metrics.Counter(
            "modelserve_weight_fetches", description="Weight fetches at replica start, by result (hit or download).",
            tag_keys=("model", "result"),
        )
        self.download_bytes = metrics.Counter(
            "modelserve_weight_download_bytes", description="Bytes downloaded into the weight cache.",
            tag_keys=("model",),
        )
        self.download_seconds = metrics.Counter(
            "modelserve_weight_download_seconds", description="Seconds spent filling the weight cache.",
            tag_keys=("model",),
        )

    def record_fetch(self, stats: FetchStats) -> None:
        self.fetches.inc(tags={**self._tags, "result": "hit" if stats.cache_hit else "download"})
        if stats.bytes_downloaded:
            self.download_bytes.inc(stats.bytes_downloaded, tags=self._tags)
        if stats.seconds:
            self.download_seconds.inc(stats.seconds, tags=self._tags)

    def record_queue_wait(self, request: GenerationRequest) -> None:
        if request.submitted_at:
            self.queue_wait.observe(max(0.0, time.time() - request.submitted_at), tags=self._tags)


def _tell(note: StartupNote, text: str | None) -> None:
    """Post (or, with None, clear) the replica's startup note; a note lost to a GCS hiccup must not stop the start."""
    try:
        if text:
            note.post(text)
        else:
            note.clear()
    except Exception as exc:  # noqa: BLE001 - the note is a courtesy to the operator
        logger.warning("could not record the startup note %r: %s", text, exc)


@serve.deployment(name="model")
class ModelServer:
    """One replica of one model. Serve options (replicas, autoscaling, queue bounds) come from the app builder."""

    async def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = ModelSpec.model_validate(spec)
        self._metrics = ModelMetrics(self._spec.name)
        self._prefix_metrics = PrefixMetrics(self._spec.name)
        self._tracing = Tracing(self._spec.tracing, "model", {"modelserve.model": self._spec.name})
        note = StartupNote(self._spec.name)
        cache = PatientWeightCache(lambda text: _tell(note, text))
        cache.stats_listeners.append(self._metrics.record_fetch)
        self._engine = make_engine(self._spec, cache)
        await self._engine.start()
        self._engine_metrics = asyncio.create_task(EngineMetrics(self._spec.name).run(self._engine))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Started | GenerationChunk]:
        """The engine's STARTED once the request has a slot (the replica holds up to `max_waiting` more requests than
        slots, admitted by fair share), then its chunks; traced as the request's `trace_context` says."""
        with GenerationTrace(self._tracing.tracer, request, self._spec.name) as spans:
            async with contextlib.aclosing(self._engine.generate(request)) as chunks:  # closing it cancels the request
                first = True
                async for chunk in chunks:
                    spans.observe(chunk)
                    if isinstance(chunk, Started):
                        self._metrics.record_queue_wait(request)
                    elif first:
                        self._prefix_metrics.record(chunk)
                        first = False
                    yield chunk

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        parent = remote_parent({"traceparent": request.trace_context} if request.trace_context else {})
        with self._tracing.tracer.start_as_current_span("embed", context=parent, kind=SpanKind.SERVER, attributes={
            "modelserve.model": self._spec.name, "modelserve.request_id": request.request_id,
            "modelserve.inputs": len(request.inputs),
        }, record_exception=False, set_status_on_exception=False):
            return await self._engine.embed(request)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def placement(self) -> dict[str, Any]:
        """Slots, threads, Ray CPUs and buffer choices of this replica (the admin status shows them)."""
        return self._engine.placement()

    async def __del__(self) -> None:
        self._engine_metrics.cancel()
        await self._engine.stop()
        self._tracing.shutdown()
