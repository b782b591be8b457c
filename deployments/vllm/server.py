"""vLLM models through Ray Serve LLM: a model entry as an `LLMConfig`, and our engine interface on its `LLMServer`.

Ray's `LLMServer` starts vLLM, places tensor-parallel workers, streams, aborts requests whose
caller left and exports vLLM's metrics. This adapter adds only what modelserve needs around it:
the weights come from our node-local cache (an s3:// directory in MinIO, fetched on the replica's
node and leased while the replica lives), the Serve options come from the model entry, and
`generate(GenerationRequest)` streams `GenerationChunk`s like every other backend, by running the
request through LLMServer's own OpenAI chat/completions path.

Importing this module needs the gpu extra (ray[llm]); the app builder imports it only for vllm models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from deployments.api import (
    ContextLengthExceeded,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidGenerationRequest,
    UnsupportedGenerationRequest,
    default_max_tokens,
)
from deployments.embedding import EmbeddingRequest, EmbeddingResult, WrongModelKind
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from deployments.weights.cache import WeightCache, WeightFetchError

logger = logging.getLogger("modelserve.vllm")

# All of a replica's GPU bundles on one node: the weight cache fills the replica's node only.
PLACEMENT = {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"}
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}  # running token counts on every chunk
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "stop"}
_CONTEXT_PARAMS = ("input_tokens", "input_text")  # what vLLM names when a prompt does not fit max_model_len


def make_llm_config(spec: ModelSpec, model_source: str) -> LLMConfig:
    """The Ray Serve LLM config of a vllm model entry, loading the weights from `model_source`."""
    if spec.vllm is None:
        raise ConfigError(f"model {spec.name!r} is not a vllm model")
    try:
        return LLMConfig(
            model_loading_config={"model_id": spec.name, "model_source": model_source},
            engine_kwargs={**spec.engine.engine_kwargs, **spec.vllm.engine_args()},
            accelerator_type=spec.vllm.accelerator_type,
            placement_group_config=PLACEMENT,
            deployment_config=spec.deployment.serve_options(),
            experimental_configs={"stream_batching_interval_ms": spec.engine.stream_interval_ms},
        )
    except ValueError as exc:
        raise ConfigError(f"model {spec.name!r}: Ray Serve LLM rejects its settings: {exc}") from None


def build_vllm_deployment(spec: ModelSpec) -> Application:
    """The Serve deployment of one vllm model, named like every model deployment.

    The config bound here decides placement and Serve options; each replica swaps in the local
    path its weight cache filled. Call it inside a Ray job (as the app builder is): Ray Serve LLM
    reads the job's runtime_env, and outside one that starts a local Ray.
    """
    try:
        return build_llm_deployment(
            make_llm_config(spec, spec.source),
            deployment_cls=VllmModelServer,
            bind_kwargs={"spec": spec.model_dump(mode="json")},
            override_serve_options={"name": spec.deployment_name},
        )
    except ValueError as exc:  # e.g. an engine_kwargs name vLLM does not know
        raise ConfigError(f"model {spec.name!r}: Ray Serve LLM rejects its settings: {exc}") from None


def fetch_model_directory(spec: ModelSpec, cache: WeightCache, lease: contextlib.ExitStack) -> Path:
    """Fetch the model's Hugging Face-format directory into the node's cache and lease it on `lease`."""
    path = cache.fetch(spec.source, spec.storage, label=spec.name)
    if not (path / "config.json").is_file():
        raise WeightFetchError(
            f"model {spec.name!r}: {spec.source} is not a Hugging Face-format model directory (no config.json)"
        )
    return lease.enter_context(cache.lease(path))


class VllmModelServer(LLMServer):
    """One replica of one vllm model: Ray's LLMServer on weights from our cache, plus `generate`."""

    async def __init__(self, llm_config: LLMConfig, *, spec: dict[str, Any]) -> None:
        self._spec = ModelSpec.model_validate(spec)
        self._lease = contextlib.ExitStack()
        try:
            path = await asyncio.to_thread(fetch_model_directory, self._spec, WeightCache(), self._lease)
        except BaseException:
            self._lease.close()
            raise
        logger.info("model %r: starting vLLM on %s", self._spec.name, path)
        try:
            await super().__init__(make_llm_config(self._spec, str(path)))
        except Exception as exc:
            self._lease.close()
            logger.exception("model %r: vLLM did not start", self._spec.name)
            raise engine_start_failure(self._spec.name, exc) from None
        except BaseException:
            self._lease.close()
            raise

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request through vLLM's OpenAI serving layer as engine-neutral chunks."""
        if request.tools is not None:
            raise UnsupportedGenerationRequest("vLLM models do not take tools yet.", param="tools")
        sampling = request.sampling
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(sampling, self._spec.engine.default_max_tokens)
        common: dict[str, Any] = {
            "model": self._spec.name,
            "request_id": request.request_id,
            "stream": True,
            "stream_options": STREAM_OPTIONS,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": list(sampling.stop),
            "seed": sampling.seed,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
        }
        if request.messages is not None:
            param = "messages"
            body = ChatCompletionRequest(
                messages=[dict(m) for m in request.messages], max_completion_tokens=max_tokens, **common
            )
            stream = await self.chat(body)
        else:
            param = "prompt"
            body = CompletionRequest(prompt=request.prompt or "", **common)
            body.max_tokens = max_tokens  # None = up to the context window, as on every backend (not 16)
            stream = await self.completions(body)
        async with contextlib.aclosing(stream):  # closing it early aborts the request in vLLM
            async for chunk in openai_stream_chunks(stream, param):
                yield chunk

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise WrongModelKind("vLLM models serve no embeddings here.", param="model")

    async def __del__(self) -> None:
        try:
            await super().__del__()
        finally:
            self._lease.close()


async def openai_stream_chunks(stream: AsyncIterator[Any], param: str) -> AsyncIterator[GenerationChunk]:
    """Turn LLMServer's stream (batches of OpenAI SSE lines, or an error object) into `GenerationChunk`s.

    Each batch becomes one chunk; the finishing chunk waits for the end of the stream so it
    carries the final token counts.
    """
    prompt_tokens = completion_tokens = 0
    finish: str | None = None
    last_text = ""  # text arriving with (or after) the finish reason
    async for batch in stream:
        parts: list[str] = []
        for event in _events(batch):
            if "error" in event:
                raise engine_error(event["error"], param)
            usage = event.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            completion_tokens = usage.get("completion_tokens", completion_tokens)
            for choice in event.get("choices") or []:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
        if finish is not None:
            last_text += "".join(parts)
        elif any(parts):
            yield GenerationChunk("".join(parts), prompt_tokens, completion_tokens)
    if finish not in _FINISH:
        raise EngineUnavailable(f"vLLM ended the generation without finishing it (finish_reason {finish!r})")
    yield GenerationChunk(last_text, prompt_tokens, completion_tokens, _FINISH[finish])


def _events(batch: Any) -> Iterator[dict[str, Any]]:
    """The JSON payloads in one LLMServer stream item: SSE strings, or an ErrorResponse model."""
    for item in batch if isinstance(batch, list) else [batch]:
        if not isinstance(item, str):
            yield item.model_dump()
            continue
        for line in item.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


def engine_start_failure(model: str, exc: Exception) -> EngineUnavailable:
    """The reason vLLM did not start, in one line (Serve shows it as the deployment's status message)."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the failure of Ray's engine-config task
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    reason = f"{type(cause).__name__}: {lines[-1]}"
    if "Device string must not be empty" in reason:  # vLLM's platform detection found no accelerator
        reason += " (vLLM found no usable GPU on the node: backend vllm needs NVIDIA/AMD GPU workers)"
    return EngineUnavailable(f"model {model!r}: vLLM did not start: {reason}")


def engine_error(error: dict[str, Any], param: str) -> EngineError:
    """vLLM's OpenAI error object as the engine error the ingress maps to a status."""
    message = str(error.get("message") or "vLLM rejected the request")
    status = int(error.get("code") or 500)
    if error.get("param") in _CONTEXT_PARAMS or "maximum context length" in message:
        return ContextLengthExceeded(message, param=param)
    if 400 <= status < 500:
        return InvalidGenerationRequest(message, param=error.get("param"))
    return EngineUnavailable(f"vLLM failed the request: {message}")
