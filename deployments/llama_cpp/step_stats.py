"""What the decode thread counts for the engine's metrics (`deployments.engine_metrics` exports them).

Plain counters the decode thread bumps and the replica's event loop reads: ints are read whole under
the GIL, and step timings pass through a deque, which both threads may use without a lock.
"""

from __future__ import annotations

from collections import deque

from deployments.api import EngineStats
from deployments.llama_cpp.host_cache import HostCache
from deployments.llama_cpp.sequence import Feed, Slot

MAX_PENDING_STEPS = 10_000  # timings nobody collected are dropped beyond this (oldest first)


class StepStats:
    """Running token totals and the timing of each decode step since the event loop last took them."""

    def __init__(self) -> None:
        self.prompt_tokens_reused = 0
        self.prompt_tokens_computed = 0
        self.generated_tokens = 0
        self._steps: deque[tuple[str, float]] = deque(maxlen=MAX_PENDING_STEPS)

    def record(self, feeds: list[Feed], seconds: float) -> None:
        """One successful decode (called before the feeds are absorbed, so `streaming` is as they were fed)."""
        prompt = sum(len(feed.tokens) for feed in feeds if not feed.sequence.streaming)
        streams = sum(1 for feed in feeds if feed.sequence.streaming)
        self.prompt_tokens_computed += prompt
        self.generated_tokens += sum(1 for feed in feeds if feed.sample)
        self._steps.append(("mixed" if prompt and streams else "prefill" if prompt else "decode", seconds))

    def snapshot(self, slots: list[Slot], waiting: int, kv_cells: int, host: HostCache) -> EngineStats:
        """The engine's stats now; the steps recorded since the last snapshot go with it (once)."""
        steps = []
        while self._steps:
            steps.append(self._steps.popleft())
        return EngineStats(
            sum(slot.sequence is not None for slot in slots), len(slots), waiting, sum(len(slot.cached) for slot in slots),
            kv_cells, self.prompt_tokens_reused, self.prompt_tokens_computed, self.generated_tokens, tuple(steps),
            host.store.bytes, len(host.store), host.hits, host.misses,
        )
