"""Which slot's cached prompt prefix a new sequence reuses: the slot choice of prefix KV reuse, tenant-scoped.

A finished sequence leaves its tokens' KV cells in its slot; a later prompt starting with the same
tokens takes that slot and prefills only the rest. Each slot remembers whose tokens it holds, and a
prefix is reused only by the same tenant unless the model shares its cache (`engine.prefix_cache:
shared`): a shared cache tells one tenant through time-to-first-token which prompts others sent
(vLLM's CVE-2025-46570). A request with a `seed` is prefilled in full: reused KV shifts the last bits of
the logits (batch-dependent CPU kernels), and a seed promises the same output for the same request.
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


class PrefixPolicy:
    """Prefix reuse as the model's settings allow it: on or off, per tenant or shared."""

    def __init__(self, settings: EngineSettings) -> None:
        self.enabled = settings.prefix_reuse
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

    def choose(self, free: list[Slot], tokens: list[int], request: GenerationRequest) -> Slot:
        """The free slot caching most of the prompt if that is at least SIMILARITY of it; else the least recently
        used one, whose cache matters least (another conversation sharing only a preamble keeps its slot).
        Without reuse, and among never-used slots, the lowest id: contiguous ids decode as one micro-batch."""
        if not self.enabled:
            return min(free, key=lambda slot: slot.seq_id)

        def similar(slot: Slot) -> int:
            common = self.reusable(slot, tokens, request)
            return common if common >= SIMILARITY * len(tokens) else 0

        return max(free, key=lambda slot: (similar(slot), -slot.used, -slot.seq_id))

    @staticmethod
    def coldest(free: list[Slot]) -> Slot:
        """The least recently used free slot: the one whose cache matters least."""
        return min(free, key=lambda slot: (slot.used, slot.seq_id))
