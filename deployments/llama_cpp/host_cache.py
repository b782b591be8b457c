"""The host-RAM prompt cache of the llama.cpp engine: KV of prompts that lost their slot, restored on a later hit.

Slots keep `parallel` prompts' KV (`deployments.llama_cpp.prefix_cache`). When a new prompt takes a slot without
continuing the prompt cached there, the slot's cells are first copied to host RAM with llama.cpp's per-sequence
state API, as llama-server's `--cache-ram` does, into an LRU bounded in bytes (`engine.prompt_cache_ram_mib`).
A later prompt that a saved one holds more of than the free slots do gets it restored into the least recently
used free slot and prefills only the rest: more conversations stay warm than there are slots. Saved prompts are
scoped like slots: restored only for the tenant that sent them, unless the model shares its prefix cache.

Sliding-window layers: llama.cpp saves only the cells the last token still sees, so a restored prompt serves a
prompt that diverges from it less than the window (n_swa) before its end, such as the conversation's next turn;
one needing more is not restored (llama-server is no better without its context checkpoints).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from deployments.api import GenerationRequest
from deployments.llama_cpp.context import DecodeContext, SavedState
from deployments.llama_cpp.prefix_cache import SIMILARITY, PrefixPolicy, added_runs, common_prefix
from deployments.llama_cpp.sequence import Slot

logger = logging.getLogger(__name__)

MIB = 1 << 20
# Every admission scans the saved prompts on the decode thread (a few µs each, more for long shared prefixes). Bytes
# alone do not bound them: short prompts of a small model fit by the ten thousand in 512 MiB, and a 20-minute soak
# on the tiny test model slowed to half its request rate as they piled up. A demo-model prompt of 1,000 tokens
# keeps ~18 MiB, so the bytes bind long before this count does for real models.
MAX_SAVED_PROMPTS = 256
# A slot's cells are copied to another slot whole (its KV stream: n_ctx cells in every layer, ~74 MB for the demo
# model at 4096 tokens): 12 ms on a 2-core Xeon, what prefilling ~8 prompt tokens costs there. A shorter prefix is
# prefilled again.
MIN_COPIED_PREFIX = 16


@dataclass(eq=False)
class SavedPrompt:
    """A prompt's KV in host RAM: whose it is (as `Slot.owner`), its tokens and llama.cpp's state of them."""

    owner: str
    tokens: list[int]
    state: SavedState


class PromptStore:
    """Saved prompts, least recently used first, `limit` bytes of state and `count` prompts at most in all."""

    def __init__(self, limit: int, count: int = MAX_SAVED_PROMPTS) -> None:
        self.limit, self.count = limit, count
        self.bytes = 0
        self._entries: list[SavedPrompt] = []

    def __len__(self) -> int:
        return len(self._entries)

    def of(self, owner: str) -> list[SavedPrompt]:
        return [entry for entry in self._entries if entry.owner == owner]

    def holds(self, owner: str, tokens: list[int]) -> bool:
        """Whether a saved prompt of `owner` already holds all of `tokens`."""
        return any(common_prefix(entry.tokens, tokens) == len(tokens) for entry in self.of(owner))

    def put(self, entry: SavedPrompt) -> None:
        """Keep `entry` as the most recently used, evicting the least recently used to make room (not if it alone
        exceeds the limit); like llama-server, the saved prompts it holds all of go."""
        if entry.state.size > self.limit:
            return
        for held in [e for e in self.of(entry.owner) if common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
            self.remove(held)
        while self.bytes + entry.state.size > self.limit or len(self._entries) >= self.count:
            self.remove(self._entries[0])
        self._entries.append(entry)
        self.bytes += entry.state.size

    def remove(self, entry: SavedPrompt) -> None:
        self._entries.remove(entry)
        self.bytes -= entry.state.size


class HostCache:
    """Which slots a new request takes, saving the prompts they would lose and restoring a longer saved one (decode
    thread only; the counters are read from any thread)."""

    def __init__(self, context: DecodeContext, prefix: PrefixPolicy, limit_mib: int) -> None:
        self._context, self._prefix = context, prefix
        self.enabled = prefix.enabled and limit_mib > 0  # without prefix reuse no slot keeps a prompt to restore
        self.store = PromptStore(limit_mib * MIB if self.enabled else 0)
        self.hits = 0  # admissions that got a saved prompt back
        self.misses = 0  # admissions whose prompt neither a free slot nor a saved prompt held half of

    def place(self, free: list[Slot], tokens: list[int], request: GenerationRequest) -> list[Slot]:
        """The slots of a request's `n` choices, taken out of `free`: first the one to prefill in (`PrefixPolicy`,
        or the coldest with a longer saved prefix restored into it; moved beside the busy slots if it is apart from
        them), then the coldest after it (they get its copy)."""
        first = self._prefix.choose(free, tokens, request)
        if self.enabled:
            first = self._restore(first, free, tokens, request)
        first = self._beside(first, free, tokens, request)
        free.remove(first)
        others = []
        for _ in range(request.sampling.n - 1):
            others.append(self._prefix.coldest(free))
            free.remove(others[-1])
            self._save(others[-1], 0)
        return [first, *others]

    def _restore(self, chosen: Slot, free: list[Slot], tokens: list[int], request: GenerationRequest) -> Slot:
        """`chosen`, having saved what it loses; or the coldest free slot with the saved prompt that keeps most of the
        prompt restored into it, when that is more than `chosen` keeps (the last prompt token is always decoded)."""
        if request.sampling.seed is not None:  # prefilled in full (PrefixPolicy): nothing to look up
            self._save(chosen, 0)
            return chosen
        live = min(self._prefix.reusable(chosen, tokens, request), len(tokens) - 1)
        best, best_keep = None, live
        for entry in self.store.of(self._prefix.owner(request.tenant)):
            keep = min(common_prefix(entry.tokens, tokens), len(tokens) - 1)
            if keep > best_keep and self._context.usable(entry.state.first_position, keep):
                best, best_keep = entry, keep
        if best is None:
            if live < SIMILARITY * len(tokens):
                self.misses += 1
            self._save(chosen, live)
            return chosen
        target = self._prefix.coldest(free)
        self.store.remove(best)  # before saving the target's prompt can evict it
        self._save(target, 0)
        if not self._context.restore(target, best.state, best.tokens):
            logger.warning("could not restore a saved prompt of %d tokens into slot %d", len(best.tokens), target.seq_id)
            self.misses += 1
            return target
        target.owner, target.prompt_end = best.owner, len(best.tokens)
        self.hits += 1
        if best_keep < len(best.tokens):  # the rest of it may serve another prompt
            self.store.put(best)
        return target

    def _beside(self, chosen: Slot, free: list[Slot], tokens: list[int], request: GenerationRequest) -> Slot:
        """`chosen`, or, when its cached prefix puts the request apart from the busy slots (one more micro-batch every
        step, `added_runs`), a free slot beside them that gets a copy of that prefix if it is worth one (else the
        prompt is prefilled there); `chosen` keeps its cache."""
        busy = self._prefix.busy(free)
        target = self._prefix.coldest(free)
        if added_runs(target, busy) >= added_runs(chosen, busy):
            return chosen
        self._save(target, 0)
        if min(self._prefix.reusable(chosen, tokens, request), len(tokens) - 1) >= MIN_COPIED_PREFIX:
            self._context.copy(chosen, target)
            target.owner, target.prompt_end = chosen.owner, chosen.prompt_end
        return target

    def _save(self, slot: Slot, keep: int) -> None:
        """Copy the slot's prompt to host RAM unless a new prompt keeping `keep` of its tokens continues it."""
        if not self.enabled or keep >= slot.prompt_end or not slot.cached or self.store.holds(slot.owner, slot.cached):
            return
        state = self._context.save(slot)
        if state is None:
            logger.warning("could not save the prompt of %d tokens in slot %d", len(slot.cached), slot.seq_id)
            return
        self.store.put(SavedPrompt(slot.owner, list(slot.cached), state))
