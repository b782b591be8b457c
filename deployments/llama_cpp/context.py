"""The llama.cpp context a replica decodes in: one KV stream per sequence slot, one batch per decode step.

The decode loop (`deployments.llama_cpp.scheduler`) decides what goes into each step; this module
puts it into llama.cpp's batch and KV memory: which cells a slot keeps, copies, drops, saves or restores.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp

from deployments.llama_cpp.model import context_params
from deployments.llama_cpp.sequence import Feed, Slot
from deployments.settings import EngineSettings


@dataclass(frozen=True)
class SavedState:
    """A slot's KV cells copied to host RAM (llama.cpp's per-sequence state) and the first position a restore brings
    back in every layer: llama.cpp leaves out the sliding-window cells its last token no longer sees."""

    data: ctypes.Array[ctypes.c_uint8]
    first_position: int

    @property
    def size(self) -> int:
        return len(self.data)


class DecodeContext:
    """A llama.cpp context of `parallel` slots of `n_ctx` tokens and a batch of `capacity` rows (decode thread only)."""

    def __init__(self, model: Any, settings: EngineSettings, capacity: int) -> None:
        params = context_params(settings, n_seq=settings.parallel, n_batch=capacity)
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        if self.ctx is None:
            raise ValueError(f"llama.cpp could not create a context of {settings.parallel} x {settings.n_ctx} tokens")
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._n_swa = llama_cpp.llama_model_n_swa(model.model)

    def usable(self, first_position: int, keep: int) -> bool:
        """Whether cells from `first_position` on serve a kept prefix of `keep` tokens: the tokens after it need the
        last n_swa positions in sliding-window layers (llama-server's check before reusing a slot)."""
        return first_position <= max(0, keep - self._n_swa)

    def keep_prefix(self, slot: Slot, keep: int) -> int:
        """Keep the first `keep` cached tokens of the slot and drop the rest; returns how many it could keep."""
        # Sliding-window layers may have dropped cells the kept prefix needs; then recompute everything.
        if keep and not self.usable(llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id), keep):
            keep = 0
        if not (keep and llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)):
            keep = 0
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        del slot.cached[keep:]
        return keep

    def decode(self, feeds: list[Feed]) -> int:
        """One llama_decode of the feeds (in seq id order); logits only for the rows that sample."""
        batch = self._batch
        token, pos, n_seq_id, seq_id, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        for feed in feeds:
            slot = feed.sequence.slot
            first = len(slot.cached)
            for offset, value in enumerate(feed.tokens):
                token[n], pos[n], n_seq_id[n], logits[n] = value, first + offset, 1, False
                seq_id[n][0] = slot.seq_id
                n += 1
            if feed.sample:
                logits[n - 1] = True
                feed.row = n - 1
        batch.n_tokens = n
        return llama_cpp.llama_decode(self.ctx, batch)

    def roll_back(self, feeds: list[Feed]) -> None:
        """Drop the cells a failed decode left beyond what each slot had cached."""
        for feed in feeds:
            slot = feed.sequence.slot
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.cached), -1)

    def copy(self, source: Slot, target: Slot) -> None:
        """Give `target` the cells of `source` (llama.cpp copies across KV streams at the next decode)."""
        llama_cpp.llama_memory_seq_rm(self._memory, target.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, target.seq_id, -1, -1)
        target.cached[:] = source.cached

    def save(self, slot: Slot) -> SavedState | None:
        """A copy of the slot's cells in host RAM (`restore` puts it back into any slot); None if llama.cpp fails."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, data, size, slot.seq_id) != size:
            return None
        first = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id)
        return SavedState(data, max(first, len(slot.cached) - self._n_swa) if self._n_swa else first)

    def restore(self, slot: Slot, state: SavedState, tokens: list[int]) -> bool:
        """Replace the slot's cells with saved ones holding `tokens`; on failure the slot is left empty."""
        if llama_cpp.llama_state_seq_set_data(self.ctx, state.data, state.size, slot.seq_id) == state.size:
            slot.cached[:] = tokens
            return True
        self.clear(slot)
        return False

    def clear(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached.clear()

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
