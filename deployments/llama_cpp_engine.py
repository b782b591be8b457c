"""llama.cpp engine (llama-cpp-python) for GGUF models on CPU.

A `llama_cpp.Llama` is not thread-safe, so one worker thread owns it and runs every
generation in turn; the replica's event loop only moves chunks. A cancelled request
sets a flag the worker checks after each token, so a disconnect frees the model at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from deployments.engine import (
    ContextLengthExceeded,
    Engine,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InvalidGenerationRequest,
)
from deployments.text import StopMatcher, Utf8Stream
from deployments.weight_cache import WeightCache
from serve_app.config import ModelSpec

logger = logging.getLogger(__name__)

_DONE = object()


class ChatTemplate:
    """Renders chat messages into a prompt: explicit template, named llama.cpp format, or the GGUF's own."""

    def __init__(self, llm: Any, chat_format: str | None, chat_template: str | None) -> None:
        from llama_cpp import llama_chat_format

        self.stops: list[str] = []
        if chat_template is None and chat_format is None:
            chat_template = llm.metadata.get("tokenizer.chat_template")
        if chat_template is not None:
            vocab = llm._model
            self._format = llama_chat_format.Jinja2ChatFormatter(
                template=chat_template,
                eos_token=vocab.token_get_text(llm.token_eos()),
                bos_token=vocab.token_get_text(llm.token_bos()),
            )
        elif chat_format is not None:
            formatter = getattr(llama_chat_format, "format_" + chat_format.replace("-", "_"), None)
            if formatter is None:
                raise ValueError(f"unknown chat_format {chat_format!r} (llama-cpp-python has no format_{chat_format})")
            self._format = formatter
        else:
            self._format = None

    def render(self, messages: tuple[dict[str, str], ...]) -> tuple[str, bool, list[str]]:
        """Return (prompt, whether it already holds BOS, template stop strings)."""
        if self._format is None:
            raise InvalidGenerationRequest(
                "this model has no chat template; use /v1/completions or configure engine.chat_format",
                param="messages",
            )
        result = self._format(messages=[dict(m) for m in messages])
        stops = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
        return result.prompt, result.added_special, stops


class LlamaCppEngine(Engine):
    """One GGUF model in one process, generations serialized through a single owner thread."""

    def __init__(self, spec: ModelSpec, cache: WeightCache | None = None) -> None:
        self._spec = spec
        self._cache = cache or WeightCache()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-owner")
        self._resources = ExitStack()
        self._llm: Any = None
        self._template: ChatTemplate | None = None
        self._pieces: TokenPieces | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from llama_cpp import Llama

        settings = self._spec.engine
        path = self._cache.fetch(self._spec.source, self._spec.storage, label=self._spec.name)
        self._resources.enter_context(self._cache.lease(path))
        kwargs: dict[str, Any] = {"n_ctx": settings.n_ctx, "n_batch": settings.n_batch, "verbose": False}
        if settings.n_threads is not None:
            kwargs.update(n_threads=settings.n_threads, n_threads_batch=settings.n_threads)
        try:
            self._llm = Llama(model_path=str(path), **{**kwargs, **settings.engine_kwargs})
        except (ValueError, RuntimeError) as exc:
            raise EngineUnavailable(f"model {self._spec.name!r}: llama.cpp could not load {path.name}: {exc}") from exc
        self._template = ChatTemplate(self._llm, settings.chat_format, settings.chat_template)
        self._pieces = TokenPieces(self._llm)
        logger.info("model %s loaded from %s (n_ctx=%d)", self._spec.name, path, self._llm.n_ctx())

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailable(f"model {self._spec.name!r} is not loaded")

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._resources.close()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        loop.run_in_executor(self._executor, self._run, request, emit, cancelled)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _run(self, request: GenerationRequest, emit: Callable[[Any], None], cancelled: threading.Event) -> None:
        """Worker-thread body: never raises; errors travel to the caller through `emit`."""
        try:
            if not cancelled.is_set():
                self._generate(request, emit, cancelled)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the waiting request
            if not isinstance(exc, (InvalidGenerationRequest, ContextLengthExceeded)):
                logger.exception("generation %s failed", request.request_id)
                exc = EngineUnavailable(f"model {self._spec.name!r} failed during generation: {exc}")
            emit(exc)
        finally:
            emit(_DONE)

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        llm = self._llm
        if request.messages is not None:
            assert self._template is not None
            prompt, has_bos, stops = self._template.render(request.messages)
            return llm.tokenize(prompt.encode("utf-8"), add_bos=not has_bos, special=True), stops
        return llm.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=False), []

    def _generate(self, request: GenerationRequest, emit: Callable[[Any], None], cancelled: threading.Event) -> None:
        llm, sampling = self._llm, request.sampling
        tokens, template_stops = self._prompt_tokens(request)
        n_prompt, n_ctx = len(tokens), llm.n_ctx()
        param = "messages" if request.messages is not None else "prompt"
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens, but the prompt has {n_prompt} tokens.",
                param=param,
            )
        budget = n_ctx - n_prompt
        if sampling.max_tokens is not None:
            if sampling.max_tokens > budget:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens "
                    f"and max_tokens is {sampling.max_tokens}. Reduce the prompt or max_tokens.",
                    param="max_tokens",
                )
            budget = sampling.max_tokens

        llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        llm.reset()  # fresh evaluation: the same request gives the same tokens, whatever ran before
        decoder, stops = Utf8Stream(), StopMatcher([*sampling.stop, *template_stops])
        produced, finish, hit, text = 0, "length", False, ""
        generator = llm.generate(
            tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        try:
            for token in generator:
                if cancelled.is_set():
                    return
                if self._pieces.is_eog(token):
                    finish = "stop"
                    break
                produced += 1
                text, hit = stops.feed(decoder.feed(self._pieces.piece(token)))
                if hit:
                    finish = "stop"
                    break
                if produced >= budget:
                    break
                if text:
                    emit(GenerationChunk(text, n_prompt, produced))
                text = ""
        finally:
            generator.close()
        if not hit:
            tail, hit = stops.feed(decoder.flush())
            text += tail if hit else tail + stops.flush()
            finish = "stop" if hit else finish
        emit(GenerationChunk(text, n_prompt, produced, finish))


class TokenPieces:
    """Token id -> bytes and end-of-generation checks, memoized (llama-cpp-python's own caps pieces at 32 bytes)."""

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._vocab = llm._model.vocab
        self._pieces: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
                if n >= 0:
                    break
                size = -n
            cached = self._pieces[token] = buffer.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))
