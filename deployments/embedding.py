"""Embeddings, engine-neutral: what the ingress asks a model deployment for and what comes back.

A model entry is either a chat/completions model or an embedding model (`engine.embedding: true`);
each refuses the other kind of request with `WrongModelKind` (400, `param: model`), so a client
learns at once that it sent the request to the wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.api import EngineError


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs to embed together: texts, or token-id sequences (OpenAI's token-array inputs)."""

    request_id: str
    inputs: tuple[str | tuple[int, ...], ...]
    trace_context: str | None = None  # as GenerationRequest's: the caller's span as a W3C traceparent


@dataclass(frozen=True)
class EmbeddingResult:
    """One unit-length float32 vector per input (as little-endian bytes: cheap across Ray), in input order."""

    vectors: tuple[bytes, ...]
    prompt_tokens: int


class WrongModelKind(EngineError):
    """A chat request to an embedding model, or an embedding request to a chat model."""

    code = "model_not_supported"
