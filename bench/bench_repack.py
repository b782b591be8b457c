"""What llama.cpp's weight repacking (`engine.repack`) is worth: the engine with repacking on vs off.

The continuous-batching engine with the shipped engine settings (slots, threads from
serve_config.yaml), the demo Gemma, greedy 64-token completions at c=1 and c=8. Each setting
runs in a process of its own (one llama.cpp thread pool per process), alternating for
`--rounds` rounds; the best round of each counts. `on` is refused on a CPU with AMX, where it
crashes (ggml-org/llama.cpp#20824): there only `off` can run.

    python bench/bench_repack.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from typing import Any

from bench_batching import engine_backend
from harness import Result, demo_model, run_load, shipped_model, summarize

from deployments.llama_cpp.model import cpu_has_amx

CONCURRENCIES = (1, 8)
MAX_TOKENS = 64


def _measure(conn: Any, model: str, engine: dict[str, Any]) -> None:
    """In a child process: start the engine with these settings, run each concurrency, send the results back."""
    _, count_tokens = demo_model()
    stream, stop = engine_backend(model, engine)
    run_load(stream, 1, 2, 8)  # warm-up
    label = f"repack {engine['repack']}"
    results = [summarize(label, c, *run_load(stream, c, max(8, 2 * c), MAX_TOKENS), count_tokens)
               for c in CONCURRENCIES]
    stop()
    conn.send(results)


def measure(model: str, engine: dict[str, Any]) -> list[Result]:
    spawn = multiprocessing.get_context("spawn")
    conn, child = spawn.Pipe()
    worker = spawn.Process(target=_measure, args=(child, model, engine))
    worker.start()
    results = conn.recv()
    worker.join(timeout=60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = shipped_model()
    model, _ = demo_model()
    settings = ["off"] if cpu_has_amx() else ["on", "off"]
    engine = {**spec.engine.model_dump(exclude={"repack"}), "n_ctx": 1024}
    best: dict[tuple[str, int], Result] = {}
    for _ in range(args.rounds):
        for setting in settings:
            for result in measure(model, {**engine, "repack": setting}):
                print(result.line(), flush=True)
                key = (setting, result.concurrency)
                if key not in best or result.tokens_per_s > best[key].tokens_per_s:
                    best[key] = result
    print(f"machine: {os.cpu_count()} CPUs, AMX: {'yes' if cpu_has_amx() else 'no'}, threads={spec.engine.n_threads}, "
          f"slots={spec.engine.parallel}, max_tokens={MAX_TOKENS}, best of {args.rounds} rounds")
    if len(settings) == 1:
        print("ratios: none (this CPU has AMX: repacking on crashes, so only off was measured)")
        return
    print("ratios (decode tokens/s, off/on): " + "; ".join(
        f"c{c}: {best[('off', c)].tokens_per_s / best[('on', c)].tokens_per_s:.2f}" for c in CONCURRENCIES))


if __name__ == "__main__":
    main()
