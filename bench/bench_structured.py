"""Structured output throughput: grammar-constrained JSON (a json_schema) vs free text, and vs llama-server.

Three backends, one run, the demo Gemma GGUF, 2 threads, temperature 1.0 (top_p 1; llama-server also with
top_k 0 and min_p 0, so all sample the same distribution), the same chat prompts asking for a JSON list:
- `free`: modelserve's continuous-batching engine in-process, no response_format;
- `json_schema`: the same engine with `response_format: json_schema` (llama.cpp's grammar sampler);
- `llama-server`: llama.cpp's own server (`-np 8 --cont-batching`, built from the llama.cpp source vendored
  in llama-cpp-python) with the same `response_format` on /v1/chat/completions.
The schema asks for at least 30 items, so every backend writes until max_tokens and all compare the same
number of tokens per request (free text runs that long too). Tokens are counted by re-tokenizing the generated
text, the same way for every backend; a constrained output that ends as JSON must validate against the schema.
Last line: json_schema/free (target >= 0.8) and json_schema/llama-server (target >= 1.0) at c=1 and c=8.

    flock /tmp/modelserve-e2e.lock python bench/bench_structured.py --llama-server PATH [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import bench_batching
import httpx
import jsonschema
from harness import Backend, Result, Stream, demo_model, free_port, repack_args, run_load, start_server, summarize

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 30, "maxItems": 40, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "count": {"type": "integer"},
                       "kind": {"enum": ["tool", "food", "place", "idea"]}},
        "required": ["name", "count", "kind"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA, "strict": True}}
SAMPLING = {"temperature": 1.0, "top_p": 1.0}


def ask(prompt: str) -> str:
    return f"List many things that come to mind for: {prompt} Reply as JSON matching {json.dumps(SCHEMA)}"


def engine_backend(model: str, slots: int, threads: int, constrained: bool) -> Backend:
    """The batched engine answering chat requests for JSON, with the schema enforced or not."""
    from deployments.api import GenerationRequest, SamplingParams

    response_format = RESPONSE_FORMAT if constrained else None

    def chat(prompt: str, max_tokens: int) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=max_tokens, response_format=response_format, **SAMPLING)
        return GenerationRequest("bench", sampling, messages=({"role": "user", "content": ask(prompt)},))

    engine = {"n_ctx": 1024, "n_threads": threads, "parallel": slots, "chat_format": "gemma"}
    return bench_batching.engine_backend(model, engine, chat)


def llama_server_backend(binary: str, model: str, slots: int, threads: int) -> Backend:
    port = free_port()
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(1024 * slots), "-np", str(slots),
           "--cont-batching", "-t", str(threads), "-tb", str(threads), "--no-webui", *repack_args()]
    stop = start_server(cmd, port)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                          limits=httpx.Limits(max_keepalive_connections=0))

    def stream(prompt: str, max_tokens: int) -> Iterator[str]:
        body = {"messages": [{"role": "user", "content": ask(prompt)}], "max_tokens": max_tokens, "stream": True,
                "response_format": RESPONSE_FORMAT, "cache_prompt": False, "top_k": 0, "min_p": 0.0, **SAMPLING}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choices = json.loads(line[6:]).get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        yield choices[0]["delta"]["content"]

    return stream, stop


def checked(stream: Stream, invalid: list[str]) -> Stream:
    """The stream, recording outputs that finished as JSON but break the schema (or do not parse)."""

    def wrapped(prompt: str, max_tokens: int) -> Iterator[str]:
        pieces = []
        for piece in stream(prompt, max_tokens):
            pieces.append(piece)
            yield piece
        text = "".join(pieces)
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            if text.rstrip().endswith("}"):  # cut by max_tokens otherwise: a prefix of valid JSON
                invalid.append(text)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default="/work/llamasrc/build/bin/llama-server")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests-c1", type=int, default=3)
    parser.add_argument("--requests-c8", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    model, count_tokens = demo_model()
    results: dict[tuple[str, int], Result] = {}
    invalid: list[str] = []
    backends = {
        "free": lambda: engine_backend(model, 8, args.threads, constrained=False),
        "json_schema": lambda: engine_backend(model, 8, args.threads, constrained=True),
        "llama-server": lambda: llama_server_backend(args.llama_server, model, 8, args.threads),
    }
    for name, start in backends.items():
        stream, stop = start()
        if name != "free":
            stream = checked(stream, invalid)
        try:
            run_load(stream, 1, 1, 16)  # warm-up
            for concurrency, requests in ((1, args.requests_c1), (8, args.requests_c8)):
                wall, samples = run_load(stream, concurrency, requests, args.max_tokens)
                results[(name, concurrency)] = result = summarize(name, concurrency, wall, samples, count_tokens)
                print(result.line(), flush=True)
        finally:
            stop()
    print(f"outputs that finished but break the schema: {len(invalid)}", *invalid[:3], sep="\n")
    ratios = []
    for concurrency in (1, 8):
        ours = results[("json_schema", concurrency)].tokens_per_s
        ratios.append(f"c={concurrency} json_schema/free {ours / results[('free', concurrency)].tokens_per_s:.2f} "
                      f"(target >= 0.8), json_schema/llama-server "
                      f"{ours / results[('llama-server', concurrency)].tokens_per_s:.2f} (target >= 1.0)")
    print("; ".join(ratios), f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
