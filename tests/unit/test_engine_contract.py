"""The engine contract: what the ingress relies on from every model deployment's `generate`, one body per backend.

The ingress routes a request to a model deployment and streams `GenerationChunk`s from its
`generate(GenerationRequest)`; usage accounting, tenant token caps (max_tokens), OpenAI finish
reasons and error statuses are all built on what these tests check, so they must hold the same
for every backend. Each backend runs in this process as its Serve replica class: llama_cpp is
`ModelServer` (stream coalescing included) on the tiny random GGUF of tests/support/tiny_gguf.py; vllm is
`VllmModelServer` on the tiny random Hugging Face llama of tests/support/tiny_hf.py, where vLLM imports
and a CUDA GPU is present. Sampling is greedy wherever outputs are compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import pickle
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.api import ContextLengthExceeded, EngineError, GenerationChunk, Started
from deployments.spec import ModelSpec
from tests.support.engine_streams import Completion, drain, make_request
from tests.support.tiny_gguf import write_tiny_llama_gguf

WINDOW = 512  # context tokens of one request, on both backends
STREAM_INTERVAL_MS = 2.0  # short, so even the tiny models' fast streams come in several coalesced chunks
PROMPTS = ("Hello the quick brown fox", "Once upon a time there was a dog", "The house near the big port")
TOO_LONG = "the quick brown fox " * 150  # > WINDOW tokens with either tokenizer
T = TypeVar("T")


@dataclass
class Backend:
    """A started model deployment and the one event loop its engine lives on."""

    server: Any
    loop: asyncio.AbstractEventLoop
    count_prompt_tokens: Callable[[str], int]  # the model's own tokenizer on a completion prompt, BOS included

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        return after_started(self.server.generate(make_request(prompt, **kwargs)))

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self.run(drain(self.stream(prompt, **kwargs), Completion()))


async def after_started(stream: AsyncIterator[Any]) -> AsyncIterator[GenerationChunk]:
    """A replica's chunks, checking that its first item is STARTED (the ingress's queue deadline waits for it)."""
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        assert isinstance(await stream.__anext__(), Started)
        async for chunk in stream:
            yield chunk


async def construct(cls: type[T], *args: Any, **kwargs: Any) -> T:
    """Build a replica class as Serve does: its `__init__` is a coroutine."""
    instance = cls.__new__(cls)
    await instance.__init__(*args, **kwargs)  # type: ignore[misc]
    return instance


async def start_llama_cpp(directory: Path, cleanup: ExitStack) -> tuple[Any, Callable[[str], int]]:
    from llama_cpp import Llama

    from deployments.model_server import ModelServer

    path = write_tiny_llama_gguf(directory / "tiny.gguf", n_ctx_train=WINDOW)
    engine = {"n_ctx": WINDOW, "parallel": 1, "n_threads": 1, "stream_interval_ms": STREAM_INTERVAL_MS}
    spec = {"name": "contract-llama", "source": str(path), "engine": engine}
    server = await construct(ModelServer.func_or_class, spec)
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return server, lambda prompt: len(vocab.tokenize(prompt.encode(), add_bos=True))


def require_vllm_and_gpu() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (the gpu extra: see tests/unit/test_vllm.py)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU; none on this machine")


async def start_vllm(directory: Path, cleanup: ExitStack) -> tuple[Any, Callable[[str], int]]:
    import ray
    from transformers import AutoTokenizer

    from deployments.vllm.server import VllmModelServer, make_llm_config
    from tests.support.tiny_hf import write_tiny_hf_llama

    path = write_tiny_hf_llama(directory / "tiny-hf", max_positions=WINDOW)
    spec = ModelSpec.model_validate({
        "name": "contract-vllm", "backend": "vllm", "source": str(path),
        "engine": {"stream_interval_ms": STREAM_INTERVAL_MS},
        "vllm": {"max_model_len": WINDOW, "gpu_memory_utilization": 0.3, "dtype": "float16"},
    })
    if not ray.is_initialized():  # vLLM puts its GPU worker in a placement group of this local Ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        cleanup.callback(ray.shutdown)
    server = await construct(VllmModelServer, make_llm_config(spec, spec.source), spec=spec.model_dump(mode="json"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return server, lambda prompt: len(tokenizer.encode(prompt))


@pytest.fixture(scope="module", params=["llama_cpp", pytest.param("vllm", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    if request.param == "vllm":
        require_vllm_and_gpu()
    directory = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as env, ExitStack() as cleanup:
        env.setenv("MODELSERVE_CACHE_DIR", str(directory / "weight-cache"))
        loop = asyncio.new_event_loop()
        cleanup.callback(loop.close)
        cleanup.callback(lambda: loop.run_until_complete(loop.shutdown_default_executor()))
        start = start_llama_cpp if request.param == "llama_cpp" else start_vllm
        server, count_prompt_tokens = loop.run_until_complete(start(directory, cleanup))
        backend = Backend(server, loop, count_prompt_tokens)
        yield backend
        loop.run_until_complete(server.__del__())  # what Serve calls at replica shutdown
        with warnings.catch_warnings():  # dropping the replica calls __del__ again: a coroutine nobody awaits
            warnings.filterwarnings("ignore", "coroutine '.*__del__' was never awaited", RuntimeWarning)
            backend.server = server = None
            gc.collect()


def check_stream(done: Completion, max_tokens: int) -> GenerationChunk:
    """What every stream must look like to the ingress; returns its final chunk."""
    assert done.chunks, "a stream must end with a final chunk"
    reasons = [chunk.finish_reason for chunk in done.chunks]
    assert reasons[:-1] == [None] * (len(reasons) - 1), reasons
    assert reasons[-1] in ("stop", "length"), reasons
    assert all(chunk.text for chunk in done.chunks[:-1]), "only the final chunk may be empty"
    assert len({chunk.prompt_tokens for chunk in done.chunks}) == 1 and done.final.prompt_tokens > 0
    counts = [chunk.completion_tokens for chunk in done.chunks]
    assert counts == sorted(counts), counts
    assert counts[-1] <= max_tokens  # what a tenant's max_tokens cap relies on
    if done.final.finish_reason == "length":
        assert counts[-1] == max_tokens
    return done.final


def test_tokens_stream_in_several_chunks_and_only_the_last_one_finishes(backend: Backend) -> None:
    completions = [backend.complete(prompt, max_tokens=128, temperature=0) for prompt in PROMPTS]
    for done in completions:
        check_stream(done, 128)
    longest = max(completions, key=lambda done: done.final.completion_tokens)
    assert longest.final.completion_tokens >= 32, "greedy decoding should not end at once on every prompt"
    assert len(longest.chunks) >= 3, [chunk.text for chunk in longest.chunks]
    assert longest.arrivals[0] < longest.arrivals[-1]


def test_usage_counts_the_real_prompt_and_max_tokens_caps_the_completion(backend: Backend) -> None:
    finishes = []
    for prompt in PROMPTS:
        final = check_stream(backend.complete(prompt, max_tokens=8, temperature=0), 8)
        assert final.prompt_tokens == backend.count_prompt_tokens(prompt)
        finishes.append(final.finish_reason)
    assert "length" in finishes  # the cap was reached, not just respected
    for seed in range(3):  # sampled, too
        check_stream(backend.complete(PROMPTS[0], max_tokens=5, temperature=1.0, seed=seed), 5)
    chat = backend.complete(messages=({"role": "user", "content": PROMPTS[1]},), max_tokens=8, temperature=0)
    assert check_stream(chat, 8).prompt_tokens > backend.count_prompt_tokens(PROMPTS[1])  # plus the template's tags


def test_a_stop_string_ends_the_generation_and_is_never_sent(backend: Backend) -> None:
    prompt, base = max(
        ((prompt, backend.complete(prompt, max_tokens=32, temperature=0)) for prompt in PROMPTS),
        key=lambda pair: len(pair[1].text),
    )
    text = base.text
    # A stop string at its first occurrence, a few characters in.
    firsts = (k for k in range(4, len(text) - 3) if text[k : k + 3].isprintable() and text.find(text[k : k + 3]) == k)
    cut = next(firsts, None)
    assert cut is not None, f"no usable stop string in {text!r}"
    stop = text[cut : cut + 3]
    stopped = backend.complete(prompt, max_tokens=32, temperature=0, stop=(stop, "never-produced"))
    assert check_stream(stopped, 32).finish_reason == "stop"
    assert stopped.text == text[:cut]


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_greedy_decoding_with_a_seed_repeats_for_chat_and_completion(backend: Backend, kind: str) -> None:
    request: dict[str, Any] = {"prompt": PROMPTS[2]} if kind == "prompt" else {
        "messages": ({"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]})
    }
    first = backend.complete(**request, max_tokens=24, temperature=0, seed=7)
    again = backend.complete(**request, max_tokens=24, temperature=0, seed=7)
    check_stream(first, 24)
    assert (again.text, again.final.completion_tokens) == (first.text, first.final.completion_tokens)
    assert first.final.prompt_tokens == again.final.prompt_tokens


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_a_prompt_longer_than_the_context_fails_before_any_chunk(backend: Backend, kind: str) -> None:
    request: dict[str, Any] = {"prompt": TOO_LONG} if kind == "prompt" else {
        "messages": ({"role": "user", "content": TOO_LONG},)
    }
    stream = backend.stream(**request, max_tokens=4)
    with pytest.raises(ContextLengthExceeded) as raised:
        backend.run(stream.__anext__())  # the first item after STARTED is the error
    error = raised.value
    assert (error.code, error.param) == ("context_length_exceeded", kind)
    assert str(WINDOW) in error.message
    copy = pickle.loads(pickle.dumps(error))  # Ray carries it to the ingress
    assert (type(copy), copy.message, copy.param) == (ContextLengthExceeded, error.message, error.param)


def test_requests_the_engine_cannot_serve_raise_engine_errors(backend: Backend) -> None:
    over_the_window = backend.count_prompt_tokens(PROMPTS[0]) + WINDOW  # prompt plus max_tokens > context
    for max_tokens in (over_the_window, 10**6):
        with pytest.raises(EngineError) as raised:
            backend.complete(PROMPTS[0], max_tokens=max_tokens)
        assert isinstance(raised.value, ContextLengthExceeded) and raised.value.param
    # Requests at the edge of what the ingress lets through either stream properly or fail as engine errors.
    edges: list[dict[str, Any]] = [
        {"prompt": ""},
        {"prompt": " \n\t"},
        {"messages": ({"role": "user", "content": ""},)},
        {"messages": ({"role": "assistant", "content": PROMPTS[0]},)},
    ]
    for edge in edges:
        try:
            check_stream(backend.complete(**edge, max_tokens=4), 4)
        except EngineError as error:
            assert error.code and error.message, edge


def test_closing_a_stream_midway_frees_its_slot_at_once(backend: Backend) -> None:
    """llama_cpp runs one slot here: the next request can only start once the closed stream let go of it."""
    long_run = {"max_tokens": WINDOW - 32, "temperature": 0}
    started = time.perf_counter()
    full = backend.complete(PROMPTS[0], **long_run)
    full_s = time.perf_counter() - started
    assert full.final.finish_reason == "length", "the long run must not end early for this test to mean anything"

    async def leave_then_ask() -> tuple[Completion, float]:
        stream = backend.stream(PROMPTS[0], **long_run)
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()  # as the ingress does when the client disconnects
        asked = time.perf_counter()
        newcomer = await drain(backend.stream(PROMPTS[1], max_tokens=4, temperature=0), Completion())
        return newcomer, time.perf_counter() - asked

    newcomer, took = backend.run(leave_then_ask())
    check_stream(newcomer, 4)
    assert took < full_s / 3, (took, full_s)
    assert backend.complete(PROMPTS[0], **long_run).text == full.text  # the slot is clean for a full run again
