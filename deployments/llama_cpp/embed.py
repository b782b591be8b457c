"""Embeddings from a GGUF with llama.cpp: one pooled vector per input, several inputs per `llama_decode`.

The context runs with `embeddings` on and a pooling type (the GGUF's own, or `engine.pooling`:
mean, cls, last; a decoder such as the demo Gemma has none of its own, so its entry sets mean).
A request's inputs are packed into as few decodes as fit: up to `parallel` sequences and
`max(n_batch, n_ctx)` tokens each. Decodes run one at a time on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any

import llama_cpp
import numpy as np

from deployments.api import (
    ContextLengthExceeded,
    Engine,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InvalidGenerationRequest,
)
from deployments.embedding import EmbeddingRequest, EmbeddingResult, WrongModelKind
from deployments.llama_cpp.model import choose_repack, context_params, open_model
from deployments.spec import ModelSpec
from deployments.weights.cache import WeightCache

logger = logging.getLogger(__name__)

POOLING = {
    "model": llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}


class LlamaEmbeddingEngine(Engine):
    """A GGUF serving `/v1/embeddings` (model entries with `engine.embedding: true`)."""

    def __init__(self, spec: ModelSpec, cache: WeightCache | None = None) -> None:
        self._spec = spec
        self._cache = cache or WeightCache()
        self._resources = ExitStack()
        self._lock = threading.Lock()
        self._ctx: Any = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        settings = self._spec.engine
        try:
            model = open_model(self._spec, self._cache, self._resources, choose_repack(settings.repack))
            self._model, self._n_embd = model, llama_cpp.llama_model_n_embd(model.model)
            self._capacity = max(settings.n_batch, settings.n_ctx)  # any input that fits the window fits one decode
            params = context_params(settings, n_seq=settings.parallel, n_batch=self._capacity)
            params.embeddings, params.pooling_type = True, POOLING[settings.pooling]
            ctx = llama_cpp.llama_init_from_model(model.model, params)
            if ctx is None:
                raise EngineUnavailable(f"model {self._spec.name!r}: llama.cpp could not create an embedding context")
            self._resources.callback(llama_cpp.llama_free, ctx)
            if llama_cpp.llama_pooling_type(ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                raise EngineUnavailable(f"model {self._spec.name!r}: the GGUF names no pooling; set engine.pooling")
            batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
            self._resources.callback(llama_cpp.llama_batch_free, batch)
        except BaseException:
            self._resources.close()
            raise
        self._ctx, self._batch = ctx, batch
        self._encoder_only = llama_cpp.llama_model_has_encoder(model.model) and not llama_cpp.llama_model_has_decoder(
            model.model)
        logger.info("embedding model %s loaded from %s (%d dimensions)", self._spec.name, self._spec.source, self._n_embd)

    def placement(self) -> dict[str, Any]:
        settings = self._spec.engine
        return {"backend": "llama_cpp", "task": "embed", "slots": settings.parallel, "threads": settings.n_threads}

    async def check_health(self) -> None:
        if self._ctx is None:
            raise EngineUnavailable(f"model {self._spec.name!r} is not loaded")

    async def stop(self) -> None:
        await asyncio.to_thread(self._resources.close)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        raise WrongModelKind(f"'{self._spec.name}' is an embedding model: use /v1/embeddings.", param="model")
        yield  # an async generator, like every engine's generate

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if self._ctx is None:
            raise EngineUnavailable(f"model {self._spec.name!r} is not loaded")
        return await asyncio.to_thread(self._embed, request)

    def _tokens(self, index: int, value: str | tuple[int, ...]) -> list[int]:
        """One input's tokens, checked against the vocabulary and the window."""
        param = f"input[{index}]"
        if isinstance(value, str):
            tokens = self._model.tokenize(value.encode("utf-8"), add_bos=True, special=False)
        else:
            tokens = list(value)
            if any(not 0 <= t < self._model.n_vocab() for t in tokens):
                raise InvalidGenerationRequest(f"{param} holds token ids outside this model's vocabulary.", param=param)
        if not tokens:
            raise InvalidGenerationRequest(f"{param} is empty.", param=param)
        if len(tokens) > self._spec.engine.n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._spec.engine.n_ctx} tokens, but {param} has "
                f"{len(tokens)} tokens.", param=param,
            )
        return tokens

    def _embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        sequences = [self._tokens(i, value) for i, value in enumerate(request.inputs)]
        vectors: list[bytes] = []
        group: list[list[int]] = []
        with self._lock:
            for tokens in sequences:
                if group and (len(group) == self._spec.engine.parallel
                              or sum(map(len, group)) + len(tokens) > self._capacity):
                    vectors += self._decode(group)
                    group = []
                group.append(tokens)
            vectors += self._decode(group)
        return EmbeddingResult(tuple(vectors), sum(map(len, sequences)))

    def _decode(self, group: list[list[int]]) -> list[bytes]:
        """One llama_decode over several sequences (ids 0..k-1); their pooled, L2-normalized embeddings."""
        batch, n = self._batch, 0
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, True
                batch.seq_id[n][0] = seq
                n += 1
        batch.n_tokens = n
        run = llama_cpp.llama_encode if self._encoder_only else llama_cpp.llama_decode
        if (status := run(self._ctx, batch)) != 0:
            raise EngineUnavailable(f"model {self._spec.name!r}: llama.cpp could not embed (status {status})")
        vectors = []
        for seq in range(len(group)):
            pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            vector = np.ctypeslib.as_array(pooled, shape=(self._n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vector))
            vectors.append((vector / norm if norm else vector).astype("<f4").tobytes())
        return vectors
