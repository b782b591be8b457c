"""The decode loop's bookkeeping (`deployments.llama_cpp.scheduler`): requests, their sequences, slots and feeds.

A request asking for `n` choices becomes a group of n sequences in n slots: the first prefills the prompt,
the others wait until it has, then take a copy of its KV cells and sample from the same logits. The group
shares the request's emit, its running token total (every chunk's `completion_tokens`) and its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.api import FinishReason, GenerationChunk, GenerationRequest, TokenLogprob
from deployments.llama_cpp.logprobs import token_logprob
from deployments.llama_cpp.model import TokenPieces
from deployments.llama_cpp.prompt import Prompt
from deployments.llama_cpp.sampling import SequenceSampler
from deployments.llama_cpp.text import StopMatcher, Utf8Stream


@dataclass
class Submission:
    """A request handed to the decode thread; `cancelled` is set by the request's coroutine."""

    request: GenerationRequest
    emit: Callable[[Any], None]
    cancelled: bool = False


@dataclass
class Group:
    """The sequences of one request: `open` of them have not finished; `produced` counts all their tokens."""

    sequences: list[Sequence] = field(default_factory=list)
    open: int = 0
    produced: int = 0


class Sequence:
    """One choice of an admitted request: its slot, sampler and decoding state (decode thread only)."""

    def __init__(self, submission: Submission, prompt: Prompt, slot: Slot, group: Group, index: int) -> None:
        self.submission, self.prompt, self.slot, self.group, self.index = submission, prompt, slot, group, index
        self.request_id, self.emit = submission.request.request_id, submission.emit
        self.sampler: SequenceSampler | None = None
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text has not gone out in a chunk yet
        self.n_fed = 0  # prompt tokens already in the KV cache
        self.cached_tokens = 0  # of them, those reused from an earlier sequence's cache (not computed for this one)
        self.produced = 0
        self.next_token = -1  # sampled, not yet decoded
        self.decoder = Utf8Stream()
        self.stops = StopMatcher(prompt.stops)
        group.sequences.append(self)
        group.open += 1

    @property
    def cancelled(self) -> bool:
        return self.submission.cancelled

    @property
    def streaming(self) -> bool:
        return self.n_fed == len(self.prompt.tokens)

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs of the tokens in the chunk about to go out (they leave with it)."""
        taken = tuple(self.logprobs)
        self.logprobs.clear()
        return taken

    def accept(self, token: int, logits: np.ndarray, pieces: TokenPieces) -> tuple[str, FinishReason | None]:
        """A sampled token as the text to send now (a stop string is never sent) and, if it ends the sequence, why."""
        if pieces.is_eog(token):
            return self._closing("", "stop")
        self.produced += 1
        self.group.produced += 1
        top = self.submission.request.sampling.logprobs
        if top is not None:
            self.logprobs.append(token_logprob(logits, token, top, pieces.piece))
        text, hit = self.stops.feed(self.decoder.feed(pieces.piece(token)))
        if hit:
            return text, "stop"
        if self.produced >= self.prompt.max_new_tokens:
            return self._closing(text, "length")
        self.next_token = token
        return text, None

    def _closing(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        """The last text of a sequence ending for `reason`: what the UTF-8 decoder and the stop check still hold."""
        tail, hit = self.stops.feed(self.decoder.flush())
        return text + (tail if hit else tail + self.stops.flush()), "stop" if hit else reason

    def chunk(self, text: str, finish_reason: FinishReason | None = None) -> GenerationChunk:
        return GenerationChunk(text, len(self.prompt.tokens), self.group.produced, finish_reason,
                               logprobs=self.take_logprobs(), index=self.index, cached_tokens=self.cached_tokens)

    @property
    def waiting(self) -> list[Sequence]:
        """The group's other choices still waiting for this one's prompt (it is the first and prefilling)."""
        return [s for s in self.group.sequences[1:] if not s.streaming] if self.index == 0 else []


@dataclass
class Slot:
    """A llama.cpp sequence id, the tokens whose KV cells it holds (by position) and whose cache they are."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    owner: str = ""  # the tenant whose tokens these are ("" when the model shares its prefix cache)
    prompt_end: int = 0  # cached[:prompt_end] is the last prompt started here, the rest its answer
    used: int = 0  # when a sequence last started here (prefix reuse evicts the least recently used cache)
    sequence: Sequence | None = None


@dataclass
class Feed:
    """Tokens of one sequence in one decode step; `row` is the batch index to sample from, if any."""

    sequence: Sequence
    tokens: list[int]
    sample: bool
    row: int = -1
