"""The prefix router: what it matches requests on (tenant-scoped chained block hashes of the prompt) and how it
ranks replicas, driven through Serve's router interface with stand-in replicas and requests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from deployments.api import GenerationRequest
from deployments.prefix_router import PrefixAffinityRouter, block_hashes, prompt_key

DEPLOYMENT = DeploymentID(name="llm", app_name="llm")

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers in one sentence. " * 3}


def hashes(tenant: str, *messages: dict[str, str], shared: bool = False) -> list[int]:
    return block_hashes(prompt_key(GenerationRequest("r", messages=messages, tenant=tenant), shared), 64)


def test_a_later_turn_extends_the_earlier_turns_hashes() -> None:
    first = hashes("a", SYSTEM, {"role": "user", "content": "hi"})
    later = hashes("a", SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "how are you?"})
    assert len(later) > len(first) > 0
    assert later[: len(first)] == first


def test_tenants_share_no_hashes_unless_the_cache_is_shared() -> None:
    assert not set(hashes("a", SYSTEM)) & set(hashes("b", SYSTEM))
    assert hashes("a", SYSTEM, shared=True) == hashes("b", SYSTEM, shared=True)


def test_a_prompt_shorter_than_a_block_has_no_hashes() -> None:
    assert block_hashes(prompt_key(GenerationRequest("r", prompt="short", tenant="a"), False), 64) == []


def conversation(topic: str, turns: int) -> Any:
    """A stand-in for Serve's pending request: a chat of `turns` user messages about `topic`."""
    messages = [{"role": "system", "content": f"You are an expert on {topic}. " * 4}]
    messages += [{"role": "user", "content": f"Question {n} about {topic}?"} for n in range(turns)]
    return SimpleNamespace(args=[GenerationRequest("r", messages=tuple(messages), tenant="a")])


class Replicas:
    """A router over stand-in replicas whose ongoing requests the test sets, as Serve's queue-length cache holds them."""

    def __init__(self, *names: str) -> None:
        self.router = PrefixAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
        self.router.initialize_state()
        self.replicas = [SimpleNamespace(replica_id=ReplicaID(name, DEPLOYMENT)) for name in names]
        self.loads(*(0 for _ in names))

    def loads(self, *ongoing: int) -> None:
        for replica, n in zip(self.replicas, ongoing):
            self.router.replica_queue_len_cache.update(replica.replica_id, n)

    def ranks(self, request: Any) -> list[list[str]]:
        ranked = asyncio.run(self.router.choose_replicas(self.replicas, request))
        return [[r.replica_id.unique_id for r in rank] for rank in ranked]

    def send(self, request: Any) -> str:
        """Route as Serve does: the first rank's replica (equal loads), then tell the router."""
        first = self.ranks(request)[0][0]
        self.router.on_request_routed(request, ReplicaID(first, DEPLOYMENT), None)
        return first


def test_new_conversations_spread_and_their_later_turns_follow_them() -> None:
    replicas = Replicas("a", "b")
    opened = {topic: replicas.send(conversation(topic, 1)) for topic in ("bees", "lighthouses")}
    assert sorted(opened.values()) == ["a", "b"]  # the second went to the replica sent nothing
    for topic, replica in opened.items():
        held = replicas.ranks(conversation(topic, 2))
        assert held[0] == [replica] and held[1] != [replica]  # the other only if the holder cannot take it


def test_imbalanced_load_puts_every_replica_in_one_rank_in_random_order() -> None:
    replicas = Replicas("a", "b")
    replicas.send(conversation("bees", 1))
    replicas.loads(3, 0)
    orders = {tuple(rank) for _ in range(64) for rank in replicas.ranks(conversation("bees", 2))}
    assert orders == {("a", "b"), ("b", "a")}  # Serve takes the least loaded; ties do not all go to one


def test_a_prompt_shorter_than_a_block_is_left_to_the_least_loaded() -> None:
    replicas = Replicas("a", "b")
    short = SimpleNamespace(args=[GenerationRequest("r", prompt="hi", tenant="a")])
    assert len(replicas.ranks(short)) == 1
