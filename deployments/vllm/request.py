"""What a vLLM model gets and gives back, without importing vLLM: the OpenAI request body for Ray Serve LLM's
`LLMServer`, and its stream of OpenAI SSE lines (or error objects) turned into `GenerationChunk`s.

vLLM implements the generation fields itself (`response_format` through its structured-output backend,
`logprobs`/`top_logprobs`, `n`, `logit_bias`, `seed`, and `tools`/`tool_choice`/`parallel_tool_calls`
with the model's tool parser); they pass through unchanged, and its tool call deltas come back as
`ToolCallFragment`s. Kept apart from
`deployments.vllm.server` so tests without the gpu extra can check both directions.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from deployments.api import (
    ContextLengthExceeded,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidGenerationRequest,
    TokenLogprob,
    ToolCallFragment,
    UnsupportedGenerationRequest,
)
from deployments.tool_use import ToolUse

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}  # running token counts on every chunk
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_CONTEXT_PARAMS = ("input_tokens", "input_text")  # what vLLM names when a prompt does not fit max_model_len


def request_fields(model: str, request: GenerationRequest, tool_call_parser: str | None) -> dict[str, Any]:
    """The fields of the chat or completions request LLMServer gets (without the token budget).

    Tools need the model's `tool_call_parser` (vLLM reads calls back with it): without one they are refused.
    """
    sampling = request.sampling
    fields: dict[str, Any] = {
        "model": model,
        "request_id": request.request_id,
        "stream": True,
        "stream_options": STREAM_OPTIONS,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": list(sampling.stop),
        "seed": sampling.seed,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "n": sampling.n,
        "logit_bias": {str(token): bias for token, bias in sampling.logit_bias} or None,
    }
    if request.messages is not None:
        fields["messages"] = [dict(m) for m in request.messages]
        fields["response_format"] = sampling.response_format
        if request.tools is not None:
            if tool_call_parser is None:
                raise UnsupportedGenerationRequest(
                    f"Model '{model}' takes no tools: its entry sets no vllm.tool_call_parser.", param="tools"
                )
            fields.update(tool_fields(request.tools))
        if sampling.logprobs is not None:
            fields.update(logprobs=True, top_logprobs=sampling.logprobs)
    else:
        fields["prompt"] = request.prompt or ""
        fields["logprobs"] = sampling.logprobs
    return fields


def tool_fields(tools: ToolUse) -> dict[str, Any]:
    """The request's tools as vLLM takes them (OpenAI's fields; vLLM's tool parser reads the calls back)."""
    choice: Any = tools.mode
    if tools.mode == "function":
        choice = {"type": "function", "function": {"name": tools.function}}
    return {"tools": [{"type": "function", "function": f} for f in tools.functions], "tool_choice": choice,
            "parallel_tool_calls": tools.parallel}


def _chat_logprobs(logprobs: dict[str, Any] | None) -> list[TokenLogprob]:
    def token_bytes(entry: dict[str, Any]) -> bytes:
        return bytes(entry["bytes"]) if entry.get("bytes") is not None else entry["token"].encode()

    return [
        TokenLogprob(token_bytes(entry), entry["logprob"],
                     tuple((token_bytes(top), top["logprob"]) for top in entry.get("top_logprobs") or ()))
        for entry in (logprobs or {}).get("content") or ()
    ]


def _completion_logprobs(logprobs: dict[str, Any] | None) -> list[TokenLogprob]:
    if not logprobs:
        return []
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return [
        TokenLogprob(token.encode(), logprob, tuple((t.encode(), lp) for t, lp in (top or {}).items()))
        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)
    ]


@dataclass
class _Output:
    """What one choice produced within a stretch of the stream."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: list[ToolCallFragment] = field(default_factory=list)

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        self.texts.append(choice.get("text") or delta.get("content") or "")
        self.logprobs += (_chat_logprobs(choice.get("logprobs")) if "delta" in choice
                          else _completion_logprobs(choice.get("logprobs")))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            self.calls.append(ToolCallFragment(call["index"], function.get("arguments") or "", call.get("id"),
                                               function.get("name")))

    def __bool__(self) -> bool:
        return any(self.texts) or bool(self.logprobs or self.calls)

    def chunk(self, index: int, prompt: int, completion: int, finish: FinishReason | None) -> GenerationChunk:
        return GenerationChunk("".join(self.texts), prompt, completion, finish, tuple(self.logprobs), index,
                               tuple(self.calls))


async def openai_stream_chunks(stream: AsyncIterator[Any], param: str) -> AsyncIterator[GenerationChunk]:
    """Turn LLMServer's stream (batches of OpenAI SSE lines, or an error object) into `GenerationChunk`s.

    Each batch becomes one chunk per choice that got text or tool call fragments; a choice's finishing
    chunk waits for the end of the stream so it carries the final token counts (the total over all choices).
    """
    prompt_tokens = completion_tokens = 0
    finish: dict[int, str] = {}
    last: dict[int, _Output] = {}  # output arriving with (or after) a finish reason
    async for batch in stream:
        parts: dict[int, _Output] = {}
        for event in _events(batch):
            if "error" in event:
                raise engine_error(event["error"], param)
            usage = event.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            completion_tokens = max(completion_tokens, usage.get("completion_tokens", completion_tokens))
            for choice in event.get("choices") or []:
                index = choice.get("index", 0)
                (last if index in finish else parts).setdefault(index, _Output()).add(choice)
                if choice.get("finish_reason"):
                    finish[index] = choice["finish_reason"]
                    earlier, later = parts.pop(index, _Output()), last.get(index, _Output())
                    last[index] = _Output(earlier.texts + later.texts, earlier.logprobs + later.logprobs,
                                          earlier.calls + later.calls)
        for index, output in sorted(parts.items()):
            if output:
                yield output.chunk(index, prompt_tokens, completion_tokens, None)
    if not finish or any(reason not in _FINISH for reason in finish.values()):
        reasons = ", ".join(repr(reason) for reason in finish.values()) or "None"
        raise EngineUnavailable(f"vLLM ended the generation without finishing it (finish_reason {reasons})")
    for index, reason in sorted(finish.items()):
        yield last[index].chunk(index, prompt_tokens, completion_tokens, _FINISH[reason])


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")  # the only line ends of server-sent events


def _events(batch: Any) -> Iterator[dict[str, Any]]:
    """The JSON payloads in one LLMServer stream item: SSE strings, or an ErrorResponse model."""
    for item in batch if isinstance(batch, list) else [batch]:
        if not isinstance(item, str):
            yield item.model_dump()
            continue
        for line in _SSE_LINE_END.split(item):  # not splitlines(): a token may hold U+2028, U+2029 or U+0085
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


def engine_error(error: dict[str, Any], param: str) -> EngineError:
    """vLLM's OpenAI error object as the engine error the ingress maps to a status."""
    message = str(error.get("message") or "vLLM rejected the request")
    status = int(error.get("code") or 500)
    if error.get("param") in _CONTEXT_PARAMS or "maximum context length" in message:
        return ContextLengthExceeded(message, param=param)
    if 400 <= status < 500:
        return InvalidGenerationRequest(message, param=error.get("param"))
    return EngineUnavailable(f"vLLM failed the request: {message}")
