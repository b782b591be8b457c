"""OpenAI API wire models of what clients send, and the error every failure answers with.

Kept apart from serving code, as in vLLM's `entrypoints/openai/protocol.py` (the answers are in
`serve_app.ingress.responses`). Unknown
request fields are ignored (clients send vendor extensions); known fields are typed
strictly so a wrong type is a 400, not a silent coercion.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

Number = Annotated[float, Field(strict=True)]
MAX_MESSAGES = 4096  # messages in one chat request: more is no conversation a context window holds


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


def refuse_lone_surrogates(body: Any) -> Any:
    """JSON may escape half a UTF-16 pair (`\\ud800`); such text has no UTF-8 form to tokenize or to echo back."""
    pending = [body]
    while pending:  # a loop, not recursion: the body may be nested as deep as the JSON parser allows
        value = pending.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("the request holds text that is not valid Unicode (a lone surrogate)") from None
        elif isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return body


class StreamOptions(OpenAIRequest):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


class ContentPart(OpenAIRequest):
    """Any content part; only `text` ones are served (serve_app.ingress.request_fields refuses the others by type)."""

    type: StrictStr
    text: StrictStr | None = None


class FunctionCallIn(OpenAIRequest):
    name: StrictStr
    arguments: StrictStr


class MessageToolCall(OpenAIRequest):
    """A call an earlier assistant turn made (the request's history)."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(OpenAIRequest):
    """A message as sent. Fields typed `Any` are checked by value in serve_app.ingress.request_fields."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: Any = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class FunctionDefinition(OpenAIRequest):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None
    strict: StrictBool | None = None


class ToolDefinition(OpenAIRequest):
    """A tool offered to the model; only `function` tools are served (serve_app.ingress.tool_calls refuses others by type)."""

    type: StrictStr
    function: FunctionDefinition | None = None


class SamplingFields(OpenAIRequest):
    """Fields shared by chat and text completions (serve_app.ingress.request_fields says what each gets)."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    logprobs: Any = None
    logit_bias: dict[StrictStr, Number] | None = None
    priority: StrictInt | None = Field(None, ge=-(2**31), le=2**31 - 1)  # an extension (as vLLM's): not OpenAI's

    _unicode = model_validator(mode="before")(refuse_lone_surrogates)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    response_format: Any = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Any = None  # checked by value in serve_app.ingress.tool_calls
    parallel_tool_calls: StrictBool | None = None
    functions: Any = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    store: StrictBool | None = None
    service_tier: Any = None
    safety_identifier: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: dict[StrictStr, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="One prompt: a string or a list of one string."
    )
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status (and optional headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
        self.headers = headers or {}
