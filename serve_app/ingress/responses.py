"""OpenAI API wire models of what the server answers: responses, stream chunks, model cards.

Empty fields the schema wants omitted are marked `exclude_if`, so every answer matches OpenAI's
published schema (tests/support/openai_schema.py checks them). Errors are `protocol.OpenAIError`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


def _omitted(value: Any) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV the model reused from its prefix cache (not prefilled)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's format)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None  # required (nullable) by the schema


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None  # required (nullable) by the schema; this server never refuses in-band
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_omitted)


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    """`system_fingerprint` is left out: the schema types it as a string, and there is none to give."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_omitted)
    arguments: str | None = Field(None, exclude_if=_omitted)


class ToolCallDelta(BaseModel):
    """A tool call's part in a stream: index, id, type and name first, then fragments of the arguments."""

    index: int
    id: str | None = Field(None, exclude_if=_omitted)
    type: Literal["function"] | None = Field(None, exclude_if=_omitted)
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    """The schema allows no null `role`: it is sent on the first chunk only."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_omitted)
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_omitted)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None  # required (nullable): null until the last chunk
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omitted)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None  # null until the last stream chunk, as OpenAI sends it
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """Both the full response and a stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_omitted)


class ModelStatus(BaseModel):
    """modelserve extension: where a model is in its lifecycle (clients that do not know it ignore it)."""

    state: Literal["ready", "scaling", "at_zero", "starting", "failed", "unknown"]
    running_replicas: int = 0
    starting_replicas: int = 0
    message: str = ""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    status: ModelStatus | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
