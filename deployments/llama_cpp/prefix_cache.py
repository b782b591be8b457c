"""Which slot a new sequence takes: the one whose cached prompt prefix it reuses (tenant-scoped), else one beside
the busy slots.

A finished sequence leaves its tokens' KV cells in its slot; a later prompt starting with the same
tokens takes that slot and prefills only the rest. Each slot remembers whose tokens it holds, and a
prefix is reused only by the same tenant unless the model shares its cache (`engine.prefix_cache:
shared`): a shared cache tells one tenant through time-to-first-token which prompts others sent
(vLLM's CVE-2025-46570). A request with a `seed` is prefilled in full: reused KV shifts the last bits of
the logits (batch-dependent CPU kernels), and a seed promises the same output for the same request.

Where nothing is reused, the slot matters for speed: with one KV stream per slot, llama.cpp splits a decode
step into one micro-batch per run of consecutive busy sequence ids (`split_equal`, sequential), each a full
pass over the weights. Eight one-token rows took 57.6 ms on ids 0-7 and 205.7 ms on ids 0, 2, ... 14
(`bench/bench_slot_runs.py`). So a sequence goes where it adds no run: into a gap, else beside a busy slot.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence as Tokens

from deployments.api import GenerationRequest
from deployments.llama_cpp.sequence import Slot
from deployments.settings import EngineSettings

SIMILARITY = 0.5  # share of a prompt a slot's cache must hold to be taken for it (llama-server's slot similarity)


def common_prefix(a: Tokens[int], b: Tokens[int]) -> int:
    return len(os.path.commonprefix([list(a), list(b)]))


def added_runs(slot: Slot, busy: set[int]) -> int:
    """How many runs of consecutive busy sequence ids (micro-batches of a decode step) taking `slot` adds:
    1 alone, 0 beside one run, -1 when it joins two."""
    return 1 - (slot.seq_id - 1 in busy) - (slot.seq_id + 1 in busy)


class PrefixPolicy:
    """Prefix reuse as the model's settings allow it: on or off, per tenant or shared."""

    def __init__(self, settings: EngineSettings) -> None:
        self.enabled = settings.prefix_reuse
        self._slot_ids = set(range(settings.parallel))
        self._shared = settings.prefix_cache == "shared"
        self._clock = itertools.count(1)

    def owner(self, tenant: str) -> str:
        """Whose cache a tenant's tokens go into: its own, or everyone's when the model shares it."""
        return "" if self._shared else tenant

    def claim(self, slot: Slot, tenant: str, prompt_tokens: int) -> None:
        """The slot now caches this tenant's prompt of `prompt_tokens` (and its answer), as its most recently used."""
        slot.owner, slot.used, slot.prompt_end = self.owner(tenant), next(self._clock), prompt_tokens

    def reusable(self, slot: Slot, tokens: list[int], request: GenerationRequest) -> int:
        """How many of the slot's cached tokens this request's prompt may keep."""
        if not self.enabled or request.sampling.seed is not None or slot.owner != self.owner(request.tenant):
            return 0
        return common_prefix(slot.cached, tokens)

    def busy(self, free: list[Slot]) -> set[int]:
        """The sequence ids of the slots not in `free`."""
        return self._slot_ids.difference(slot.seq_id for slot in free)

    def choose(self, free: list[Slot], tokens: list[int], request: GenerationRequest) -> Slot:
        """The free slot caching most of the prompt if that is at least SIMILARITY of it; else the one adding the
        fewest micro-batches (`added_runs`) and among those the least recently used, whose cache matters least
        (another conversation sharing only a preamble keeps its slot). Without reuse: the fewest runs, lowest id."""
        busy = self.busy(free)
        if not self.enabled:
            return min(free, key=lambda slot: (added_runs(slot, busy), slot.seq_id))

        def similar(slot: Slot) -> int:
            common = self.reusable(slot, tokens, request)
            return common if common >= SIMILARITY * len(tokens) else 0

        return max(free, key=lambda slot: (similar(slot), -added_runs(slot, busy), -slot.used, -slot.seq_id))

    def coldest(self, free: list[Slot]) -> Slot:
        """The free slot adding the fewest micro-batches, and among those the least recently used (its cache
        matters least)."""
        busy = self.busy(free)
        return min(free, key=lambda slot: (added_runs(slot, busy), slot.used, slot.seq_id))
