"""Prefix-cache metrics of a model replica (Ray's Prometheus endpoint, which tags them by replica too).

Hit rate = cached tokens / prompt tokens: rate(ray_modelserve_prefix_cached_tokens) over
rate(ray_modelserve_prefix_prompt_tokens) per model and replica; the gauge is the replica's ratio so far.
"""

from __future__ import annotations

from ray.serve import metrics

from deployments.api import GenerationChunk


class PrefixMetrics:
    """Prompt tokens, those reused from the prefix cache, and their ratio, per model (and replica)."""

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self._prompt = self._cached = 0
        self.prompt_tokens = metrics.Counter(
            "modelserve_prefix_prompt_tokens", description="Prompt tokens of started generations.", tag_keys=("model",)
        )
        self.cached_tokens = metrics.Counter(
            "modelserve_prefix_cached_tokens", description="Prompt tokens whose KV came from the prefix cache.",
            tag_keys=("model",),
        )
        self.hit_rate = metrics.Gauge(
            "modelserve_prefix_hit_rate", description="This replica's cached / prompt tokens since it started.",
            tag_keys=("model",),
        )

    def record(self, first: GenerationChunk) -> None:
        """Count a generation by its first chunk (each chunk carries the request's prompt and cached tokens)."""
        self._prompt += first.prompt_tokens
        self._cached += first.cached_tokens
        self.prompt_tokens.inc(first.prompt_tokens, tags=self._tags)
        if first.cached_tokens:
            self.cached_tokens.inc(first.cached_tokens, tags=self._tags)
        self.hit_rate.set(self._cached / self._prompt if self._prompt else 0.0, tags=self._tags)
