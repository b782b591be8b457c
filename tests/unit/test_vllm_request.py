"""What a vLLM model gets for each generation field, and how its stream comes back (no GPU, no vLLM needed).

vLLM implements response_format, logprobs/top_logprobs, n, logit_bias and seed itself: they must reach its
OpenAI request unchanged, and its choices, indices and logprobs must come back as engine chunks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.api import EngineUnavailable, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob
from deployments.vllm.request import STREAM_OPTIONS, openai_stream_chunks, request_fields

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
SAMPLING = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, stop=("x",), seed=5, n=3, logprobs=4,
                          logit_bias=((7, -100.0), (12, 2.5)), response_format=SCHEMA_FORMAT)


def test_chat_request_carries_every_generation_field() -> None:
    request = GenerationRequest("r1", SAMPLING, messages=({"role": "user", "content": "hi"},))
    assert request_fields("m", request) == {
        "model": "m", "request_id": "r1", "stream": True, "stream_options": STREAM_OPTIONS, "temperature": 0.7,
        "top_p": 0.9, "stop": ["x"], "seed": 5, "presence_penalty": 0.0, "frequency_penalty": 0.0, "n": 3,
        "logit_bias": {"7": -100.0, "12": 2.5}, "messages": [{"role": "user", "content": "hi"}],
        "response_format": SCHEMA_FORMAT, "logprobs": True, "top_logprobs": 4,
    }


def test_completion_request_carries_logprobs_as_a_count() -> None:
    fields = request_fields("m", GenerationRequest("r2", SAMPLING, prompt="p"))
    assert (fields["prompt"], fields["logprobs"], fields["n"], fields["seed"]) == ("p", 4, 3, 5)
    assert "response_format" not in fields and "top_logprobs" not in fields
    plain = request_fields("m", GenerationRequest("r3", SamplingParams(), prompt="p"))
    assert (plain["logprobs"], plain["logit_bias"], plain["n"]) == (None, None, 1)
    chat = request_fields("m", GenerationRequest("r4", SamplingParams(), messages=({"role": "user", "content": "q"},)))
    assert (chat["response_format"], "logprobs" in chat) == (None, False)


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


def test_a_stream_without_every_finish_is_a_failure() -> None:
    with pytest.raises(EngineUnavailable, match="finish_reason 'abort'"):
        run([sse({"choices": [chat_choice(0, "a", "abort")]})])
