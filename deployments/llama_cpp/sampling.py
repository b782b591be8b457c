"""How one llama.cpp sequence picks its next token: its sampler chain, and its grammar for structured output.

Grammar sampling follows llama-server (`common_sampler_sample` in llama.cpp's common/sampling.cpp): the chain
samples from the raw logits and the grammar checks only the chosen token; only when it rejects it is the
draw repeated among the tokens the grammar allows. Unlike llama-server, that second draw first looks only at
the `REDRAW_TOP_K` most likely tokens and filters the whole vocabulary only if none of them fits: the grammar's
pass over Gemma's 262k tokens costs ~35 ms, and a small model at temperature 1 has a third of its draws
rejected. So a rejected draw is a top-k draw (k = 256) among allowed tokens; a greedy pick is unchanged.
"""

from __future__ import annotations

import ctypes
import random
from typing import Any

import llama_cpp
import numpy as np

from deployments.api import SamplingParams
from deployments.llama_cpp.grammar import Grammar

REDRAW_TOP_K = 256
_PENALTY_LAST_N = 64  # generated tokens the presence/frequency penalties look back over (llama-cpp-python's)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def sampler_chain(sampling: SamplingParams, n_vocab: int) -> Any:
    """A request's own llama.cpp sampler chain (free it with llama_sampler_free).

    Same stages as llama-cpp-python's `Llama.generate` uses, after the request's logit bias: penalties
    on the generated tokens, then greedy at temperature 0, else top-p, temperature and a seeded draw.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    stages = []
    if sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(*sampling.logit_bias)
        stages.append(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(sampling.logit_bias), biases))
    if sampling.presence_penalty or sampling.frequency_penalty:
        stages.append(llama_cpp.llama_sampler_init_penalties(
            n_vocab, _PENALTY_LAST_N, 1.0, sampling.frequency_penalty, sampling.presence_penalty
        ))
    if sampling.temperature <= 0:
        stages.append(llama_cpp.llama_sampler_init_greedy())
    else:
        if sampling.top_p < 1.0:
            stages.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        stages.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    for stage in stages:
        llama_cpp.llama_sampler_chain_add(chain, stage)
    return chain


class GrammarDeadEnd(RuntimeError):
    """The grammar accepts no token of the vocabulary here (the sequence cannot go on)."""


class Candidates:
    """One reusable llama_token_data_array over the whole vocabulary (the decode thread samples one row at a time)."""

    def __init__(self, n_vocab: int) -> None:
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = np.empty(n_vocab, dtype=_TOKEN_DATA)
        data = self._data.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._array = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        self._data_pointer = data
        self.pointer = ctypes.byref(self._array)

    def fill(self, logits: np.ndarray, ids: np.ndarray | None = None) -> None:
        """All tokens, or only `ids`, with their logits."""
        size = len(self._ids) if ids is None else len(ids)
        self._data["id"][:size] = self._ids if ids is None else ids
        self._data["logit"][:size] = logits if ids is None else logits[ids]
        self._data["p"][:size] = 0.0
        self._array.data, self._array.size = self._data_pointer, size
        self._array.selected, self._array.sorted = -1, False

    def selected(self) -> int:
        """The token the last sampler chain chose (a sampler may have sorted or cut the array)."""
        return int(self._array.data[self._array.selected].id)

    def best(self) -> int:
        """The most likely token left (greedy over a filled, grammar-filtered array), or -1 if none is left."""
        logits = self._data["logit"][: self._array.size]
        best = int(logits.argmax())
        return int(self._data["id"][best]) if np.isfinite(logits[best]) else -1


class SequenceSampler:
    """A sequence's sampling: greedy by argmax, or its own chain (logit bias, penalties, top-p, temperature,
    seeded draw); with a grammar, the chosen token is checked and, if rejected, drawn again among allowed ones."""

    def __init__(self, sampling: SamplingParams, n_vocab: int, grammar: Grammar | None, candidates: Candidates) -> None:
        plain_greedy = sampling.temperature <= 0 and not (
            sampling.presence_penalty or sampling.frequency_penalty or sampling.logit_bias
        )
        self._chain: Any = None if plain_greedy else sampler_chain(sampling, n_vocab)
        self._grammar, self._candidates, self._n_vocab = grammar, candidates, n_vocab

    def sample(self, ctx: Any, row: int) -> tuple[int, np.ndarray]:
        """The next token, and the row's raw logits (valid until the next decode) for logprobs."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
        if self._grammar is None:
            if self._chain is None:  # numpy's argmax (first maximum, as llama.cpp's) is 10x faster
                return int(logits.argmax()), logits
            return llama_cpp.llama_sampler_sample(self._chain, ctx, row), logits  # accepts into the chain itself
        token = self._draw(logits, filtered=False)
        if not self._grammar.allows(token):
            token = self._draw(logits, filtered=True)
        if self._chain is not None:
            llama_cpp.llama_sampler_accept(self._chain, token)
        self._grammar.accept(token)
        return token, logits

    def _draw(self, logits: np.ndarray, filtered: bool) -> int:
        candidates = self._candidates
        if not filtered and self._chain is None:
            return int(logits.argmax())
        if filtered:
            assert self._grammar is not None
            candidates.fill(logits, np.argpartition(logits, -REDRAW_TOP_K)[-REDRAW_TOP_K:])
            self._grammar.apply(candidates.pointer)
            if candidates.best() < 0:  # none of the most likely tokens fits: look at all of them
                candidates.fill(logits)
                self._grammar.apply(candidates.pointer)
                if candidates.best() < 0:
                    raise GrammarDeadEnd("the response_format grammar allows no token here")
        else:
            candidates.fill(logits)
        if self._chain is None:
            return candidates.best()
        llama_cpp.llama_sampler_apply(self._chain, candidates.pointer)
        return candidates.selected()

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._grammar.free()
            self._grammar = None
