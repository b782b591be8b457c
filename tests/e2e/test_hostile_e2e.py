"""Hostile input and a cancel storm against the real app on real Serve, bounded in count and time.

The schema fuzz is the in-process one (tests/unit/test_fuzz_ingress.py) cut to a few hundred requests
and sent over HTTP to real llama.cpp replicas, with the hostile inputs only a real engine can judge.
The cancel storm opens 200 streams, drops each after its first token, and then asks the replica how
many of its slots are busy (the admin status' placement) and the shared limiter how many concurrency
slots the tenant holds: both must come back to zero.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from serve_app.access.limiter_client import LIMITER_NAMESPACE
from tests.support.cluster import APP_NAME, EMBED, TINY, model_states, wait_until
from tests.support.fuzzing import check_case

EXAMPLES_PER_OPERATION = 25  # with both modes and the model-swapped twins: ~200 requests, ~10 s
STORM = 200
STORM_CONCURRENCY = 4  # within the tiny model's ongoing + queued requests, so no stream is refused
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def app_schema(app_url: str, auth: dict[str, str]) -> Any:
    schema = schemathesis.openapi.from_url(f"{app_url}/openapi.json", headers=auth)
    schema.config.update(base_url=app_url, request_timeout=REQUEST_TIMEOUT_S)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    schema.config.phases.update(phases=["examples", "fuzzing"])  # the coverage phase alone sends thousands
    return schema


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_fuzzed_input_without_a_server_error(case: Any, auth: dict[str, str]) -> None:
    check_case(case, lambda sent: sent.call(headers=auth, timeout=REQUEST_TIMEOUT_S), TINY, EMBED)


# Inputs a stand-in model cannot judge: each must reach the real engine and come back a 400 naming the field.
ENGINE_HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "a prompt over the context": ({"messages": [{"role": "user", "content": "the quick brown fox " * 5000}]},
                                  "messages"),
    "6 MB of prompt (over ingress.limits.max_prompt_chars)": (
        {"messages": [{"role": "user", "content": "the quick brown fox " * 300_000}]}, "messages"),
    "5 MB of tool description (over gRPC's default 4 MiB between replicas)": ({"tools": [{"type": "function",
        "function": {"name": "f", "description": "the quick brown fox " * 250_000}}]}, "messages"),
    "max_tokens over the context": ({"max_tokens": 10_000}, "max_tokens"),
    "a self-referencing JSON schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "loop", "schema": {"$ref": "#"}}}}, "response_format"),
    "a tool schema with a dangling $ref": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}}], "tool_choice": "required"},
        "tools"),
    "a logit_bias token outside the vocabulary": ({"logit_bias": {str(2**40): 5}}, "logit_bias"),
}


@pytest.mark.parametrize("name", ENGINE_HOSTILE)
def test_hostile_input_only_the_engine_can_judge_is_a_400(name: str, app_url: str, auth: dict[str, str]) -> None:
    fields, param = ENGINE_HOSTILE[name]
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
    started = time.monotonic()
    response = httpx.post(f"{app_url}/v1/chat/completions", json=body, headers=auth, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == param and error["code"], error
    assert time.monotonic() - started < 15, "refused, but only after a long computation"


def test_a_normal_chat_works_after_the_fuzzing(app_url: str, auth: dict[str, str]) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    response = httpx.post(f"{app_url}/v1/chat/completions", json=body, headers=auth, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1, response.text


async def open_and_drop(client: httpx.AsyncClient, auth: dict[str, str]) -> bool:
    """Open a stream, read until its first token, hang up (True) unless that token ended it (False).

    A refusal is retried after its Retry-After."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 200}
    while True:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            if response.status_code in (429, 503):
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                if choices and (choices[0]["delta"].get("content") or choices[0]["finish_reason"]):
                    return choices[0]["finish_reason"] is None  # leaving the block hangs up mid-stream
            raise AssertionError("the stream ended without a token")


async def storm(app_url: str, auth: dict[str, str]) -> list[bool]:
    gate = asyncio.Semaphore(STORM_CONCURRENCY)
    limits = httpx.Limits(max_connections=STORM_CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one() -> bool:
            async with gate:
                return await open_and_drop(client, auth)

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(STORM))), 70)


def test_a_cancel_storm_leaves_no_busy_slot_and_no_held_concurrency(
    app_url: str, auth: dict[str, str], admin: httpx.Client
) -> None:
    started = time.monotonic()
    dropped = asyncio.run(storm(app_url, auth))
    assert len(dropped) == STORM and sum(dropped) > STORM * 0.9  # a random-weight model rarely ends at once
    limiter = ray.get_actor(f"modelserve-limits:{APP_NAME}", namespace=LIMITER_NAMESPACE)
    wait_until(lambda: model_states(admin)[TINY]["placement"]["busy_slots"] == 0, 15, "the replica's slots to free")
    wait_until(lambda: ray.get(limiter.held_slots.remote("dev")) == 0, 15, "the tenant's concurrency to free")
    assert time.monotonic() - started < 90
