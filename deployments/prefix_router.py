"""Prefix-aware routing across a model's replicas: a Ray Serve request router (`RequestRouterConfig`).

Every chat turn re-sends the conversation's history, and the replica that served the previous turn
holds its KV (`deployments.llama_cpp.prefix_cache`); Serve's default power-of-two choice scatters
the turns, so each pays a full prefill. This router remembers, per replica, the prompts it sent
there as chained hashes of fixed-size text blocks (one hash stands for a whole prefix) and, while
load is balanced, ranks first the replica holding the longest prefix of the new prompt, or, for a
prompt no replica holds, the one holding the fewest blocks, so conversations spread their KV over
the replicas (Ray's `PrefixCacheAffinityRouter` does the same); when replicas' ongoing requests
differ by more than `imbalanced_threshold` all replicas share one rank, in random order so ties do
not all go to the first, and Serve takes the least loaded. Prompts are keyed by tenant like the
engine's cache (unless the model shares it), so one tenant's prompts never steer another's.

Ray's own `PrefixCacheAffinityRouter` (ray.serve.llm) does not fit: on the CPU install it does not
import (pyarrow), it reads `messages` only as a list (ours are a tuple: it divides by a zero-length
text), knows no tenants, and blocks the handle's event loop on a detached actor for every request.
Each ingress replica routes with what it sent itself: with several, a conversation keeps its
replica as long as its turns come through the same ingress (the usual case with one).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.api import GenerationRequest
from deployments.settings import RoutingSettings


def prompt_key(request: GenerationRequest, shared: bool) -> str:
    """The text a request's prefix is matched on: its tenant, then its messages or prompt (a turn's key extends
    the previous turn's)."""
    body = request.prompt or "".join(json.dumps(m, sort_keys=True) for m in request.messages or ())
    return ("" if shared else request.tenant) + "\x00" + body


def block_hashes(key: str, block_chars: int) -> list[int]:
    """Chained hashes of the key's whole blocks: the i-th stands for the first i + 1 blocks."""
    hashes, previous = [], 0
    for start in range(0, len(key) - block_chars + 1, block_chars):
        previous = hash((previous, key[start : start + block_chars]))
        hashes.append(previous)
    return hashes


class PrefixAffinityRouter(RequestRouter):
    """While load is balanced, the replica holding a request's longest prefix, else the one holding least; when it
    is not, the least loaded."""

    def initialize_state(
        self, imbalanced_threshold: int = 2, block_chars: int = 64, max_blocks: int = 100_000, shared: bool = False
    ) -> None:
        self._threshold, self._block_chars, self._max_blocks, self._shared = (
            imbalanced_threshold, block_chars, max_blocks, shared,
        )
        self._sent: dict[ReplicaID, OrderedDict[int, None]] = {}  # per replica, least recently sent first

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        request = next((a for a in pending_request.args if isinstance(a, GenerationRequest)), None) if pending_request else None
        return block_hashes(prompt_key(request, self._shared), self._block_chars) if request else []

    def _depth(self, replica_id: ReplicaID, hashes: list[int]) -> int:
        sent = self._sent.get(replica_id, {})
        depth = 0
        while depth < len(hashes) and hashes[depth] in sent:
            depth += 1
        return depth

    def _balanced(self, candidates: list[RunningReplica]) -> bool:
        loads = [n for r in candidates if (n := self.replica_queue_len_cache.get(r.replica_id)) is not None]
        return not loads or max(loads) - min(loads) <= self._threshold

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        hashes = self._hashes(pending_request)
        if hashes and len(candidate_replicas) > 1 and self._balanced(candidate_replicas):
            best = max(candidate_replicas, key=lambda r: self._depth(r.replica_id, hashes))
            if not self._depth(best.replica_id, hashes):
                best = min(random.sample(candidate_replicas, len(candidate_replicas)),
                           key=lambda r: len(self._sent.get(r.replica_id, ())))
            return [[best], [r for r in candidate_replicas if r is not best]]
        return [random.sample(candidate_replicas, len(candidate_replicas))]  # Serve takes the least loaded

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        sent = self._sent.setdefault(replica_id, OrderedDict())
        for value in self._hashes(pending_request):
            sent[value] = None
            sent.move_to_end(value)
        while len(sent) > self._max_blocks:
            sent.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for gone in set(self._sent) - set(self.curr_replicas):
            del self._sent[gone]


def request_router_config(routing: RoutingSettings, shared_cache: bool) -> RequestRouterConfig | None:
    """Serve's router option for a llama.cpp model: this router, or None for Serve's default."""
    if not routing.prefix_affinity:
        return None
    return RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"imbalanced_threshold": routing.imbalanced_threshold, "shared": shared_cache},
    )
