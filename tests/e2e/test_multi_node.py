"""Two Ray nodes on this machine: a private head and a worker joining it, each with its own weight cache.

The tiny model is served from a real S3 server (moto) with four replicas, at most two per node, and an
ingress replica per node; each node runs a proxy (`proxy_location: EveryNode`). Serve's proxies set
SO_REUSEPORT, so two on one host would share the port and be indistinguishable; the worker's proxy gets
a port of its own through RAY_SERVE_WORKER_PROXY_HTTP_PORT (Serve's per-worker-node override), so
each proxy is asked directly. Then the worker node is stopped under load.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.cli.serve_file import application_entries
from serve_app.cli.tokens import mint_token
from tests.support.cluster import wait_until
from tests.support.ray_nodes import PrivateCluster, RayNode, cluster_env, free_ports
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3, subprocess_env
from tests.support.tiny_gguf import write_tiny_llama_gguf

MODEL, SOURCE, APP = "tiny-s3", "s3://models/tiny/tiny.gguf", "ms"
HELD = 8000  # tokens per held stream: seconds of decoding even alone (the tiny model makes ~2000/s at short contexts)
N_CTX = 8192  # each slot's window: a held stream and its prompt fit


class ObjectGets(logging.Handler):
    """The S3 server's request log (moto runs werkzeug): how many times the weights were downloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += f"GET /models/{SOURCE.split('/', 3)[3]} " in record.getMessage()


class TwoNodes:
    """The private cluster, its worker node, the S3 store's GET count and an admin client per proxy."""

    def __init__(
        self,
        cluster: PrivateCluster,
        worker: RayNode,
        caches: dict[str, Path],
        ports: list[int],
        secret: str,
        gets: ObjectGets,
    ) -> None:
        self.cluster, self.worker, self.caches, self.ports, self.gets = cluster, worker, caches, ports, gets
        self.token = mint_token(secret, "ops", ["admin"], 3600)

    def client(self, port: int, timeout_s: float = 60) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=self.token, max_retries=0, timeout=timeout_s
        )


def serve_config(http_port: int, endpoint_url: str) -> dict[str, Any]:
    model = {
        "name": MODEL,
        "source": SOURCE,
        "engine": {"n_ctx": N_CTX, "n_threads": 1, "stream_interval_ms": 20, "parallel": 2,
                   "max_waiting": 0},  # a replica holds only its 2 slots: 8 streams spread over all 4
        "deployment": {"num_replicas": 4, "ray_actor_options": {"num_cpus": 1}},
    }
    # routing to the other node's replicas on 2 busy cores can take longer than the shipped queue deadline
    ingress = {"deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}, "max_queue_wait_s": 30}
    ingress_app, model_app = application_entries([model], {"ingress": ingress}, name=APP)
    # Serve's own per-deployment overrides spread the replicas: one ingress and two model replicas a node.
    ingress_app["deployments"] = [{"name": "ingress", "max_replicas_per_node": 1}]
    model_app["deployments"] = [{"name": f"model-{MODEL}", "max_replicas_per_node": 2}]
    model_app["runtime_env"] = {"env_vars": {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint_url}}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [ingress_app, model_app],
    }


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    root = tmp_path_factory.mktemp("two-nodes")
    secret = secrets.token_urlsafe(32)
    caches = {"head": root / "cache-head", "worker": root / "cache-worker"}
    head_port, worker_port = free_ports(2)
    gets = ObjectGets()
    logging.getLogger("werkzeug").addHandler(gets)
    with MotoS3() as store:
        store.client().create_bucket(Bucket="models")
        tiny = write_tiny_llama_gguf(root / "tiny.gguf", n_ctx_train=N_CTX)
        pushed = subprocess.run(
            [sys.executable, "-m", "serve_app.cli", "push", str(tiny), SOURCE],
            check=False,
            text=True,
            capture_output=True,
            timeout=120,
            env=subprocess_env(store.endpoint_url),
        )
        assert pushed.returncode == 0, pushed.stderr
        env = cluster_env(MODELSERVE_JWT_SECRET=secret)
        cluster = PrivateCluster(root, env | {"MODELSERVE_CACHE_DIR": str(caches["head"])}, num_cpus=3)
        try:
            cluster.wait_ready()
            worker = cluster.add_worker(
                "worker",
                env
                | {"MODELSERVE_CACHE_DIR": str(caches["worker"]), "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)},
                3,
            )
            cluster.wait_ready(nodes=2)
            cluster.deploy(serve_config(head_port, store.endpoint_url))
            cluster.wait_running({APP, MODEL})
            yield TwoNodes(cluster, worker, caches, [head_port, worker_port], secret, gets)
        finally:
            logging.getLogger("werkzeug").removeHandler(gets)
            cluster.stop()
            assert cluster.leftover_pids() == []


def fetches(metrics_url: str) -> dict[str, float]:
    """This node's modelserve_weight_fetches by result (download or hit), from its Prometheus endpoint."""
    counts: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_modelserve_weight_fetches_total{") and f'model="{MODEL}"' in line:
            result = re.search(r'result="(\w+)"', line).group(1)  # type: ignore[union-attr]
            counts[result] = counts.get(result, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_replicas_spread_and_each_node_downloads_once(nodes: TwoNodes) -> None:
    replicas = nodes.cluster.replicas(MODEL, f"model-{MODEL}")
    by_node: dict[str, int] = {}
    for replica in replicas:
        assert replica["state"] == "RUNNING"
        by_node[replica["node_id"]] = by_node.get(replica["node_id"], 0) + 1
    assert sorted(by_node.values()) == [2, 2]
    assert len({r["node_id"] for r in nodes.cluster.replicas(APP, "ingress")}) == 2

    assert nodes.gets.count == 2  # the S3 server served the object twice: once a node
    # Two replicas a node, one download a node: the second replica waited for the first's and reused it.
    for node in (nodes.cluster.head, nodes.worker):
        assert wait_until(
            lambda n=node: fetches(n.metrics_url) == {"download": 1, "hit": 1} or None,
            30,
            f"{node.name}'s fetch metrics",
        ), fetches(node.metrics_url)
    for cache in nodes.caches.values():
        weights = [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".gguf"]
        assert len(weights) == 1, sorted(cache.rglob("*"))  # one complete copy, no temporary left behind


def test_a_proxy_per_node_answers(nodes: TwoNodes) -> None:
    proxies = nodes.cluster.details()["proxies"]
    assert len(proxies) == 2 and {p["status"] for p in proxies.values()} == {"HEALTHY"}
    for port in nodes.ports:
        reply = nodes.client(port).completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4


def held_stream(client: openai.OpenAI, started: threading.Event) -> tuple[str, float]:
    """Stream HELD tokens, setting `started` at the first chunk: ('completed', when) only if the stream ends with a
    finish_reason after every token; (error type, when) if the client was told of an error (an SSE error event, an
    HTTP or connection error)."""
    tokens, finish = 0, None
    try:
        for chunk in client.completions.create(
            model=MODEL,
            prompt="hello there",
            max_tokens=HELD,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            started.set()
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return type(exc).__name__, time.monotonic()
    finally:
        started.set()  # a stream that ended before its first chunk is no longer waited for
    assert finish == "length" and tokens == HELD, f"truncated: {finish=} {tokens=}"
    return "completed", time.monotonic()


def running_nodes(cluster: PrivateCluster) -> set[str]:
    return {r["node_id"] for r in cluster.replicas(MODEL, f"model-{MODEL}") if r["state"] == "RUNNING"}


def test_stopping_a_node_fails_only_its_in_flight_requests(nodes: TwoNodes) -> None:
    client = nodes.client(nodes.ports[0], timeout_s=90)  # the head's proxy, which outlives the worker
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = [threading.Event() for _ in range(8)]
        streams = [pool.submit(held_stream, client, event) for event in started]  # one per replica slot
        deadline = time.monotonic() + 60
        assert all(event.wait(max(0.0, deadline - time.monotonic())) for event in started), "streams not started"
        early = [s.result() for s in streams if s.done()]
        assert not early, f"streams ended before the node stopped: {early}"
        stopped_at = time.monotonic()
        nodes.worker.stop()
        ended = [stream.result(timeout=120) for stream in streams]  # a hang fails here
    outcomes = [outcome for outcome, _ in ended]
    failed = [o for o in outcomes if o != "completed"]
    assert 0 < len(failed) < len(outcomes), outcomes  # the worker's share failed, the head's finished
    errors_in = max(when for outcome, when in ended if outcome != "completed") - stopped_at

    wait_until(lambda: len(nodes.cluster.alive_nodes()) == 1, 60, "the worker node to be dead")
    after = [client.completions.create(model=MODEL, prompt="hi", max_tokens=8, temperature=0) for _ in range(6)]
    assert [r.usage.completion_tokens for r in after] == [8] * 6  # new work runs on the head's replicas
    head_id = nodes.cluster.alive_nodes()[0]["node_id"]
    wait_until(lambda: running_nodes(nodes.cluster) == {head_id}, 60, "Serve to see the worker's replicas gone")
    print(
        f"stop: {len(failed)}/{len(outcomes)} in-flight streams failed ({failed}); the last error "
        f"reached its client {errors_in:.1f}s after the stop"
    )
