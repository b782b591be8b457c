"""The engine interface: what a model deployment offers the ingress.

Requests and chunks are plain dataclasses so they cross Ray process boundaries cheaply
and carry nothing of HTTP. Engines raise `EngineError` subclasses; the ingress maps
their `code` to an HTTP status and an OpenAI error object.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from deployments.tool_use import ToolUse

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # what the request asked for (within its tenant's cap)
    max_tokens_cap: int | None = None  # the tenant's cap: bounds the model's default when max_tokens is unset
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # report each token's logprob and this many alternatives; None: none
    n: int = 1  # completions of the one prompt, each a choice with its own index
    response_format: dict[str, Any] | None = None  # OpenAI's json_object / json_schema; None: free text


def default_max_tokens(sampling: SamplingParams, model_default: int | None) -> int | None:
    """The budget of a request that set no max_tokens: the model's default, clamped by the tenant's cap."""
    limits = [limit for limit in (model_default, sampling.max_tokens_cap) if limit is not None]
    return min(limits) if limits else None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: either chat `messages` (OpenAI message dicts, content as text) or a raw `prompt`.

    `tools`: the tools the model may call (chat only); the engine renders them, constrains the output to
    calls when a call is required, and returns the calls it made as chunks' `tool_calls`.
    """

    request_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    tools: ToolUse | None = None
    tenant: str = ""  # who asked (the ingress's authenticated tenant): engines keep tenants' work and caches apart
    submitted_at: float = 0.0  # wall-clock time the caller sent it: the replica measures queue wait from it
    weight: float = 1.0  # the tenant's share of a replica's slots against other waiting tenants (its policy's weight)
    priority: int = 0  # order among the tenant's own waiting requests: lower first (as vLLM's `priority`)
    trace_context: str | None = None  # the caller's span as a W3C traceparent: the replica's spans join its trace


@dataclass(frozen=True)
class Started:
    """A replica's first stream item: it took the request into a free slot, so generation begins now.

    A replica holds more requests than slots and admits the waiting ones by fair share across tenants,
    so engines that queue send it when they admit the request, not when it arrives.

    The ingress bounds the wait for it (`max_queue_wait_s`): a request that cannot start in time is
    refused at once instead of waiting behind a queue, so what is admitted runs at unloaded speed.
    """


STARTED = Started()


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model, and the most likely tokens at its position."""

    token: bytes  # a token may hold part of a UTF-8 character
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class ToolCallFragment:
    """Part of call `index` of a choice, as OpenAI streams it: the first part has the id and name, later
    parts continue the arguments (a JSON object's text; the parts of one call concatenate to it)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class GenerationChunk:
    """Text and tool calls of choice `index` produced since its previous chunk, with running token counts.

    `cached_tokens`: of the prompt tokens, those whose KV came from the replica's prefix cache (no prefill).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token produced since the previous chunk, when asked for
    index: int = 0
    tool_calls: tuple[ToolCallFragment, ...] = ()
    cached_tokens: int = 0

    def merge(self, later: GenerationChunk) -> GenerationChunk:
        return GenerationChunk(
            text=self.text + later.text,
            prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens,
            finish_reason=later.finish_reason,
            logprobs=self.logprobs + later.logprobs,
            index=later.index,
            tool_calls=self.tool_calls + later.tool_calls,
            cached_tokens=later.cached_tokens,
        )


class EngineError(Exception):
    """A request the engine refuses; `code` names the OpenAI error code."""

    code = "engine_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param))


class InvalidGenerationRequest(EngineError):
    code = "invalid_request"


class UnsupportedGenerationRequest(EngineError):
    """Valid, but asks for something this engine cannot do (a role its chat format cannot carry)."""

    code = "unsupported_parameter"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class EngineUnavailable(EngineError):
    code = "model_unavailable"


@dataclass(frozen=True)
class EngineStats:
    """What an engine is doing now (gauges) and has done since it started (running totals), for its metrics."""

    slots_busy: int
    slots_total: int
    waiting: int
    kv_cells_used: int
    kv_cells_total: int
    prompt_tokens_reused: int  # prompt tokens whose KV cells were kept from an earlier request instead of computed
    prompt_tokens_computed: int
    generated_tokens: int
    steps: tuple[tuple[str, float], ...] = ()  # (prefill | decode | mixed, seconds) of each step since the last stats
    prompt_cache_bytes: int = 0  # the host-RAM prompt cache now: state bytes and prompts held
    prompt_cache_entries: int = 0
    prompt_cache_hits: int = 0  # running totals: admissions it restored a prompt for, and cold ones it could not help
    prompt_cache_misses: int = 0


class Engine(abc.ABC):
    """A loaded model that turns requests into streams of chunks."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights; raise on failure so the replica fails its start-up instead of serving."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Started | GenerationChunk]:
        """STARTED once the request has a slot, then chunks; closing the iterator early cancels the generation
        (and a waiting request leaves the queue)."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def placement(self) -> dict[str, Any]:
        """How the loaded engine uses its replica's hardware (slots, threads, buffer choices), for operators."""
        return {}

    def stats(self) -> EngineStats | None:
        """Its metrics' readings (None: an engine without them); the steps are handed over once."""
        return None

    async def embed(self, request: Any) -> Any:
        """Embed `request` (a deployments.embedding.EmbeddingRequest); only embedding models do."""
        from deployments.embedding import WrongModelKind  # it builds on this module's EngineError

        raise WrongModelKind("This model generates text; it serves no embeddings.", param="model")

    async def stop(self) -> None:
        """Release resources (called on replica shutdown)."""
