"""The OpenAI API end to end: the unmodified `openai` client against the app deployed on real Ray."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import httpx
import openai
import pytest

from tests.support.cluster import EMBED, GEMMA, TINY, TINY_ZERO

CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_models_list_and_get(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == sorted([EMBED, GEMMA, TINY, TINY_ZERO])
    assert all(m.object == "model" and m.owned_by for m in models.data)
    assert client.models.retrieve(GEMMA).id == GEMMA
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_chat_non_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=GEMMA, messages=CHAT, max_tokens=24, temperature=0, seed=7)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == GEMMA
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    params = dict(model=GEMMA, messages=CHAT, max_tokens=32, temperature=0, seed=11)
    full = client.chat.completions.create(**params)
    chunks = list(
        client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == full.usage.model_dump()


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=TINY, messages=CHAT, max_tokens=8, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    params = dict(model=GEMMA, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = client.completions.create(**params)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens <= 12
    parts = [c.choices[0].text for c in client.completions.create(**params, stream=True) if c.choices]
    assert "".join(parts) == full.choices[0].text
    echoed = client.completions.create(**params, echo=True)
    assert echoed.choices[0].text == params["prompt"] + full.choices[0].text


def test_stop_sequences(client: openai.OpenAI) -> None:
    params = dict(model=GEMMA, prompt="Count: 1, 2, 3,", max_tokens=24, temperature=0)
    free = client.completions.create(**params).choices[0].text
    stop = free.strip()[4:7]
    assert len(stop) == 3, free
    cut = client.completions.create(**params, stop=[stop, "never-appears"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[: free.index(stop)]
    streamed = client.completions.create(**params, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    params = dict(model=GEMMA, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(**params).choices[0].message.content
    again = client.chat.completions.create(**params).choices[0].message.content
    assert first == again


GEMMA_SLOTS = 4  # engine.parallel of the test config


def test_disconnect_mid_stream_frees_its_slot(app_url: str, auth: dict, client: openai.OpenAI) -> None:
    """Every slot of the one Gemma replica streams a long generation; one client hangs up. The next request
    must get that slot: were the abandoned generation kept, it would queue behind minutes of decoding."""
    body = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
    with contextlib.ExitStack() as streams:
        responses = []
        for _ in range(GEMMA_SLOTS):
            response = streams.enter_context(
                httpx.stream("POST", f"{app_url}/v1/completions", json=body, headers=auth, timeout=60)
            )
            assert response.status_code == 200
            assert next(line for line in response.iter_lines() if line).startswith("data: ")  # decoding: holds a slot
            responses.append(response)
        responses[0].close()
        started = time.monotonic()
        reply = client.completions.create(model=GEMMA, prompt="Hello", max_tokens=4, temperature=0)
        waited = time.monotonic() - started
    assert reply.usage.completion_tokens > 0
    assert waited < 20


def test_concurrent_requests_succeed_or_are_shed_cleanly(app_url: str, auth: dict) -> None:
    body = {"model": TINY, "messages": CHAT, "max_tokens": 16, "temperature": 0}

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{app_url}/v1/chat/completions", json=body, headers=auth, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(16)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2  # at least the replica's slots (engine.parallel) are served
    for shed in (r for r in responses if r.status_code == 503):
        assert shed.headers["retry-after"]
        assert shed.json()["error"]["code"] == "model_overloaded"
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # same greedy answer for everyone: no crossed streams
    after = httpx.post(f"{app_url}/v1/chat/completions", json=body, headers=auth, timeout=60)
    assert after.status_code == 200  # the replica is still up


def test_model_served_from_s3(client: openai.OpenAI, s3_model: str) -> None:
    """The same GGUF pushed to the S3 server and served from s3:// answers exactly like the local copy."""
    params = dict(messages=CHAT, max_tokens=12, temperature=0, seed=3)  # seeded: prefilled in full on both
    from_s3 = client.chat.completions.create(model=s3_model, **params)
    local = client.chat.completions.create(model=TINY, **params)
    assert from_s3.choices[0].message.content == local.choices[0].message.content
    assert from_s3.usage.model_dump() == local.usage.model_dump()
