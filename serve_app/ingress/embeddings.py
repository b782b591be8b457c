"""`POST /v1/embeddings`: OpenAI's embeddings request and response, and the call to an embedding model.

The route sits behind the same door as chat: AccessMiddleware authenticates, audits and counts it,
the tenant's allowlist decides the model (404 otherwise), and its rate limits take the request's
estimated tokens before it runs and its real prompt tokens after. Each field is honoured or
refused by name (`EMBEDDING_FIELDS`, rendered into the README).
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr, model_validator

from deployments.api import GenerationChunk, GenerationRequest
from deployments.embedding import EmbeddingRequest, EmbeddingResult
from serve_app.ingress.protocol import OpenAIError, OpenAIRequest, refuse_lone_surrogates
from serve_app.ingress.request_fields import FieldRule, unsupported

MAX_INPUTS = 2048  # OpenAI's limit on inputs in one request

TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class EmbeddingsRequest(OpenAIRequest):
    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None

    _unicode = model_validator(mode="before")(refuse_lone_surrogates)

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        """The inputs one by one: a string, strings, one token-id list, or token-id lists."""
        if isinstance(self.input, str):
            return (self.input,)
        if all(isinstance(item, int) for item in self.input):
            return (tuple(self.input),)  # type: ignore[arg-type]
        return tuple(item if isinstance(item, str) else tuple(item) for item in self.input)  # type: ignore[union-attr]


EMBEDDING_FIELDS: dict[str, FieldRule] = {
    "model": FieldRule("an embedding model's id (`engine.embedding: true`); a chat model is a 400 "
                       "`model_not_supported`"),
    "input": FieldRule("a string, a list of strings, a list of token ids, or a list of those (up to 2048); "
                       "each within the model's `n_ctx`"),
    "encoding_format": FieldRule("`float`, `base64` (little-endian float32)"),
    "dimensions": FieldRule("null, or the model's own size", "any other size: the vectors are not truncatable"),
    "user": FieldRule("accepted: written to the audit line (as for chat)"),
}


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


def engine_request(body: EmbeddingsRequest, request_id: str) -> EmbeddingRequest:
    if any(item == "" for item in body.inputs()):
        raise OpenAIError(400, "An input must not be an empty string.", param="input", code="invalid_request")
    return EmbeddingRequest(request_id, body.inputs())


def admission_estimate(request: EmbeddingRequest) -> GenerationRequest:
    """The request as the rate limiter prices one: its text (a token id as four characters), no completion."""
    text = "".join(item if isinstance(item, str) else "    " * len(item) for item in request.inputs)
    return GenerationRequest(request.request_id, prompt=text)


def usage_chunk(result: EmbeddingResult) -> GenerationChunk:
    """The usage the account records (audit line, metrics, token limits)."""
    return GenerationChunk("", result.prompt_tokens, 0, "stop")


def response(body: EmbeddingsRequest, model: str, result: EmbeddingResult) -> EmbeddingsResponse:
    """The vectors as OpenAI returns them; `dimensions` other than the model's own is refused."""
    size = len(result.vectors[0]) // 4
    if body.dimensions is not None and body.dimensions != size:
        raise unsupported("dimensions", f"This model's embeddings have {size} dimensions; they cannot be shortened "
                                        f"to {body.dimensions}.")
    data = [
        EmbeddingData(index=i, embedding=base64.b64encode(raw).decode() if body.encoding_format == "base64"
                      else list(struct.unpack(f"<{size}f", raw)))
        for i, raw in enumerate(result.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingsResponse(model=model, data=data, usage=usage)
