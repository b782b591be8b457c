"""Engine-level continuous-batching bench: modelserve's llama.cpp engine vs llama.cpp's own servers.

Same GGUF (the demo Gemma 3 270M), same prompts, greedy, same thread count, `--slots` sequence
slots of `--n-ctx` tokens each; one backend works at a time:

- modelserve: `BatchedLlamaEngine` in this process, called through the engine interface (no HTTP;
  bench/bench_serving.py measures the full ingress).
- serialized: `llama_cpp.Llama` in a child process, one request at a time (what the engine did
  before continuous batching).
- llama_cpp.server: `python -m llama_cpp.server` (llama-cpp-python's server; one request at a time).
- llama-server: llama.cpp's native server, `-np SLOTS --cont-batching`, from `--llama-server PATH`
  (skipped when absent). Prompt caching is off for it, as prefix reuse is off for modelserve.

All backends stay up and take turns (best of `--rounds` alternating rounds, so load from
elsewhere on a shared machine hits one round of each). Prints aggregate decode tokens/s and
time-to-first-token p50/p95 per concurrency, the ratios against each baseline, and how often a
greedy output produced inside a batch equals the same request run alone (llama.cpp's CPU
kernels give slightly batch-size-dependent logits).

    python bench/bench_batching.py --llama-server /path/to/llama-server
    python bench/bench_batching.py --quick          # one short round
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import statistics
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from harness import PROMPTS, Backend, Result, Stream, demo_model, llama_cpp_server, llama_server, run_load, summarize


def _serialized_worker(conn: Connection, model: str, n_ctx: int, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        prompt, max_tokens = job
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["text"]:
                conn.send(chunk["choices"][0]["text"])
        conn.send(None)


def serialized(args: argparse.Namespace) -> Backend:
    """`llama_cpp.Llama`, one request at a time, in its own process.

    Not in this one: two llama.cpp contexts driven from different threads of one process make
    libgomp throttle its spinning (more OpenMP threads than cores) and slow both down.
    """
    spawn = multiprocessing.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    worker = spawn.Process(target=_serialized_worker, args=(child_conn, args.model, args.n_ctx, args.threads))
    worker.start()
    if conn.recv() != "ready":
        raise RuntimeError("serialized worker did not start")
    lock = threading.Lock()  # one request at a time, like the engine before continuous batching

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        with lock:
            conn.send((prompt, max_tokens))
            while (piece := conn.recv()) is not None:
                yield piece

    def stop() -> None:
        conn.send(None)
        worker.join(timeout=30)

    return stream, stop


def modelserve_engine(args: argparse.Namespace) -> Backend:
    return engine_backend(args.model, {
        "n_ctx": args.n_ctx, "n_threads": args.threads, "parallel": args.slots, "chat_format": "gemma",
    })


def greedy_completion(prompt: str, max_tokens: int) -> Any:
    from deployments.api import GenerationRequest, SamplingParams

    return GenerationRequest("bench", SamplingParams(max_tokens=max_tokens, temperature=0), prompt=prompt)


def engine_backend(
    model: str, engine_settings: dict[str, Any], make_request: Callable[[str, int], Any] = greedy_completion
) -> Backend:
    """The batched engine behind a small sync adapter; its event loop runs in a helper thread.

    `make_request(prompt, max_tokens)` builds each engine request (default: a greedy completion).
    """
    from deployments.api import GenerationChunk
    from deployments.llama_cpp.engine import BatchedLlamaEngine
    from deployments.spec import ModelSpec

    spec = ModelSpec(name="bench", source=model, engine=engine_settings)
    engine = BatchedLlamaEngine(spec)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(engine.start(), loop).result()

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        pieces: queue.Queue[str | None] = queue.Queue()
        request = make_request(prompt, max_tokens)

        async def pump() -> None:
            try:
                async for chunk in engine.generate(request):
                    if isinstance(chunk, GenerationChunk):  # not the STARTED marker
                        pieces.put(chunk.text)
            finally:
                pieces.put(None)

        asyncio.run_coroutine_threadsafe(pump(), loop)
        while (piece := pieces.get()) is not None:
            if piece:
                yield piece

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(engine.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    return stream, stop


def agreement(stream: Stream, slots: int, max_tokens: int) -> str:
    """Greedy outputs of `slots` different prompts decoded together vs each alone."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(slots)]
    solo = ["".join(stream(p, max_tokens)) for p in prompts]
    with ThreadPoolExecutor(slots) as pool:
        batched = list(pool.map(lambda p: "".join(stream(p, max_tokens)), prompts))
    same = sum(a == b for a, b in zip(solo, batched))
    prefix = [len(os.path.commonprefix([a, b])) / max(len(a), 1) for a, b in zip(solo, batched)]
    return (f"batch-vs-solo agreement ({slots} prompts, {max_tokens} greedy tokens): {same}/{slots} identical, "
            f"mean common prefix {100 * statistics.mean(prefix):.0f}% of the solo text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=None, help="path of a llama-server binary (skipped if absent)")
    parser.add_argument("--quick", action="store_true", help="one round of 32-token requests")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency; the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--slots", type=int, default=16, help="sequence slots of the batching backends")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context tokens per slot")
    parser.add_argument("--backends", nargs="+",
                        default=["modelserve", "serialized", "llama_cpp.server", "llama-server"])
    args = parser.parse_args()
    max_tokens, rounds = (32, 1) if args.quick else (64, args.rounds)

    args.model, count_tokens = demo_model()
    factories: dict[str, Callable[[], Backend]] = {
        "modelserve": lambda: modelserve_engine(args),
        "serialized": lambda: serialized(args),
        "llama_cpp.server": lambda: llama_cpp_server(args.model, args.n_ctx, args.threads),
        "llama-server": lambda: llama_server(args.llama_server, args.model, args.n_ctx, args.slots, args.threads),
    }
    names = list(args.backends)
    if "llama-server" in names and not (args.llama_server and Path(args.llama_server).is_file()):
        print("llama-server: skipped (pass --llama-server PATH to a built binary)", flush=True)
        names.remove("llama-server")

    # All backends stay up (idle ones cost no CPU) and take turns, round after round, so a burst of
    # load from elsewhere on the machine hits one round of each rather than all of one backend.
    best: dict[tuple[str, int], Result] = {}
    notes: list[str] = []
    with ExitStack() as stack:
        streams: dict[str, Stream] = {}
        for name in names:
            stream, stop = factories[name]()
            stack.callback(stop)
            run_load(stream, 1, 1, 4)  # warm-up
            streams[name] = stream
        for concurrency in args.concurrency:
            for _ in range(rounds):
                for name, stream in streams.items():
                    wall, samples = run_load(stream, concurrency, max(4, 2 * concurrency), max_tokens)
                    result = summarize(name, concurrency, wall, samples, count_tokens)
                    if (name, concurrency) not in best or result.tokens_per_s > best[(name, concurrency)].tokens_per_s:
                        best[(name, concurrency)] = result
            for name in streams:
                r = best[(name, concurrency)]
                print(f"{name:>17} c={concurrency:<3} {r.tokens_per_s:7.1f} tok/s  TTFT p50 {r.ttft_p50_ms:7.1f} ms"
                      f"  p95 {r.ttft_p95_ms:7.1f} ms", flush=True)
        for name in ("modelserve", "llama-server"):
            if name in streams:
                notes.append(f"{name} {agreement(streams[name], min(args.slots, 8), 64)}")

    for concurrency in args.concurrency:
        ours = best.get(("modelserve", concurrency))
        if ours is None:
            continue
        ratios = [f"modelserve/{b}={ours.tokens_per_s / best[(b, concurrency)].tokens_per_s:.2f}"
                  for b in ("serialized", "llama_cpp.server", "llama-server") if (b, concurrency) in best]
        print(f"c={concurrency}: " + "  ".join(ratios))
    for note in notes:
        print(note)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, threads={args.threads}, "
          f"slots={args.slots} x {args.n_ctx} tokens, max_tokens={max_tokens}, best of {rounds} alternating rounds")


if __name__ == "__main__":
    main()
