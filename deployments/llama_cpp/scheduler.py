"""The decode loop of the continuous-batching llama.cpp engine (`deployments.llama_cpp.engine`).

One llama.cpp context holds `parallel` sequence slots, each with its own KV window of `n_ctx`
tokens. One decode thread owns the context. Each step it feeds every streaming sequence its
last sampled token, fills the rest of the step with prompt chunks of newly admitted sequences
(chunked prefill: at most `prefill_chunk` prompt tokens while others stream, so a long prompt
never pauses them for more than one step; the shortest rest first, so a follow-up turn's few new
tokens do not wait behind a long new prompt, which waits at most for the other slots), decodes
all of it in one `llama_decode` with logits only for the rows that sample, and samples each of
those rows with the sequence's own sampler chain. Requests wait for a free slot in a fair queue (`deployments.llama_cpp.fair_queue`: by tenant share,
each charged the tokens its sequences feed) and are admitted at the next step; a finished
or cancelled sequence gives its slot (and, unless prefix reuse keeps them, its KV cells) back at
once. Prompts are rendered and tokenized on the decode thread at admission, so requests that
arrive together are admitted in the same step. The replica's event loop only moves chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from deployments.api import (
    STARTED,
    EngineError,
    EngineStats,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    InvalidGenerationRequest,
)
from deployments.llama_cpp.context import DecodeContext
from deployments.llama_cpp.fair_queue import FairQueue
from deployments.llama_cpp.grammar import Grammar
from deployments.llama_cpp.host_cache import HostCache
from deployments.llama_cpp.model import TokenPieces
from deployments.llama_cpp.prefix_cache import PrefixPolicy
from deployments.llama_cpp.prompt import Prompt
from deployments.llama_cpp.sampling import Candidates, GrammarDeadEnd, SequenceSampler
from deployments.llama_cpp.sequence import Feed, Group, Sequence, Slot, Submission
from deployments.llama_cpp.step_stats import StepStats
from deployments.settings import EngineSettings

logger = logging.getLogger(__name__)

DONE = object()  # emitted after a request's last chunk or its error


class DecodeLoop:
    """Owns the llama.cpp context and the thread that decodes every active sequence together."""

    def __init__(
        self, model: Any, settings: EngineSettings, prepare: Callable[[GenerationRequest], Prompt], name: str
    ) -> None:
        self._name, self._prepare, self._pieces, self._vocab = name, prepare, TokenPieces(model.vocab), model.vocab
        self._prefill_chunk, self._prefix = settings.prefill_chunk, PrefixPolicy(settings)
        self._capacity = max(settings.n_batch, settings.parallel + settings.prefill_chunk)
        self._context = DecodeContext(model, settings, self._capacity)
        self._host = HostCache(self._context, self._prefix, settings.prompt_cache_ram_mib)
        self._n_vocab = model.n_vocab()
        self._candidates = Candidates(self._n_vocab)
        self._slots = [Slot(seq_id) for seq_id in range(settings.parallel)]
        self._kv_cells = settings.parallel * settings.n_ctx
        self._waiting = FairQueue()  # guarded by _wake
        self.step_stats = StepStats()
        self._active: list[Sequence] = []  # in admission order
        self._wake = threading.Condition()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=f"llama-decode-{name}", daemon=True)
        self.thread.start()

    @property
    def active_count(self) -> int:
        """Sequences admitted and not finished (read on the decode thread)."""
        return len(self._active)

    @property
    def busy_slots(self) -> int:
        """Slots holding a sequence now; from any thread (a slot's sequence is set and cleared atomically)."""
        return sum(slot.sequence is not None for slot in self._slots)

    def submit(self, submission: Submission) -> None:
        n = submission.request.sampling.n
        if n > len(self._slots):
            raise InvalidGenerationRequest(
                f"n is {n}, but a replica of model {self._name!r} decodes at most {len(self._slots)} sequences "
                "at once (engine.parallel)", param="n",
            )
        with self._wake:
            if self._stopping:
                raise EngineUnavailable(f"model {self._name!r} is shutting down")
            self._waiting.push(submission)
            self._wake.notify()

    def cancel(self, submission: Submission) -> None:
        """Called when the request's stream closes: it leaves the queue now, or its slot frees before the next step."""
        submission.cancelled = True
        with self._wake:
            self._waiting.remove(submission)
            self._wake.notify()

    def stats(self) -> EngineStats:
        """Slots, queue and KV use now, token totals so far, and the steps decoded since the last call."""
        with self._wake:
            waiting = len(self._waiting)
        return self.step_stats.snapshot(self._slots, waiting, self._kv_cells, self._host)

    def close(self) -> None:
        """Stop the thread, fail what is left and free llama.cpp memory (only once the thread is gone)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self.thread.join()  # within one decode step
        message = f"model {self._name!r} is shutting down"
        for sequence in list(self._active):
            self._fail(sequence, message)
        for submission in self._waiting:
            submission.emit(EngineUnavailable(message))
            submission.emit(DONE)
        self._waiting = FairQueue()
        self._context.close()

    # Everything below runs on the decode thread.

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active):
                    self._wake.wait()
                if self._stopping:
                    return
                free = [slot for slot in self._slots if slot.sequence is None]
                arrivals = self._waiting.take(len(free))
            try:
                for submission in arrivals:
                    self._admit(submission, free)
                for sequence in [s for s in self._active if s.cancelled]:
                    self._release(sequence)
                if self._active:
                    self._step()
            except Exception:  # a bug must not kill the replica's only decode thread
                logger.exception("model %s: decode step failed; failing its %d sequences", self._name, len(self._active))
                for sequence in list(self._active):
                    self._fail(sequence, f"model {self._name!r} failed during generation")

    def _admit(self, submission: Submission, free: list[Slot]) -> None:
        """Tokenize and check the prompt, then give it the free slot caching most of it for its tenant (`PrefixPolicy`,
        or one a longer saved prompt is restored into: `HostCache`), else one beside the busy slots, and its other
        choices the ones beside it (llama.cpp decodes a run of consecutive ids as one micro-batch). STARTED goes
        first: its wait is over."""
        submission.emit(STARTED)
        try:
            prompt = self._prepare(submission.request)
        except EngineError as exc:
            submission.emit(exc)
            submission.emit(DONE)
            return
        except Exception:  # only this request is lost
            logger.exception("model %s: could not prepare request %s", self._name, submission.request.request_id)
            submission.emit(EngineUnavailable(f"model {self._name!r} could not prepare this request"))
            submission.emit(DONE)
            return
        slot, *others = self._host.place(free, prompt.tokens, submission.request)
        group = Group()
        sequence = Sequence(submission, prompt, slot, group, 0)
        for index, other in enumerate(others, 1):
            other.sequence = Sequence(submission, prompt, other, group, index)
        slot.sequence = sequence
        self._active.append(sequence)
        try:
            self._start(sequence)
        except Exception:  # only this request is lost
            logger.exception("model %s: could not start request %s", self._name, sequence.request_id)
            self._fail(sequence, f"model {self._name!r} could not start this request")

    def _start(self, sequence: Sequence) -> None:
        slot, tokens, request = sequence.slot, sequence.prompt.tokens, sequence.submission.request
        keep = min(self._prefix.reusable(slot, tokens, request), len(tokens) - 1)  # the last token gives logits
        sequence.n_fed = self._context.keep_prefix(slot, keep)
        self.step_stats.prompt_tokens_reused += sequence.n_fed
        sampling = request.sampling
        for member in sequence.group.sequences:  # each choice its own draws: seed, seed + 1, ...
            self._prefix.claim(member.slot, request.tenant, len(tokens))
            member.cached_tokens = sequence.n_fed
            seed = None if sampling.seed is None else sampling.seed + member.index
            grammar = Grammar(self._vocab, sequence.prompt.grammar) if sequence.prompt.grammar else None
            member.sampler = SequenceSampler(
                dataclasses.replace(sampling, seed=seed), self._n_vocab, grammar, self._candidates
            )

    def _step(self) -> None:
        """One llama_decode: a token for each streaming sequence, then prompt chunks, the shortest rest first."""
        feeds = [Feed(s, [s.next_token], True) for s in self._active if s.streaming]
        room = self._capacity - len(feeds)
        if feeds:
            room = min(room, self._prefill_chunk)
        prefilling = sorted((s for s in self._active if not s.streaming), key=lambda s: len(s.prompt.tokens) - s.n_fed)
        for sequence in prefilling:
            if room <= 0:
                break
            start = sequence.n_fed
            chunk = sequence.prompt.tokens[start : start + room]
            feeds.append(Feed(sequence, chunk, start + len(chunk) == len(sequence.prompt.tokens)))
            room -= len(chunk)
        feeds.sort(key=lambda feed: feed.sequence.slot.seq_id)  # llama.cpp takes sequences in id order
        started = time.perf_counter()
        status = self._context.decode(feeds)
        if status == 0:
            self._account(feeds, time.perf_counter() - started)
            self._absorb(feeds)
            return
        # Roll back what the failed call left, then retry each sequence alone so only the one at fault fails.
        self._context.roll_back(feeds)
        for feed in feeds:
            if len(feeds) > 1:
                status = self._context.decode([feed])
            if status == 0:
                self._absorb([feed])
            else:
                self._fail(feed.sequence, f"model {self._name!r}: llama.cpp could not decode (status {status})")

    def _account(self, feeds: list[Feed], seconds: float) -> None:
        """A decoded step's metrics, and its tokens charged to their tenants' fair shares."""
        self.step_stats.record(feeds, seconds)
        with self._wake:
            self._waiting.charge(feeds)

    def _absorb(self, feeds: list[Feed]) -> None:
        """Record what the decode put in the KV cache, then sample the sequences that asked for logits."""
        for feed in feeds:
            sequence = feed.sequence
            if not sequence.streaming:
                sequence.n_fed += len(feed.tokens)
            sequence.slot.cached.extend(feed.tokens)
            if feed.sample and not sequence.cancelled:
                for choice in [*self._branch(sequence), sequence]:
                    self._sample(choice, feed.row)

    def _branch(self, first: Sequence) -> list[Sequence]:
        """The request's other choices, once the first has its prompt in the KV cache: they get copies of its
        cells (llama.cpp copies across KV streams at the next decode) and sample from the same logits."""
        others = first.waiting
        for other in others:
            self._context.copy(first.slot, other.slot)
            other.n_fed = len(other.prompt.tokens)
            self._active.append(other)
        return others

    def _sample(self, sequence: Sequence, row: int) -> None:
        assert sequence.sampler is not None
        try:
            token, logits = sequence.sampler.sample(self._context.ctx, row)
        except GrammarDeadEnd as exc:
            self._fail(sequence, f"model {self._name!r}: {exc}")
            return
        self._accept(sequence, token, logits)

    def _accept(self, sequence: Sequence, token: int, logits: np.ndarray) -> None:
        text, reason = sequence.accept(token, logits, self._pieces)
        if reason is not None:
            self._finish(sequence, text, reason)
        elif text:
            sequence.emit(sequence.chunk(text))

    def _finish(self, sequence: Sequence, text: str, reason: FinishReason) -> None:
        sequence.emit(sequence.chunk(text, reason))
        sequence.group.open -= 1
        if not sequence.group.open:
            sequence.emit(DONE)
        self._release(sequence)

    def _fail(self, sequence: Sequence, message: str) -> None:
        """Fail the whole request: every choice of it still holding a slot goes."""
        if sequence.slot.sequence is not sequence:  # already failed with another choice of its request
            return
        logger.error("%s (request %s)", message, sequence.request_id)
        sequence.emit(EngineUnavailable(message))
        sequence.emit(DONE)
        for member in sequence.group.sequences:
            if member.slot.sequence is member:
                self._release(member, keep_cache=False)

    def _release(self, sequence: Sequence, keep_cache: bool = True) -> None:
        """Give the slot back now (and those of choices still waiting for its prompt); its KV cells go too unless
        prefix reuse may want them."""
        for other in sequence.waiting:
            self._release(other, keep_cache=False)
        if sequence in self._active:
            self._active.remove(sequence)
        if sequence.sampler is not None:
            sequence.sampler.free()
            sequence.sampler = None
        if not (keep_cache and self._prefix.enabled):
            self._context.clear(sequence.slot)
        sequence.slot.sequence = None  # last: a slot that shows free (`busy_slots`, stats) has its cells freed too
