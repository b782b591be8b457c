"""Admission under overload: a request that cannot start within the ingress's `max_queue_wait_s` is refused
with 503 + Retry-After instead of waiting behind a queue, so what is admitted starts at once.

The session's ingress waits long (its tests queue on purpose); a second ingress application with a short
deadline is deployed beside it, in front of the same model applications.
"""

from __future__ import annotations

import concurrent.futures
import copy
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve_app.config import INGRESS_IMPORT_PATH
from tests.support.cluster import GEMMA, TINY_ZERO, deploy_with, model_states, wait_until

DEADLINE_S = 0.4
PREFIX = "/deadline"
SLOTS = 4  # the test config's Gemma: one replica of 4 slots
BURST = 6
# Gemma keeps counting well past 200 tokens: each stream holds its slot for seconds.
HOLD = {"model": GEMMA, "prompt": "Count from 1 to 1000, separated by commas: 1, 2, 3,", "max_tokens": 200,
        "temperature": 0}


@pytest.fixture(scope="module")
def deadline_client(config_path: Path, tmp_path_factory: pytest.TempPathFactory, app_url: str,
                    token: str) -> Iterator[openai.OpenAI]:
    config = yaml.safe_load(config_path.read_text())
    ingress = copy.deepcopy(next(a for a in config["applications"] if a["import_path"] == INGRESS_IMPORT_PATH))
    ingress.update(name="modelserve-deadline", route_prefix=PREFIX)
    ingress["args"]["ingress"]["max_queue_wait_s"] = DEADLINE_S
    workdir = tmp_path_factory.mktemp("deadline")
    deploy_with(config_path, workdir, ingress)
    try:
        yield openai.OpenAI(base_url=f"{app_url}{PREFIX}/v1", api_key=token, max_retries=0, timeout=120)
    finally:
        deploy_with(config_path, workdir, None)


def refusal(client: openai.OpenAI) -> tuple[int, str, str, httpx.Headers]:
    """A short request that is expected to be refused: its status, code, message and headers."""
    try:
        client.completions.create(model=GEMMA, prompt="hi", max_tokens=2)
    except openai.APIStatusError as error:
        return error.status_code, error.body["code"], error.body["message"], error.response.headers
    return 200, "", "admitted", httpx.Headers()


def test_a_request_that_cannot_start_in_time_is_refused_and_the_admitted_run_on(
    deadline_client: openai.OpenAI,
) -> None:
    streams = [deadline_client.completions.create(**HOLD, stream=True) for _ in range(SLOTS)]
    firsts = [next(iter(stream)) for stream in streams]  # every slot holds a generating request

    asked = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        deadline_client.completions.create(model=GEMMA, prompt="hi", max_tokens=2)
    waited = time.monotonic() - asked
    assert refused.value.status_code == 503 and refused.value.body["code"] == "model_overloaded"
    assert f"{DEADLINE_S:g} s" in refused.value.body["message"]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert DEADLINE_S <= waited < DEADLINE_S + 3, waited

    # Now the ingress sheds: beyond the few that may wait, the tenant's requests are refused at once, before the
    # limiter and the replica spend anything on them.
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        burst = list(pool.map(lambda _: refusal(deadline_client), range(BURST)))
    assert all(status == 503 and code == "model_overloaded" for status, code, _, _ in burst), burst
    shed = [message for _, _, message, _ in burst if "requests of this tenant already wait for a slot" in message]
    assert len(shed) >= BURST - 3, burst  # two may wait (the floor of the room), a third may have just left it
    assert all(float(headers["retry-after-ms"]) > 0 and int(headers["retry-after"]) >= 1 for *_, headers in burst)

    for first, stream in zip(firsts, streams):
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length", "the held slots must not free early for this to mean anything"
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest)

    # The refused request left the queue: nothing runs in its place, and the next request starts at once.
    reply = deadline_client.completions.create(model=GEMMA, prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens > 0


def test_a_model_at_zero_replicas_gets_the_time_to_start_one(
    deadline_client: openai.OpenAI, admin: httpx.Client
) -> None:
    wait_until(lambda: model_states(admin)[TINY_ZERO]["state"] == "at_zero", 120, f"{TINY_ZERO} at zero")
    asked = time.monotonic()
    reply = deadline_client.completions.create(model=TINY_ZERO, prompt="hello", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens > 0
    assert time.monotonic() - asked > DEADLINE_S  # a replica had to start: longer than the queue deadline
