"""logprobs, logit_bias, seed and n through the unmodified openai SDK, streamed and not.

Every response is also validated against OpenAI's schema by conftest (tests/openai_schema.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest
from llama_cpp import Llama

from deployments.llama_cpp.model import TokenPieces
from tests.support.cluster import GEMMA, TINY, chat_text

COUNT = [{"role": "user", "content": "Count from 1 to 100: 1, 2, 3,"}]
STORY = "Once upon a time in a small mountain village,"


# Requests compared across calls carry a seed: a seeded request is prefilled in full, never from a cached prefix.
def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=12, temperature=0, seed=1,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3
        assert [alt.logprob for alt in entry.top_logprobs] == sorted((alt.logprob for alt in entry.top_logprobs),
                                                                      reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
    assert sum(math.exp(alt.logprob) for alt in content[0].top_logprobs) <= 1.0 + 1e-6

    chunks = list(client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=12, temperature=0, seed=1,
                                                 logprobs=True, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(streamed, content))
    assert all(e.top_logprobs == [] for e in streamed)  # logprobs without top_logprobs: none
    assert chat_text(chunks) == reply.choices[0].message.content


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=GEMMA, prompt=STORY, max_tokens=10, temperature=0, seed=1, logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 10
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(10)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob) and top.get(token) == pytest.approx(logprob)

    chunks = list(client.completions.create(model=GEMMA, prompt=STORY, max_tokens=10, temperature=0, seed=1, logprobs=2,
                                            stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


def test_logprob_limits_are_named(client: openai.OpenAI) -> None:
    for call, param in [
        (lambda: client.chat.completions.create(model=TINY, messages=COUNT, max_tokens=2, logprobs=True,
                                                top_logprobs=21), "top_logprobs"),
        (lambda: client.chat.completions.create(model=TINY, messages=COUNT, max_tokens=2, top_logprobs=2), "top_logprobs"),
        (lambda: client.completions.create(model=TINY, prompt="hi", max_tokens=2, logprobs=6), "logprobs"),
        (lambda: client.completions.create(model=TINY, prompt="hi", max_tokens=2, logprobs=1, echo=True), "logprobs"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == param


def test_logit_bias(client: openai.OpenAI, tiny_path: Path) -> None:
    vocab = Llama(model_path=str(tiny_path), vocab_only=True, verbose=False)
    pieces = TokenPieces(vocab._model.vocab)
    ids = {pieces.piece(token): token for token in range(vocab.n_vocab())}
    forced = client.completions.create(model=TINY, prompt="hello", max_tokens=5, temperature=1.0,
                                       logit_bias={str(ids[b" dog"]): 100})
    assert forced.choices[0].text == " dog" * 5
    plain = client.completions.create(model=TINY, prompt="hello", max_tokens=1, temperature=0, logprobs=0)
    first = ids[plain.choices[0].logprobs.tokens[0].encode()]
    banned = client.completions.create(model=TINY, prompt="hello", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100}, stream=True)
    assert "".join(c.choices[0].text for c in banned if c.choices) != plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=COUNT, max_tokens=2, logit_bias={"99999999": 5})
    assert info.value.body["param"] == "logit_bias"


def test_seed_reproduces_a_sampled_completion_alone(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": GEMMA, "prompt": STORY, "max_tokens": 24, "temperature": 1.0}
    first = client.completions.create(**params, seed=1234).choices[0].text
    assert client.completions.create(**params, seed=1234).choices[0].text == first
    streamed = client.completions.create(**params, seed=1234, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == first
    assert len({client.completions.create(**params, seed=s).choices[0].text for s in (1, 2, 3)}) >= 2


def test_n_choices_share_one_prefill(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=8, temperature=0)
    greedy = client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {greedy.choices[0].message.content}  # copied KV, same logits
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    assert greedy.usage.completion_tokens == 3 * 8 and all(c.finish_reason == "length" for c in greedy.choices)

    sampled = client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "Tell me a story."}],
                                             max_tokens=16, temperature=1.0, n=4, seed=7)
    assert len({c.message.content for c in sampled.choices}) >= 2

    chunks = list(client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=8, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}, logprobs=True))
    for index in (0, 1):
        assert chat_text(chunks, index) == one.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == index
                and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens

    completions = client.completions.create(model=GEMMA, prompt=STORY, max_tokens=6, temperature=0.8, n=2)
    assert [c.index for c in completions.choices] == [0, 1] and completions.usage.completion_tokens == 12


def test_n_beyond_a_replicas_slots_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:  # the test deployment gives Gemma 4 slots
        client.chat.completions.create(model=GEMMA, messages=COUNT, max_tokens=2, n=5)
    assert info.value.body["param"] == "n" and "4" in info.value.body["message"]
