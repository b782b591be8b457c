"""Prefix reuse end to end: tenant-scoped cached tokens in usage, and a conversation's turns kept on one replica.

The tiny model as deployed (prefix_cache: tenant, the default) and, deployed for this module, a copy
with two replicas and `prefix_cache: shared`, routed by `deployments.prefix_router`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.cli.tokens import mint_token
from tests.support.cluster import (
    METRICS_PORT,
    OTHER_TENANT,
    TINY,
    deploy_with,
    model_app,
    model_defaults,
    wait_until,
)

SHARED = "tiny-llama-shared"
PROMPT = "Tell me about the lighthouse keeper and the storm that came in from the north sea that night"


@pytest.fixture(scope="module")
def shared_model(config_path: Path, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("shared-model")
    app = model_app(SHARED, str(tiny_path), model_defaults(config_path),
                    engine={"n_ctx": 512, "n_threads": 1, "prefix_cache": "shared", "parallel": 4},
                    deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}})
    deploy_with(config_path, tmp_path, app)
    try:
        yield SHARED
    finally:
        deploy_with(config_path, tmp_path, None)


@pytest.fixture(scope="module")
def other_client(app_url: str) -> openai.OpenAI:
    token = mint_token(os.environ["MODELSERVE_JWT_SECRET"], OTHER_TENANT, [], 3600)
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=token, max_retries=0, timeout=120)


def cached(client: openai.OpenAI, model: str, prompt: str) -> tuple[int, int]:
    usage = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def test_another_tenants_identical_prompt_reuses_nothing(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    prompt = PROMPT + " (isolated)"
    cached(client, TINY, prompt)
    tokens, reused = cached(client, TINY, prompt)
    assert reused == tokens - 1  # the same tenant: all but the token decoded again for its logits
    assert cached(other_client, TINY, prompt)[1] == 0


def test_a_shared_prefix_cache_serves_every_tenant(
    client: openai.OpenAI, other_client: openai.OpenAI, shared_model: str
) -> None:
    prompt = PROMPT + " (shared)"
    cached(client, shared_model, prompt)
    tokens, reused = cached(other_client, shared_model, prompt)  # routed to the replica that holds it
    assert reused == tokens - 1


def turn(client: openai.OpenAI, model: str, messages: list[dict[str, Any]], question: str) -> tuple[int, int]:
    """One turn of a conversation, re-sending its history: (prompt tokens, cached tokens); the reply joins it."""
    messages.append({"role": "user", "content": question})
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0


def replicas_prompt_tokens(model: str) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for labels, value in re.findall(r"^ray_modelserve_prefix_prompt_tokens_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        replica = re.search(r'replica="([^"]+)"', labels)
        if f'model="{model}"' in labels and replica:
            found[replica.group(1)] = float(value)
    return found


def test_a_conversations_turns_land_on_the_replica_holding_it(client: openai.OpenAI, shared_model: str) -> None:
    topics = ["lighthouses", "volcanoes", "bees", "glaciers"]
    histories = {t: [{"role": "system", "content": f"You are an expert on {t}. " * 4}] for t in topics}
    # Opened one after another, each new conversation goes to the replica sent the fewest prompts: both get some.
    openings = [turn(client, shared_model, histories[t], f"Question 0 about {t}, please answer briefly.") for t in topics]

    def carry_on(topic: str) -> list[tuple[int, int]]:
        return [turn(client, shared_model, histories[topic], f"Question {n} about {topic}, please answer briefly.")
                for n in (1, 2)]

    with concurrent.futures.ThreadPoolExecutor(len(topics)) as pool:  # together: at most 2 apart, affinity holds
        conversations = [[opening, *rest] for opening, rest in zip(openings, pool.map(carry_on, topics))]
    for turns in conversations:
        for (previous, _), (_, reused) in itertools.pairwise(turns):
            assert reused >= previous - 1, conversations  # the whole previous prompt came from that replica's cache
    spread = wait_until(lambda: len(replicas_prompt_tokens(shared_model)) == 2 and replicas_prompt_tokens(shared_model),
                        30, "both replicas' prefix metrics")
    assert all(tokens > 0 for tokens in spread.values())
