"""Engine metrics on Ray's Prometheus endpoint, per model (Serve adds the replica, deployment and app tags).

What llama-server (`llamacpp:*`) and vLLM (`vllm:*`) export, for the llama.cpp engine: slots busy, requests
waiting in the replica, KV cells used, prompt tokens reused or computed, generated tokens, each decode
step's time by kind and the host-RAM prompt cache's use, hits and misses. The decode thread only counts (`Engine.stats`); a task on the replica's event loop
publishes every `PUBLISH_INTERVAL_S`, so no metric call ever runs on the decode thread.
"""

from __future__ import annotations

import asyncio
import logging

from ray.serve import metrics

from deployments.api import Engine, EngineStats

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 1.0
STEP_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class EngineMetrics:
    """The engine's gauges, counters and step histogram, fed from successive `EngineStats`."""

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self._last: EngineStats | None = None
        keys = ("model",)
        self._gauges = {
            name: metrics.Gauge(f"modelserve_engine_{name}", description=text, tag_keys=keys)
            for name, text in (
                ("slots_busy", "Sequence slots decoding a request."),
                ("slots_total", "Sequence slots of the replica (engine.parallel)."),
                ("waiting_requests", "Requests held by the replica waiting for a free slot."),
                ("kv_cells_used", "KV cache cells holding tokens (cached prefixes of free slots included)."),
                ("kv_cells_total", "KV cache cells of the replica (parallel x n_ctx)."),
                ("tokens_per_second", "Generated tokens per second over the last publish interval."),
                ("prompt_cache_bytes", "Bytes of KV state held by the host-RAM prompt cache."),
                ("prompt_cache_entries", "Prompts held by the host-RAM prompt cache."),
            )
        }
        self._counters = {
            name: metrics.Counter(f"modelserve_engine_{name}", description=text, tag_keys=keys)
            for name, text in (
                ("prompt_tokens_reused", "Prompt tokens whose KV cells were kept from earlier requests."),
                ("prompt_tokens_computed", "Prompt tokens decoded (prefill)."),
                ("generated_tokens", "Tokens sampled."),
                ("prompt_cache_hits", "Admissions that got a saved prompt back from the host-RAM prompt cache."),
                ("prompt_cache_misses", "Admissions whose prompt no free slot or saved prompt held half of."),
            )
        }
        self._steps = metrics.Histogram(
            "modelserve_engine_step_seconds", description="Time of one decode step, by kind: prefill (prompt "
            "tokens only), decode (generated tokens only) or mixed (chunked prefill beside streams).",
            boundaries=STEP_BOUNDARIES, tag_keys=("model", "kind"),
        )

    def publish(self, stats: EngineStats, interval_s: float) -> None:
        last = self._last or EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        generated = stats.generated_tokens - last.generated_tokens
        for name, value in (
            ("slots_busy", stats.slots_busy), ("slots_total", stats.slots_total),
            ("waiting_requests", stats.waiting), ("kv_cells_used", stats.kv_cells_used),
            ("kv_cells_total", stats.kv_cells_total), ("tokens_per_second", generated / interval_s),
            ("prompt_cache_bytes", stats.prompt_cache_bytes), ("prompt_cache_entries", stats.prompt_cache_entries),
        ):
            self._gauges[name].set(value, tags=self._tags)
        for name, delta in (
            ("prompt_tokens_reused", stats.prompt_tokens_reused - last.prompt_tokens_reused),
            ("prompt_tokens_computed", stats.prompt_tokens_computed - last.prompt_tokens_computed),
            ("generated_tokens", generated),
            ("prompt_cache_hits", stats.prompt_cache_hits - last.prompt_cache_hits),
            ("prompt_cache_misses", stats.prompt_cache_misses - last.prompt_cache_misses),
        ):
            if delta > 0:
                self._counters[name].inc(delta, tags=self._tags)
        for kind, seconds in stats.steps:
            self._steps.observe(seconds, tags={**self._tags, "kind": kind})
        self._last = stats

    async def run(self, engine: Engine) -> None:
        """Publish the engine's stats until cancelled (an engine without stats ends it at once)."""
        while (stats := engine.stats()) is not None:
            try:
                self.publish(stats, PUBLISH_INTERVAL_S)
            except Exception:  # a metrics hiccup must not end the publishing
                logger.exception("could not publish engine metrics")
            await asyncio.sleep(PUBLISH_INTERVAL_S)
