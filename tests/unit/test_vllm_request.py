"""What a vLLM model gets for each generation field, and how its stream comes back (no GPU, no vLLM needed).

vLLM implements response_format, logprobs/top_logprobs, n, logit_bias, seed and tools (with the model's
tool parser) itself: they must reach its OpenAI request unchanged, and its choices, indices, logprobs and
tool call deltas must come back as engine chunks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.api import (
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    ToolCallFragment,
    UnsupportedGenerationRequest,
)
from deployments.tool_use import ToolUse
from deployments.vllm.request import STREAM_OPTIONS, openai_stream_chunks, request_fields

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
SAMPLING = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, stop=("x",), seed=5, n=3, logprobs=4,
                          logit_bias=((7, -100.0), (12, 2.5)), response_format=SCHEMA_FORMAT)


def test_chat_request_carries_every_generation_field() -> None:
    request = GenerationRequest("r1", SAMPLING, messages=({"role": "user", "content": "hi"},))
    assert request_fields("m", request, None) == {
        "model": "m", "request_id": "r1", "stream": True, "stream_options": STREAM_OPTIONS, "temperature": 0.7,
        "top_p": 0.9, "stop": ["x"], "seed": 5, "presence_penalty": 0.0, "frequency_penalty": 0.0, "n": 3,
        "logit_bias": {"7": -100.0, "12": 2.5}, "messages": [{"role": "user", "content": "hi"}],
        "response_format": SCHEMA_FORMAT, "logprobs": True, "top_logprobs": 4,
    }


def test_completion_request_carries_logprobs_as_a_count() -> None:
    fields = request_fields("m", GenerationRequest("r2", SAMPLING, prompt="p"), None)
    assert (fields["prompt"], fields["logprobs"], fields["n"], fields["seed"]) == ("p", 4, 3, 5)
    assert "response_format" not in fields and "top_logprobs" not in fields
    plain = request_fields("m", GenerationRequest("r3", SamplingParams(), prompt="p"), None)
    assert (plain["logprobs"], plain["logit_bias"], plain["n"]) == (None, None, 1)
    chat = request_fields("m", GenerationRequest("r4", SamplingParams(), messages=({"role": "user", "content": "q"},)),
                          None)
    assert (chat["response_format"], "logprobs" in chat, "tools" in chat) == (None, False, False)


WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CLOCK = {"name": "get_time"}
HISTORY = (
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
)


@pytest.mark.parametrize(
    ("tools", "tool_choice", "parallel"),
    [
        (ToolUse((WEATHER, CLOCK)), "auto", True),
        (ToolUse((WEATHER, CLOCK), "required", parallel=False), "required", False),
        (ToolUse((WEATHER, CLOCK), "function", "get_time", parallel=False),
         {"type": "function", "function": {"name": "get_time"}}, False),
    ],
)
def test_tools_and_their_history_reach_vllm_as_openai_fields(tools: ToolUse, tool_choice: Any, parallel: bool) -> None:
    fields = request_fields("m", GenerationRequest("r5", SamplingParams(), messages=HISTORY, tools=tools), "hermes")
    assert fields["tools"] == [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
    assert (fields["tool_choice"], fields["parallel_tool_calls"]) == (tool_choice, parallel)
    assert fields["messages"] == [dict(m) for m in HISTORY]  # assistant tool_calls and tool results unchanged


def test_tools_are_refused_by_name_without_a_tool_parser() -> None:
    request = GenerationRequest("r6", SamplingParams(), messages=HISTORY, tools=ToolUse((WEATHER,)))
    with pytest.raises(UnsupportedGenerationRequest, match="sets no vllm.tool_call_parser") as refused:
        request_fields("m", request, None)
    assert refused.value.param == "tools"
    assert "tools" not in request_fields("m", GenerationRequest("r7", SamplingParams(), messages=HISTORY), None)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def run(*batches: Any, param: str = "messages") -> list[GenerationChunk]:
    async def stream() -> Any:
        for batch in batches:
            yield batch

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in openai_stream_chunks(stream(), param)]

    return asyncio.run(collect())


def chat_choice(index: int, content: str, finish: str | None = None, token: str = "") -> dict[str, Any]:
    logprobs = {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()),
                             "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": list(token.encode())}]}]}
    return {"index": index, "delta": {"content": content}, "finish_reason": finish,
            "logprobs": logprobs if token else None}


def test_n_chat_choices_with_logprobs_come_back_by_index() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    chunks = run(
        [sse({"choices": [chat_choice(0, "Hi", token="Hi"), chat_choice(1, "Yo", token="Yo")], "usage": usage})],
        [sse({"choices": [chat_choice(0, "!", "stop", token="!")], "usage": usage}),
         sse({"choices": [chat_choice(1, "?", "length", token="?")], "usage": usage}),
         sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}),
         "data: [DONE]\n\n"],
    )
    hi = TokenLogprob(b"Hi", -0.5, ((b"Hi", -0.5),))
    assert chunks[:2] == [GenerationChunk("Hi", 5, 1, None, (hi,), 0),
                          GenerationChunk("Yo", 5, 1, None, (TokenLogprob(b"Yo", -0.5, ((b"Yo", -0.5),)),), 1)]
    assert [(c.index, c.text, c.finish_reason, c.completion_tokens) for c in chunks[2:]] == [
        (0, "!", "stop", 4), (1, "?", "length", 4)]


def test_completion_logprobs_come_back() -> None:
    logprobs = {"tokens": [" a", " b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{" a": -1.0}, {" c": -0.1}],
                "text_offset": [0, 2]}
    chunks = run([sse({"choices": [{"index": 0, "text": " a b", "finish_reason": "length", "logprobs": logprobs}],
                       "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})], param="prompt")
    assert chunks == [GenerationChunk(" a b", 2, 2, "length", (
        TokenLogprob(b" a", -1.0, ((b" a", -1.0),)), TokenLogprob(b" b", -2.0, ((b" c", -0.1),))), 0)]


def test_an_event_whose_text_holds_unicode_line_separators_stays_one_event() -> None:
    text = "a\u2028b\u2029c\x85d"  # raw in vLLM's JSON (pydantic does not escape them); str.splitlines() splits at each
    frame = f"data: {json.dumps({'choices': [chat_choice(0, text, 'stop')]}, ensure_ascii=False)}\r\n\r\n"
    assert [chunk.text for chunk in run([frame])] == [text]


def test_a_stream_without_every_finish_is_a_failure() -> None:
    with pytest.raises(EngineUnavailable, match="finish_reason 'abort'"):
        run([sse({"choices": [chat_choice(0, "a", "abort")]})])


def test_tool_call_deltas_come_back_as_fragments_with_finish_reason_tool_calls() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}, "finish_reason": None}

    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunks = run(
        [sse({"choices": [call(0, id="chatcmpl-tool-1", type="function",
                               function={"name": "get_weather", "arguments": ""})], "usage": usage}),
         sse({"choices": [call(0, function={"arguments": '{"city": '})], "usage": usage})],
        [sse({"choices": [call(0, function={"arguments": '"Paris"}'})], "usage": usage}),
         sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "usage": usage}),
         "data: [DONE]\n\n"],
    )
    assert [(c.text, c.tool_calls, c.finish_reason) for c in chunks] == [
        ("", (ToolCallFragment(0, "", "chatcmpl-tool-1", "get_weather"), ToolCallFragment(0, '{"city": ')), None),
        ("", (ToolCallFragment(0, '"Paris"}'),), "tool_calls"),
    ]
