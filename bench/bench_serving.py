"""Serving benchmark: modelserve over HTTP vs raw llama.cpp in-process vs llama.cpp's servers.

Same GGUF (the demo Gemma 3 270M), same prompts, greedy, same thread count; each backend runs
alone on the machine, in turn:

- raw: `llama_cpp.Llama` in this process, one request at a time (it is not thread-safe);
- llama_cpp.server: `python -m llama_cpp.server` (llama-cpp-python's server, one at a time);
- llama-server: llama.cpp's native server, `-np SLOTS --cont-batching`, from `--llama-server PATH`
  built from the llama.cpp source vendored in the installed llama-cpp-python (skipped when absent);
- modelserve: the full app (auth, ingress, batched llama.cpp replica with SLOTS slots) on a local
  Ray, called over HTTP with a token like any client.

Each backend is warmed up, and servers are left to settle (start-up work such as Serve's
controller finishing a deploy), before it is measured. Prints aggregate decode tokens/s and
time-to-first-token p50/p95 per concurrency (best of `--rounds`, and of `--repeat` runs of the
whole sequence), then the ratios of modelserve to each baseline on the last line. The machine's
speed drifts, so raw c=1 is measured right before modelserve and again right after it: their
mean is the c=1 baseline.

    python bench/bench_serving.py --llama-server PATH   # concurrency 1 4 8 16, then the auth overhead
    python bench/bench_serving.py --quick               # the targets only: c=1 vs raw, c=4 vs llama_cpp.server
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    Backend,
    Result,
    demo_model,
    free_port,
    http_stream,
    llama_cpp_server,
    llama_server,
    repack_enabled,
    run_load,
    summarize,
    wait_http,
)

SETTLE_S = 10.0


def raw_backend(model: str, n_ctx: int, threads: int, repack: bool | None = None) -> Backend:
    """llama_cpp.Llama in this process, owned by one thread that serves requests in turn.

    It is not thread-safe, and calling it from several threads (even one at a time) would make
    each caller an OpenMP master with its own spinning worker team, slowing every backend after it.
    `repack=False` loads it as llama-server's --no-repack does (Llama has no argument for it); unset, as is safe
    on this CPU (`harness.repack_enabled`).
    """
    import llama_cpp.llama_cpp as llama_cpp_lib
    from llama_cpp import Llama

    defaults = llama_cpp_lib.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = repack_enabled(repack)
        return params

    jobs: queue.Queue[tuple[str, int, queue.Queue[str | None]] | None] = queue.Queue()
    ready = threading.Event()

    def owner() -> None:
        llama_cpp_lib.llama_model_default_params = model_params
        try:
            llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        finally:
            llama_cpp_lib.llama_model_default_params = defaults
        ready.set()
        while (job := jobs.get()) is not None:
            prompt, max_tokens, out = job
            try:
                for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
                    if chunk["choices"][0]["text"]:
                        out.put(chunk["choices"][0]["text"])
            finally:
                out.put(None)
        del llm

    thread = threading.Thread(target=owner, name="raw-llama", daemon=True)
    thread.start()
    ready.wait()

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        out: queue.Queue[str | None] = queue.Queue()
        jobs.put((prompt, max_tokens, out))
        while (piece := out.get()) is not None:
            yield piece

    def stop() -> None:
        jobs.put(None)
        thread.join()

    return stream, stop


def modelserve_backend(model: str, n_ctx: int, threads: int, slots: int, engine: dict[str, float]) -> Backend:
    """The full app (ingress + model deployment) on a private local Ray, called over HTTP like any client."""
    import ray
    import yaml
    from ray import serve

    from serve_app.app import run_targets
    from serve_app.cli.serve_file import application_entries, use_serve_process_env
    from serve_app.cli.tokens import mint_token

    port = free_port()
    secret = os.environ.setdefault("MODELSERVE_JWT_SECRET", secrets.token_urlsafe(48))  # inherited by replicas
    use_serve_process_env()  # the Ray settings modelserve ships with
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gemma = {
        "name": "gemma", "source": model,
        "engine": {"n_ctx": n_ctx, "n_threads": threads, "parallel": slots, "chat_format": "gemma", **engine},
        "deployment": {"max_queued_requests": 64},  # Ray CPUs = threads
    }
    ingress = {"ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}}}}
    policy = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    serve.run_many(run_targets(application_entries([gemma], ingress, name="bench", policy=policy)))
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    token = mint_token(secret, "dev", [], 3600)
    return http_stream(base, "gemma", headers={"Authorization": f"Bearer {token}"}), stop


QUICK_BASELINES = {"raw": [1], "llama_cpp.server": [4], "llama-server": [4]}  # what the targets compare


def plan(names: list[str], concurrencies: list[int], quick: bool) -> list[tuple[str, list[int], str]]:
    """The order backends run in: (backend, its concurrencies, a label for its lines).

    The machine's speed drifts by several percent within minutes, so modelserve's c=1 is compared
    with raw c=1 measured right before modelserve starts and again right after it stops (the mean
    of the two is the baseline); the other backends run first. `quick` measures the baselines only
    at the concurrency their target compares.
    """
    def measured(name: str) -> list[int]:
        return [c for c in concurrencies if not quick or c in QUICK_BASELINES.get(name, concurrencies)]

    bracketed = {"raw", "modelserve"} <= set(names) and 1 in measured("raw")
    steps = [(name, measured(name), "") for name in names if name not in ("raw", "modelserve")]
    if "raw" in names:
        steps.append(("raw", [c for c in measured("raw") if c != 1] + [1] if bracketed else measured("raw"), ""))
    if "modelserve" in names:
        steps.append(("modelserve", concurrencies, ""))
    if bracketed:
        steps.append(("raw", [1], "  (after modelserve)"))
    return [step for step in steps if step[1]]


def requests(concurrency: int, quick: bool) -> int:
    """Requests per round: two waves (at least 8) so one slow request moves a round's rate little; quick: one wave."""
    return max(4, concurrency) if quick else max(8, 2 * concurrency)


def mean_result(results: list[Result]) -> Result:
    first = results[0]
    return Result(first.backend, first.concurrency, statistics.mean(r.tokens_per_s for r in results),
                  statistics.mean(r.ttft_p50_ms for r in results), max(r.ttft_p95_ms for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="within a minute: one round at c=1 and 4, baselines only where a target compares")
    parser.add_argument("--llama-server", default=None, help="path of a llama-server binary (skipped if absent)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 4 8 16 (quick: 1 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; the best counts")
    parser.add_argument("--slots", type=int, default=16, help="sequence slots of the batching backends")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context tokens (per slot for batching backends)")
    parser.add_argument("--stream-interval-ms", type=float, default=None,
                        help="modelserve's stream coalescing window (default: the engine's)")
    parser.add_argument("--stream-items-per-s", type=float, default=None,
                        help="modelserve's cap on a replica's stream items per second (default: the engine's)")
    parser.add_argument("--backends", nargs="+", default=None, help="run only these (default: all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole sequence of backends this many times (each alone on the machine)")
    args = parser.parse_args()
    max_tokens, rounds = 64, (1 if args.quick else args.rounds)
    concurrencies = args.concurrency or ([1, 4] if args.quick else [1, 4, 8, 16])

    model, count_tokens = demo_model()
    given = {"stream_interval_ms": args.stream_interval_ms, "stream_items_per_s": args.stream_items_per_s}
    engine_options = {key: value for key, value in given.items() if value is not None}
    backends: dict[str, Callable[[], Backend]] = {
        "raw": lambda: raw_backend(model, args.n_ctx, args.threads),
        "llama_cpp.server": lambda: llama_cpp_server(model, args.n_ctx, args.threads),
        "modelserve": lambda: modelserve_backend(model, args.n_ctx, args.threads, args.slots, engine_options),
    }
    if args.llama_server and Path(args.llama_server).is_file():
        backends["llama-server"] = lambda: llama_server(args.llama_server, model, args.n_ctx, args.slots, args.threads)
    else:
        print("llama-server: skipped (pass --llama-server PATH to a built binary)", flush=True)
    backends = {name: start for name, start in backends.items() if name in (args.backends or backends)}

    runs: dict[tuple[str, int], list[Result]] = {}  # per (backend, concurrency): each run's best round
    steps = plan(list(backends), concurrencies, args.quick)
    for run in range(args.repeat):
        bracket: list[Result] = []  # raw c=1 just before and just after modelserve
        for name, step_concurrencies, label in steps:
            stream, stop = backends[name]()
            try:
                run_load(stream, 1, 2, 8)  # warm-up; servers then finish start-up work (Serve's controller, imports)
                time.sleep(0.0 if name == "raw" else 2.0 if args.quick else SETTLE_S)
                for concurrency in step_concurrencies:
                    load = (stream, concurrency, requests(concurrency, args.quick), max_tokens)
                    results = [summarize(name, concurrency, *run_load(*load), count_tokens) for _ in range(rounds)]
                    kept = max(results, key=lambda result: result.tokens_per_s)
                    if name == "raw" and concurrency == 1 and "modelserve" in backends:
                        bracket.append(kept)
                    else:
                        runs.setdefault((name, concurrency), []).append(kept)
                    print(kept.line() + label + (f"  (run {run + 1})" if args.repeat > 1 else ""), flush=True)
            finally:
                stop()
        if bracket:
            runs.setdefault(("raw", 1), []).append(mean_result(bracket))
            print(runs[("raw", 1)][-1].line() + "  (mean of the two around modelserve: the c=1 baseline)", flush=True)
    best = {key: max(results, key=lambda result: result.tokens_per_s) for key, results in runs.items()}
    if args.repeat > 1 and "modelserve" in backends:  # the machine's speed drifts: compare runs made side by side
        for name in [name for name in backends if name != "modelserve"]:
            for concurrency in [c for c in concurrencies if (name, c) in runs]:
                paired = [ours.tokens_per_s / theirs.tokens_per_s
                          for ours, theirs in zip(runs[("modelserve", concurrency)], runs[(name, concurrency)])]
                print(f"paired runs c={concurrency} modelserve/{name}: " + " ".join(f"{r:.3f}" for r in paired)
                      + f"  (median {statistics.median(paired):.3f})")

    if not args.quick:  # the median latency auth + policy add per request, measured on its own app pair
        overhead = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_auth.py")), "--quick"],
                                  capture_output=True, text=True, check=False)
        print("auth + policy overhead: " + (overhead.stdout.strip().splitlines() or ["(failed)"])[-1])
    print(f"machine: {os.cpu_count()} CPUs, threads={args.threads}, max_tokens={max_tokens}, slots={args.slots}")
    ratios = []
    for concurrency in concurrencies if "modelserve" in backends else []:
        ours = best[("modelserve", concurrency)].tokens_per_s
        parts = [f"modelserve/{name}={ours / best[(name, concurrency)].tokens_per_s:.2f}"
                 for name in backends if name != "modelserve" and (name, concurrency) in best]
        ratios.append(f"c{concurrency}: " + " ".join(parts))
    print("ratios (decode tokens/s): " + "; ".join(ratios))


if __name__ == "__main__":
    main()
