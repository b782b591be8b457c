"""vLLM models serving through the ingress path, with the gpu extra (see tests/test_vllm.py for how to run).

The items Ray's LLMServer streams, built with vLLM's own protocol models, through our translation
into engine chunks and errors; and a vllm model that cannot start (no GPU here) beside a llama.cpp
model that keeps serving. No GPU is available to this project: the vLLM path is exercised up to
engine start, so `generate` against a running vLLM engine is not exercised here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_vllm
from tests.s3_server import MotoS3, free_port
from tests.test_vllm import vllm_model

# The gpu extra, S3 and Ray fixtures of tests/test_vllm.py, shared by name.
gpu_extra, moto, ray_with_gpu, tiny_hf_source = (
    test_vllm.gpu_extra,
    test_vllm.moto,
    test_vllm.ray_with_gpu,
    test_vllm.tiny_hf_source,
)


def _sse(model: Any) -> str:
    return f"data: {model.model_dump_json(exclude_unset=True)}\n\n"


async def _collect(*batches: Any, param: str = "messages") -> list[Any]:
    from deployments.vllm_engine import openai_stream_chunks

    async def stream() -> Any:
        for batch in batches:
            yield batch

    return [chunk async for chunk in openai_stream_chunks(stream(), param)]


@pytest.mark.gpu
def test_vllm_stream_and_error_formats_become_engine_chunks_and_errors(gpu_extra: None) -> None:
    """The items LLMServer streams, built with vLLM's own protocol models, through our translation."""
    import asyncio

    from ray.serve.llm.openai_api_models import ErrorResponse
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice as ChatChoice,
    )
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionStreamResponse as ChatChunk,
    )
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponseStreamChoice as TextChoice,
    )
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionStreamResponse as TextChunk,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    from deployments.engine import ContextLengthExceeded, EngineUnavailable, GenerationChunk, InvalidGenerationRequest

    def usage(completion: int) -> UsageInfo:
        return UsageInfo(prompt_tokens=7, completion_tokens=completion, total_tokens=7 + completion)

    def chat(content: str | None, finish: str | None, completion: int, role: str | None = None) -> str:
        delta = DeltaMessage(role=role, content=content) if role else DeltaMessage(content=content)
        choice = ChatChoice(index=0, delta=delta, finish_reason=finish)
        return _sse(ChatChunk(id="c", model="m", choices=[choice], usage=usage(completion)))

    final_usage = _sse(ChatChunk(id="c", model="m", choices=[], usage=usage(3)))
    chunks = asyncio.run(
        _collect(
            [chat("", None, 0, role="assistant")],
            [chat("Hel", None, 1), chat("lo", None, 2)],
            [chat("!", "stop", 3), final_usage, "data: [DONE]\n\n"],
        )
    )
    assert chunks == [GenerationChunk("Hello", 7, 2), GenerationChunk("!", 7, 3, "stop")]

    def text(value: str, finish: str | None, completion: int) -> str:
        return _sse(
            TextChunk(
                id="t",
                model="m",
                choices=[TextChoice(index=0, text=value, finish_reason=finish)],
                usage=usage(completion),
            )
        )

    chunks = asyncio.run(
        _collect([text(" Paris", None, 1)], [text(" is", "length", 2), "data: [DONE]\n\n"], param="prompt")
    )
    assert chunks == [GenerationChunk(" Paris", 7, 1), GenerationChunk(" is", 7, 2, "length")]

    too_long = VLLMValidationError(
        "This model's maximum context length is 256 tokens. However, you requested 16 output tokens and your "
        "prompt contains 300 input tokens, for a total of 316 tokens.",
        parameter="input_tokens",
        value=300,
    )
    before_stream = ErrorResponse(**create_error_response(too_long).model_dump())  # what LLMServer yields then
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 256 tokens") as info:
        asyncio.run(_collect([before_stream]))
    assert info.value.param == "messages"

    mid_stream = f"data: {json.dumps(create_error_response(ValueError('bad logit_bias')).model_dump())}\n\n"
    with pytest.raises(InvalidGenerationRequest, match="bad logit_bias"):
        asyncio.run(_collect([chat("a", None, 1)], [mid_stream]))
    with pytest.raises(EngineUnavailable, match="finish_reason 'abort'"):
        asyncio.run(_collect([chat("a", "abort", 1)]))


@pytest.mark.gpu
def test_vllm_model_failing_to_start_leaves_llama_cpp_serving(
    ray_with_gpu: Path, moto: MotoS3, tiny_hf_source: str, tmp_path: Path
) -> None:
    """No GPU here: vLLM fails at engine start. Serve marks that deployment DEPLOY_FAILED with our one-line
    reason; the ingress and the llama.cpp model stay up, and the failed replicas released their cache lease."""
    import httpx
    import openai
    from ray import serve
    from tiny_gguf import write_tiny_llama_gguf

    from deployments.weight_cache import WeightCache
    from serve_app.app import run_targets
    from serve_app.serve_config import application_entries

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    models = [
        {
            "name": "tiny",
            "source": str(tiny),
            "engine": {"n_ctx": 256, "n_threads": 1},
            "deployment": {"ray_actor_options": {"num_cpus": 1}},
        },
        vllm_model(
            "tiny-vllm",
            source=tiny_hf_source,
            storage={"endpoint_url": moto.endpoint_url},
            vllm={"max_model_len": 256, "gpu_memory_utilization": 0.5},
            deployment={"ray_actor_options": {"num_cpus": 1}},
        ),
    ]
    ingress = {"ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.25}}, "first_token_timeout_s": 5}}
    applications = application_entries(models, ingress, name="vllm-test", policy={"enabled": False})
    serve.run_many(run_targets(applications), wait_for_applications_running=False)
    deadline, app = time.monotonic() + 480, None
    while time.monotonic() < deadline:
        app = serve.status().applications.get("tiny-vllm")
        if app is not None and app.deployments.get("model-tiny-vllm") and app.status.value == "DEPLOY_FAILED":
            break
        time.sleep(2)
    assert app is not None, "application never appeared"
    assert app.status.value == "DEPLOY_FAILED"
    assert app.deployments["model-tiny-vllm"].status.value == "DEPLOY_FAILED"
    reason = app.deployments["model-tiny-vllm"].message
    assert (
        "EngineUnavailable: model 'tiny-vllm': vLLM did not start: RuntimeError: Failed to create vLLM engine config"
        in reason
    )
    assert "vLLM found no usable GPU on the node" in reason
    others = serve.status().applications
    assert others["tiny"].status.value == "RUNNING" and others["vllm-test"].status.value == "RUNNING"

    # Our own surfaces say the same: the model is listed as failed, with the one-line reason.
    base = f"http://127.0.0.1:{port}"
    cards = {card["id"]: card["status"] for card in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}
    assert cards["tiny"]["state"] == "ready"
    assert cards["tiny-vllm"]["state"] == "failed" and "vLLM found no usable GPU" in cards["tiny-vllm"]["message"]
    admin = httpx.get(f"{base}/v1/admin/status", timeout=30).json()["models"]  # access off: an anonymous admin
    assert admin["tiny-vllm"]["state"] == "failed" and admin["tiny-vllm"]["running_replicas"] == 0

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-vllm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
    assert "vLLM found no usable GPU" in answer.json()["error"]["message"]

    entries = WeightCache(ray_with_gpu).entries()
    assert [(entry.source, entry.complete, entry.leased) for entry in entries] == [(tiny_hf_source, True, False)]
    for name in ("vllm-test", "tiny", "tiny-vllm"):
        serve.delete(name)
