"""10x the shipped config's capacity for 60 s: what the admitted and the refused get.

The shipped serve_config.yaml, unedited, brought up by `modelserve up`. Capacity = the running
replicas' slots (engine.parallel). In one run:

- baseline: a full batch with nothing queued (c = slots, 64-token streams), TTFT p50;
- overload: 10 x slots closed-loop clients streaming 64-token completions for 60 s. A refused client
  waits what the refusal says (`retry-after-ms`, else `Retry-After`), as the OpenAI SDK does, then
  sends again.

Reported: admitted TTFT p50/p95 and its ratio to the baseline (target <= 2), completions per
minute, refusals by status and how fast they came, refusals without Retry-After (must be 0),
admitted streams that did not finish (must be 0), replica processes that died (must be 0) and the
peak RSS of the ingress, the model replicas and the proxy.

    flock /tmp/modelserve-e2e.lock python bench/bench_overload.py [--seconds 60] [--factor 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from bench_shipped import modelserve_up, replicas
from harness import PROMPTS, cpu_seconds, percentile, ray_processes, shipped_model

from serve_app.cli import tokens as cli_auth

MAX_TOKENS = 64
RSS_ROLES = ("ingress", "model replica", "proxy")


@dataclass
class Tally:
    ttfts: list[float] = field(default_factory=list)
    completed: int = 0
    unfinished: int = 0  # admitted (200) but the stream ended without a finish_reason
    refusals: Counter = field(default_factory=Counter)
    refusal_latency: list[float] = field(default_factory=list)
    without_retry_after: int = 0


def retry_wait(response: httpx.Response) -> float:
    """What the OpenAI SDK would wait: retry-after-ms, else Retry-After (seconds)."""
    if "retry-after-ms" in response.headers:
        return float(response.headers["retry-after-ms"]) / 1000
    return float(response.headers.get("retry-after", 1))


async def one(client: httpx.AsyncClient, model: str, prompt: str, tally: Tally) -> float:
    """One streamed completion; returns how long the caller should wait before its next request."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            tally.refusals[f"{response.status_code} {response.json()['error']['code']}"] += 1
            tally.refusal_latency.append(time.perf_counter() - sent)
            if "retry-after" not in response.headers:
                tally.without_retry_after += 1
            return retry_wait(response)
        first, finished = None, False
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if first is None and choice.get("text"):
                first = time.perf_counter() - sent
            finished = finished or choice.get("finish_reason") is not None
        if first is not None:
            tally.ttfts.append(first)
        tally.completed += finished
        tally.unfinished += not finished
    return 0.0


async def closed_loop(base: str, token: str, model: str, clients: int, seconds: float | None, rounds: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        end = time.monotonic() + seconds if seconds else None

        async def user(i: int) -> None:
            for n in range(rounds if end is None else 1_000_000):
                if end is not None and time.monotonic() >= end:
                    return
                wait = await one(client, model, PROMPTS[(i + n) % len(PROMPTS)], tally)
                await asyncio.sleep(wait if end is None else min(wait, max(0.0, end - time.monotonic())))

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tally


def watch_rss(model: str, stop: threading.Event, peaks: dict[int, int]) -> None:
    """Peak resident memory (kB) of every ingress, replica and proxy process, sampled each second."""
    while not stop.is_set():
        for pid in (pid for pid, role in ray_processes(model).items() if role in RSS_ROLES):
            try:
                with open(f"/proc/{pid}/status") as status:
                    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
                peaks[pid] = max(peaks.get(pid, 0), rss)
            except (OSError, StopIteration):
                pass
        stop.wait(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()
    model = shipped_model().name
    (_, stop), base = modelserve_up(model)
    token = cli_auth.mint_token(cli_auth.dev_secret(cli_auth.state_dir()), "dev", [], 3600)
    try:
        status = replicas(base, model)
        slots = status["placement"]["slots"] * status["running_replicas"]
        asyncio.run(closed_loop(base, token, model, slots, None, 1))  # warm up
        baseline = asyncio.run(closed_loop(base, token, model, slots, None, 3))
        before = {pid for pid, role in ray_processes(model).items() if role == "model replica"}
        peaks: dict[int, int] = {}
        done = threading.Event()
        watcher = threading.Thread(target=watch_rss, args=(model, done, peaks), daemon=True)
        watcher.start()
        started, cpu_before = time.monotonic(), cpu_seconds(model)
        overload = asyncio.run(closed_loop(base, token, model, slots * args.factor, args.seconds, 0))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(model)
        cpu.subtract(cpu_before)
        done.set()
        watcher.join()
        after = {pid for pid, role in ray_processes(model).items() if role == "model replica"}
        roles = ray_processes(model)
    finally:
        stop()

    base_p50 = percentile(baseline.ttfts, 50)
    p50, p95 = percentile(overload.ttfts, 50), percentile(overload.ttfts, 95)
    print(f"capacity: {slots} slots; overload: {slots * args.factor} clients for {elapsed:.0f} s")
    print(f"baseline (c={slots}, nothing queued): TTFT p50 {base_p50 * 1000:.0f} ms")
    print(f"admitted: TTFT p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms -> {p50 / base_p50:.2f}x the baseline "
          f"(target <= 2)")
    print(f"completed: {overload.completed} ({overload.completed * 60 / elapsed:.0f}/min); "
          f"admitted but unfinished: {overload.unfinished}")
    latency = overload.refusal_latency
    print(f"refused: {dict(overload.refusals)}; refusal latency p50 {percentile(latency, 50) * 1000:.0f} ms, "
          f"p95 {percentile(latency, 95) * 1000:.0f} ms; without Retry-After: {overload.without_retry_after}")
    print(f"model replica processes died: {len(before - after)}")
    print("CPU during the overload (cores busy on average): " + ", ".join(
        f"{role} {seconds / elapsed:.2f}" for role, seconds in cpu.most_common()))
    for pid, kb in sorted(peaks.items()):
        print(f"peak RSS {roles.get(pid, 'exited')} (pid {pid}): {kb / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
