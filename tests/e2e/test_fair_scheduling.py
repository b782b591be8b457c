"""Fair scheduling across tenants, and the engine metrics, through the real app.

One tenant floods a model of few slots; another's short requests must wait at most for the next free
slot, never behind the flood's queue (FIFO admission made them wait 591x their solo TTFT). Two tenants
flooding it together get slots in the ratio of their policy weights. Then the engine's gauges and
counters are read from Ray's Prometheus endpoint.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import threading
import time

import httpx
import openai

from serve_app.cli.tokens import mint_token
from tests.support.cluster import METRICS_PORT, TINY, WEIGHTED_TENANTS, wait_until
from tests.support.tiny_gguf import EOS_TOKEN_ID

FLOOD_STREAMS = 16  # tenant A's concurrent streams at any time
FLOOD_QUEUED = 8  # and more submitted at once, waiting behind them
FLOOD_TOKENS = 64
SAMPLES = 7
# The flood never ends early: its streams hold their slots for all 64 tokens.
NO_EOS = {str(EOS_TOKEN_ID): -100}
FLOOD = {"model": TINY, "prompt": "flood", "max_tokens": FLOOD_TOKENS, "logit_bias": NO_EOS, "stream": True}


def tenant_client(app_url: str, tenant: str) -> openai.OpenAI:
    """A client of its own tenant (role admin: every model, and the shipped default policy's unlimited rates)."""
    key = mint_token(os.environ["MODELSERVE_JWT_SECRET"], tenant, ["admin"], 600)
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=key, max_retries=0, timeout=60)


def ttft(client: openai.OpenAI) -> float:
    """Seconds to the first event of a short stream (it goes out with the first generated text).

    A 503 `model_overloaded` from Serve's router (its probes of the busy replica lag) is sent again at once;
    the clock keeps running, so a request that had to wait behind the flood still shows it."""
    asked = time.perf_counter()
    while True:
        try:
            stream = client.completions.create(model=TINY, prompt="hi", max_tokens=4, logit_bias=NO_EOS, stream=True)
            break
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and exc.body["code"] == "model_overloaded", exc
    try:
        next(iter(stream))
        return time.perf_counter() - asked
    finally:
        stream.close()


def flood(client: openai.OpenAI, stop: threading.Event) -> int:
    """One of tenant A's workers: streams back to back until told to stop; returns how many finished.

    Serve's router may refuse one while its probes of the busy replica lag (503 `model_overloaded`): the
    worker sends again, as a client honouring Retry-After would, only sooner."""
    finished = 0
    while not stop.is_set():
        try:
            for _ in client.completions.create(**FLOOD):
                pass
            finished += 1
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and exc.body["code"] == "model_overloaded", exc
            time.sleep(0.05)
    return finished


def flood_finishes(client: openai.OpenAI, stop: threading.Event, request: dict[str, object],
                   finishes: list[float]) -> None:
    """One closed-loop worker: `request` streamed back to back until told to stop, noting when each finished
    (a 503 `model_overloaded` from Serve's lagging probes is sent again, as in `flood`)."""
    while not stop.is_set():
        try:
            for _ in client.completions.create(**request):
                pass
            finishes.append(time.monotonic())
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and exc.body["code"] == "model_overloaded", exc
            time.sleep(0.05)


def scrape(name: str, model: str) -> list[float]:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and f'model="{model}"' in line]


def test_a_flooding_tenant_does_not_queue_another_tenants_chat(app_url: str) -> None:
    flooder, chatter = tenant_client(app_url, "fair-flood"), tenant_client(app_url, "fair-chat")
    ttft(chatter)  # warm the path
    solo = statistics.median(ttft(chatter) for _ in range(SAMPLES))

    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(FLOOD_STREAMS + FLOOD_QUEUED) as pool:
        workers = [pool.submit(flood, flooder, stop) for _ in range(FLOOD_STREAMS + FLOOD_QUEUED)]
        try:
            wait_until(lambda: max(scrape("ray_modelserve_engine_waiting_requests", TINY) or [0]) >= FLOOD_QUEUED,
                       30, "the flood to queue in the replica")
            flooded = [ttft(chatter) for _ in range(SAMPLES)]
            assert not any(worker.done() for worker in workers)  # the flood ran throughout
        finally:
            stop.set()
        assert sum(worker.result() for worker in workers) > 0
    assert statistics.median(flooded) <= 10 * max(solo, 0.05), (solo, flooded)


WEIGHTED_WORKERS = 12  # closed-loop streams per tenant: far more than the 2 slots, so both always have requests
WEIGHTED_TOKENS = 200  # waiting in the replica, however slow the way there is on a busy machine
WEIGHTED_WARMUP = 12  # requests finished before counting: both tenants' queues are full by then
WEIGHTED_SAMPLE = 40  # the requests both tenants finish next, counted by tenant


def test_tenants_flooding_together_get_slots_in_the_ratio_of_their_policy_weights(app_url: str) -> None:
    """The policy's `weight` travels with each request to the replica's fair queue: tenants of weight 3 and 1,
    both always waiting, finish equal requests about 3:1 (FIFO, or weights lost on the way: about 1:1)."""
    (heavy, heavy_weight), (light, light_weight) = WEIGHTED_TENANTS.items()
    assert heavy_weight == 3 * light_weight
    request = {**FLOOD, "max_tokens": WEIGHTED_TOKENS}
    finishes: dict[str, list[float]] = {heavy: [], light: []}

    def finished(since: float) -> list[tuple[float, str]]:
        return sorted((t, tenant) for tenant, times in finishes.items() for t in list(times) if t > since)

    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2 * WEIGHTED_WORKERS) as pool:
        workers = [pool.submit(flood_finishes, tenant_client(app_url, tenant), stop, request, finishes[tenant])
                   for tenant in (heavy, light) for _ in range(WEIGHTED_WORKERS)]
        try:
            wait_until(lambda: len(finished(0)) >= WEIGHTED_WARMUP, 60, f"{WEIGHTED_WARMUP} requests to finish")
            since = time.monotonic()
            wait_until(lambda: len(finished(since)) >= WEIGHTED_SAMPLE, 60, f"{WEIGHTED_SAMPLE} more to finish")
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    sample = finished(since)[:WEIGHTED_SAMPLE]
    done = {tenant: sum(who == tenant for _, who in sample) for tenant in finishes}
    assert 2.0 <= done[heavy] / max(done[light], 1) <= 6.0, done  # expected 30:10; strict priority: 40:0


def test_engine_metrics_are_exported_per_model(app_url: str) -> None:
    client = tenant_client(app_url, "metrics")
    reply = client.completions.create(model=TINY, prompt="count", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens > 0
    wait_until(lambda: sum(scrape("ray_modelserve_engine_generated_tokens_total", TINY)) >= 8, 30, "token counter")
    assert scrape("ray_modelserve_engine_slots_total", TINY) == [2.0]  # the test config's engine.parallel
    assert scrape("ray_modelserve_engine_kv_cells_total", TINY) == [2.0 * 256]  # parallel x n_ctx
    assert sum(scrape("ray_modelserve_engine_prompt_tokens_computed_total", TINY)) > 0
    assert sum(scrape("ray_modelserve_engine_step_seconds_count", TINY)) > 0
    for gauge in ("slots_busy", "waiting_requests", "kv_cells_used", "tokens_per_second"):
        assert scrape(f"ray_modelserve_engine_{gauge}", TINY), gauge
