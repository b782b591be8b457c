"""Serving one generation: an OpenAI request into a `GenerationRequest`, the model's chunks into JSON or SSE.

One path for chat and text completions: `open` starts the generation on the model's deployment
and waits for its first chunk (so early failures get a proper status), then `collect` builds the
n choices of a whole response or `chat_events` / `completion_events` stream them. Every failure
leaves as an OpenAI error (`model_error`); the model side is cancelled however the client leaves.
The request's account meters the chunks as they pass (`model_stream`), for its rate-limit lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from opentelemetry import trace
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api import GenerationChunk, GenerationRequest, SamplingParams
from deployments.embedding import EmbeddingRequest, EmbeddingResult
from deployments.spec import model_deployment_name
from deployments.tracing import traceparent
from serve_app.access.gate import RequestAccount
from serve_app.config import IngressSettings
from serve_app.ingress.backpressure import Overloaded, SlotPressure
from serve_app.ingress.choices import Choices, call_deltas, chat_logprobs, completion_logprobs
from serve_app.ingress.errors import model_error, overloaded, unavailable
from serve_app.ingress.generation_fields import generation_options
from serve_app.ingress.metrics import IngressMetrics
from serve_app.ingress.model_stream import MeteredStream
from serve_app.ingress.protocol import OpenAIError, SamplingFields, now
from serve_app.ingress.responses import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ModelStatus,
)
from serve_app.ingress.tracing import StreamSpans


def sampling_params(body: SamplingFields, max_tokens: int | None, cap: int | None) -> SamplingParams:
    return SamplingParams(
        **generation_options(body),  # type: ignore[arg-type]
        max_tokens=max_tokens,
        max_tokens_cap=cap,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(body.stop_list()),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


# JSON leaves these raw inside strings, but str.splitlines() ends a line at each, and so does every SSE client
# built on it (httpx's iter_lines and its users): a token holding one would cut its event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel) -> str:
    """One server-sent event on one line; the protocol models decide which empty fields the schema wants omitted."""
    return f"data: {payload.model_dump_json().translate(_LINE_BREAKS)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})




class Serving:
    """The ingress replica's side of every generation: model handles, the queue and first-token deadlines, TTFT."""

    def __init__(self, settings: IngressSettings, metrics: IngressMetrics, tracer: trace.Tracer) -> None:
        self._first_token_timeout_s = settings.first_token_timeout_s
        self._max_queue_wait_s = settings.max_queue_wait_s
        self._metrics = metrics
        self._tracer = tracer
        self._handles: dict[str, DeploymentHandle] = {}
        self._pressure: dict[str, SlotPressure] = {}

    def handle(self, model: str) -> DeploymentHandle:
        """The model application's deployment handle (Serve keeps it pointed at the live replicas)."""
        if model not in self._handles:
            self._handles[model] = serve.get_deployment_handle(model_deployment_name(model), app_name=model)
        return self._handles[model]

    async def embed(self, model: str, status: ModelStatus, request: EmbeddingRequest) -> EmbeddingResult:
        """One embedding call to the model's deployment, its failures as OpenAI errors."""
        if status.state == "failed":
            raise unavailable(model, status)
        try:
            request = dataclasses.replace(request, trace_context=traceparent())
            return await asyncio.wait_for(self.handle(model).embed.remote(request), self._first_token_timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise model_error(exc, model) from None

    async def open(
        self, model: str, status: ModelStatus, request: GenerationRequest, account: RequestAccount,
        admit: Callable[[], Awaitable[None]],
    ) -> tuple[GenerationChunk, MeteredStream]:
        """Admit the caller (`admit`: the limiter), start the generation and wait for its first chunk, so early
        failures get a proper status. What cannot start soon is refused first, before the limiter's round trip."""
        if status.state == "failed":
            raise unavailable(model, status)
        pressure = self._pressure.setdefault(model, SlotPressure(self._max_queue_wait_s))
        started = time.perf_counter()
        stream: MeteredStream | None = None
        request = dataclasses.replace(request, tenant=account.principal.tenant, weight=account.policy.weight,
                                      trace_context=traceparent())
        try:  # Serve may refuse at `.remote()` already (queue full) or at the first chunk
            with pressure.waiting(account.principal.tenant) as ticket:
                await admit()
                request = dataclasses.replace(request, submitted_at=time.time())
                stream = MeteredStream(self.handle(model).options(stream=True).generate.remote(request), account,
                                       StreamSpans(self._tracer, model), ticket)
                await self._start(stream, status, pressure, account.principal.tenant, ticket.alone)
                first = await asyncio.wait_for(stream.__anext__(), self._first_token_timeout_s)
        except BaseException as exc:
            if stream is not None:
                stream.cancel()
            if isinstance(exc, Overloaded):
                raise overloaded(model, exc.why, exc.retry_after_s) from None
            if isinstance(exc, (asyncio.CancelledError, OpenAIError)):
                raise
            raise model_error(exc, model) from None
        self._metrics.record_first_token(model, time.perf_counter() - started)
        return first, stream

    async def _start(
        self, stream: MeteredStream, status: ModelStatus, pressure: SlotPressure, tenant: str, alone: bool
    ) -> None:
        """Wait for a slot up to `max_queue_wait_s` (then 503: the request leaves the queue, so what is admitted
        starts at once); up to `first_token_timeout_s` while the model scales up from zero, or for a tenant's
        only request in flight (the fair queue admits it first: it waits at most for the next free slot)."""
        deadline = bool(status.running_replicas) and not alone
        try:
            await asyncio.wait_for(stream.started(), self._max_queue_wait_s if deadline else self._first_token_timeout_s)
        except TimeoutError:
            if not deadline:
                raise
            raise Overloaded(f"no slot freed within {self._max_queue_wait_s:g} s", pressure.missed(tenant)) from None
        pressure.started()

    @staticmethod
    async def collect(model: str, first: GenerationChunk, stream: MeteredStream, n: int) -> Choices:
        """Every chunk of a generation gathered into its n choices (a whole, non-streamed response)."""
        choices = Choices(n)
        choices.add(first)
        try:
            while not choices.done:
                choices.add(await stream.__anext__())
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise model_error(exc, model) from None
        finally:
            stream.cancel()
        return choices


def chat_response(rid: str, model: str, choices: Choices, sampling: SamplingParams) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=rid,
        created=now(),
        model=model,
        choices=[
            ChatCompletionChoice(
                index=index, message=AssistantMessage(content=choice.content, tool_calls=choice.calls or None),
                finish_reason=choice.finish_reason,
                logprobs=None if sampling.logprobs is None else chat_logprobs(tuple(choice.logprobs)),
            )
            for index, choice in enumerate(choices.items)
        ],
        usage=choices.usage(),
    )


def completion_response(rid: str, model: str, prefix: str, choices: Choices, sampling: SamplingParams
                        ) -> CompletionResponse:
    return CompletionResponse(
        id=rid,
        created=now(),
        model=model,
        choices=[
            CompletionChoice(
                index=index, text=prefix + choice.text, finish_reason=choice.finish_reason,
                logprobs=None if sampling.logprobs is None else completion_logprobs(tuple(choice.logprobs), 0),
            )
            for index, choice in enumerate(choices.items)
        ],
        usage=choices.usage(),
    )


async def _chunks(
    model: str, first: GenerationChunk, stream: MeteredStream, choices: Choices
) -> AsyncIterator[GenerationChunk]:
    """All chunks of a started generation, added to `choices`; cancels the model side however the client leaves."""
    try:
        choices.add(first)
        yield first
        if not choices.done:
            async for chunk in stream:
                choices.add(chunk)
                yield chunk
                if choices.done:
                    break
    except (StopAsyncIteration, GeneratorExit, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
        raise model_error(exc, model) from None
    finally:
        stream.cancel()


async def chat_events(
    rid: str, model: str, first: GenerationChunk, stream: MeteredStream, include_usage: bool,
    sampling: SamplingParams,
) -> AsyncIterator[str]:
    created = now()

    def frame(index: int, delta: DeltaMessage, finish: str | None = None, chunk: GenerationChunk | None = None
              ) -> ChatCompletionChunk:
        logprobs = chat_logprobs(chunk.logprobs) if chunk and sampling.logprobs is not None else None
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    for index in range(sampling.n):
        yield sse(frame(index, DeltaMessage(role="assistant", content="")))
    choices = Choices(sampling.n)
    try:
        async for chunk in _chunks(model, first, stream, choices):
            if chunk.text or chunk.logprobs or chunk.tool_calls:  # text and call fragments as they come
                content = chunk.text if chunk.text or not chunk.tool_calls else None
                delta = DeltaMessage(content=content, tool_calls=call_deltas(chunk.tool_calls) or None)
                yield sse(frame(chunk.index, delta, chunk=chunk))
            if chunk.finish_reason:
                yield sse(frame(chunk.index, DeltaMessage(), chunk.finish_reason))
        if include_usage:
            yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=choices.usage()))
    except OpenAIError as exc:
        yield sse(exc.body)
    yield "data: [DONE]\n\n"


async def completion_events(
    rid: str,
    model: str,
    prefix: str,
    first: GenerationChunk,
    stream: MeteredStream,
    include_usage: bool,
    sampling: SamplingParams,
) -> AsyncIterator[str]:
    created = now()

    def frame(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> CompletionResponse:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        return CompletionResponse(id=rid, created=created, model=model, choices=[choice])

    if prefix:
        for index in range(sampling.n):
            yield sse(frame(index, prefix))
    choices = Choices(sampling.n)
    try:
        async for chunk in _chunks(model, first, stream, choices):
            if chunk.text or chunk.finish_reason or chunk.logprobs:
                choice = choices.items[chunk.index]
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = completion_logprobs(chunk.logprobs, choice.offset)
                choice.offset += len(chunk.text)
                yield sse(frame(chunk.index, chunk.text, chunk.finish_reason, logprobs))
        if include_usage:
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=choices.usage()))
    except OpenAIError as exc:
        yield sse(exc.body)
    yield "data: [DONE]\n\n"
