"""Multi-turn chat at CPU speed (issue 19): prefix KV reuse and prefix-aware routing.

8 concurrent conversations x 6 turns (2 tenants, 4 conversations each), a ~800-token system prompt
shared within a tenant plus each conversation's own history, 32 tokens per answer, greedy, one replica
with the shipped config's engine settings (`serve_config.yaml`: slots, context, threads, chunked prefill,
host cache). In one run:

1. the modelserve engine with prefix reuse vs without: TTFT p50/p95 per turn and total time
   (target: turn >= 3 TTFT p50 at least 3x lower with reuse);
2. `llama-server -np 8` (its default cache_prompt) on the same user turns (target >= 1.0x on total
   time and TTFT p50); skipped without --llama-server;
3. two Serve replicas (1 thread each): prefix hit rate with the prefix-affinity router vs Serve's
   default router, as a share of the best possible reuse (one replica holding everything);
4. more conversations than slots (the engine with half as many slots as conversations): prefix hit
   rate and TTFT with the host-RAM prompt cache (engine.prompt_cache_ram_mib) vs without it.

Run under the e2e lock on a quiet machine: `flock /tmp/modelserve-e2e.lock python bench/bench_multiturn.py
--llama-server PATH`; `--quick` (2 conversations x 2 turns, 8 tokens) only checks that it works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from harness import demo_model, free_port, repack_args, shipped_model, start_server

from deployments.api import GenerationChunk, GenerationRequest, SamplingParams
from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.spec import ModelSpec

TOPICS = ["lighthouses", "volcanoes", "honey bees", "glaciers", "the printing press", "chess", "tides", "bridges"]
FACT = "Answer carefully, cite the rule you apply, keep a friendly tone and never invent facts about {}. "


@dataclass
class Turn:
    ttft_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Run:
    name: str
    wall_s: float = 0.0
    turns: list[list[Turn]] = field(default_factory=list)  # per conversation

    def ttft_ms(self, turn: int, q: float) -> float:
        values = sorted(c[turn].ttft_s * 1000 for c in self.turns)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if q != 0.5 else statistics.median(values)

    def report(self) -> None:
        per_turn = "  ".join(f"t{t + 1} {self.ttft_ms(t, 0.5):.0f}/{self.ttft_ms(t, 0.95):.0f}"
                             for t in range(len(self.turns[0])))
        print(f"{self.name:>22}: total {self.wall_s:6.1f} s  TTFT p50/p95 ms {per_turn}", flush=True)


Ask = Callable[[str, list[dict[str, str]], int], Awaitable[tuple[str, Turn]]]  # tenant, messages, max_tokens


def system_prompt(tenant: str, words: int) -> str:
    rules = " ".join(FACT.format(topic) for topic in TOPICS)
    text = f"You are the assistant of {tenant}. " + rules
    while len(text.split()) < words:
        text += " " + rules
    return " ".join(text.split()[:words])


async def conversation(ask: Ask, tenant: str, system: str, topic: str, turns: int, max_tokens: int) -> list[Turn]:
    messages, out = [{"role": "system", "content": system}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1} about {topic}: tell me one more thing."})
        text, measured = await ask(tenant, list(messages), max_tokens)
        messages.append({"role": "assistant", "content": text})
        out.append(measured)
    return out


async def run(name: str, ask: Ask, args: argparse.Namespace) -> Run:
    tenants = ["tenant-a", "tenant-b"]
    systems = {t: system_prompt(t, args.system_words) for t in tenants}
    started = time.perf_counter()
    turns = await asyncio.gather(*(
        conversation(ask, tenants[i % 2], systems[tenants[i % 2]], TOPICS[i % len(TOPICS)], args.turns, args.max_tokens)
        for i in range(args.conversations)
    ))
    result = Run(name, time.perf_counter() - started, list(turns))
    result.report()
    return result


def engine_ask(engine: BatchedLlamaEngine) -> Ask:
    async def ask(tenant: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Turn]:
        request = GenerationRequest(f"{tenant}-{time.monotonic_ns()}", SamplingParams(max_tokens=max_tokens, temperature=0),
                                    messages=tuple(messages), tenant=tenant)
        started, parts, turn = time.perf_counter(), [], None
        async for chunk in engine.generate(request):
            if isinstance(chunk, GenerationChunk):  # after the scheduler's STARTED item
                turn = turn or Turn(time.perf_counter() - started, chunk.prompt_tokens, chunk.cached_tokens)
                parts.append(chunk.text)
        assert turn is not None
        return "".join(parts), turn

    return ask


def shipped_engine() -> dict[str, Any]:
    """The engine settings of the shipped config's first model, as its replicas get them."""
    return shipped_model().engine.model_dump()


async def engine_run(name: str, model: str, args: argparse.Namespace, **engine: Any) -> Run:
    settings = {**shipped_engine(), "n_threads": args.threads, **engine}
    served = BatchedLlamaEngine(ModelSpec(name="gemma-3-270m", source=model, engine=settings))
    await served.start()
    try:
        return await run(name, engine_ask(served), args)
    finally:
        await served.stop()


def llama_server_ask(base: str) -> Ask:
    client = httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))

    async def ask(tenant: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Turn]:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        started, parts, turn = time.perf_counter(), [], None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:]).get("choices") or []:
                        if text := (choice.get("delta") or {}).get("content"):
                            turn = turn or Turn(time.perf_counter() - started)
                            parts.append(text)
        return "".join(parts), turn or Turn(time.perf_counter() - started)

    return ask


async def routed_hit_rate(model: str, args: argparse.Namespace, prefix_affinity: bool) -> float:
    """Cached / prompt tokens over the conversations on two Serve replicas (1 thread each)."""
    from ray import serve

    from serve_app.app import model_deployment

    spec = ModelSpec(name="gemma-3-270m", source=model, engine={**shipped_engine(), "n_threads": 1},
                     deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
                     routing={"prefix_affinity": prefix_affinity})
    handle = serve.run(model_deployment(spec), name="bench-multiturn", route_prefix=None)

    async def ask(tenant: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Turn]:
        request = GenerationRequest(f"{tenant}-{time.monotonic_ns()}", SamplingParams(max_tokens=max_tokens, temperature=0),
                                    messages=tuple(messages), tenant=tenant)
        started, parts, turn = time.perf_counter(), [], None
        async for chunk in handle.options(stream=True).generate.remote(request):
            if isinstance(chunk, GenerationChunk):  # after the replica's STARTED item
                turn = turn or Turn(time.perf_counter() - started, chunk.prompt_tokens, chunk.cached_tokens)
                parts.append(chunk.text)
        assert turn is not None
        return "".join(parts), turn

    try:
        result = await run("2 replicas, " + ("prefix router" if prefix_affinity else "Serve default"), ask, args)
    finally:
        serve.delete("bench-multiturn")
    turns = [t for c in result.turns for t in c]
    return sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns)


def hit_rate(result: Run) -> float:
    turns = [t for c in result.turns for t in c]
    return sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns)


async def host_cache_arm(model: str, args: argparse.Namespace) -> None:
    """Half as many slots as conversations: the host cache keeps the displaced ones' history warm."""
    slots = max(1, args.conversations // 2)
    warm = await engine_run(f"{slots} slots, host cache", model, args, parallel=slots)
    cold = await engine_run(f"{slots} slots, no host cache", model, args, parallel=slots, prompt_cache_ram_mib=0)
    later = range(1, args.turns)
    print(f"{args.conversations} conversations on {slots} slots: prefix hit rate {hit_rate(warm):.0%} with the host "
          f"cache, {hit_rate(cold):.0%} without; TTFT p50 without/with: " + ", ".join(
              f"t{t + 1} {cold.ttft_ms(t, 0.5) / warm.ttft_ms(t, 0.5):.1f}x" for t in later)
          + f"; total {cold.wall_s / warm.wall_s:.2f}x")


async def main_async(args: argparse.Namespace) -> None:
    model, _ = demo_model()
    reuse = await engine_run("engine, prefix reuse", model, args)
    cold = await engine_run("engine, reuse off", model, args, prefix_reuse=False)
    later = range(min(2, args.turns - 1), args.turns)
    print("turn >= 3 TTFT p50 reuse-off/reuse: " + ", ".join(
        f"t{t + 1} {cold.ttft_ms(t, 0.5) / reuse.ttft_ms(t, 0.5):.1f}x" for t in later) + " (target >= 3x)")
    await host_cache_arm(model, args)
    if args.llama_server:
        port = free_port()
        stop = start_server([args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                             "-c", str(4096 * 8), "-np", "8", "-t", str(args.threads), "-tb", str(args.threads),
                             "--no-webui", "--jinja", *repack_args()], port)
        try:
            server = await run("llama-server -np 8", llama_server_ask(f"http://127.0.0.1:{port}"), args)
        finally:
            stop()
        print(f"llama-server/modelserve total {server.wall_s / reuse.wall_s:.2f}x, TTFT p50 per turn "
              + ", ".join(f"t{t + 1} {server.ttft_ms(t, 0.5) / reuse.ttft_ms(t, 0.5):.2f}x" for t in range(args.turns))
              + " (target >= 1.0)")
    best = hit_rate(reuse)  # one replica holding every conversation
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        routed = await routed_hit_rate(model, args, prefix_affinity=True)
        default = await routed_hit_rate(model, args, prefix_affinity=False)
    finally:
        ray.shutdown()
    print(f"prefix hit rate: one replica {best:.0%}; two replicas: router {routed:.0%} ({routed / best:.0%} of best, "
          f"target >= 90%), Serve default {default:.0%} ({default / best:.0%} of best)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=None, help="path of a llama-server binary (skipped if absent)")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: the shipped config's)")
    parser.add_argument("--quick", action="store_true", help="2 conversations x 2 turns, 8 tokens: checks it works")
    args = parser.parse_args()
    args.threads = args.threads or shipped_engine()["n_threads"]
    args.conversations, args.turns, args.max_tokens, args.system_words = (2, 2, 8, 100) if args.quick else (8, 6, 32, 600)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
