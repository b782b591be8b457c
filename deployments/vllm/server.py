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
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from deployments.api import (
    STARTED,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    Started,
    UnsupportedGenerationRequest,
    default_max_tokens,
)
from deployments.embedding import EmbeddingRequest, EmbeddingResult, WrongModelKind
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from deployments.vllm.request import openai_stream_chunks, request_fields
from deployments.weights.cache import WeightCache, WeightFetchError

logger = logging.getLogger("modelserve.vllm")

# All of a replica's GPU bundles on one node: the weight cache fills the replica's node only.
PLACEMENT = {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"}


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

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Started | GenerationChunk]:
        """STARTED (vLLM queues and batches itself), then the request through vLLM's OpenAI serving layer."""
        yield STARTED
        if request.tools is not None:
            raise UnsupportedGenerationRequest("vLLM models do not take tools yet.", param="tools")
        sampling = request.sampling
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(sampling, self._spec.engine.default_max_tokens)
        fields = request_fields(self._spec.name, request)
        if request.messages is not None:
            param = "messages"
            stream = await self.chat(ChatCompletionRequest(**fields, max_completion_tokens=max_tokens))
        else:
            param = "prompt"
            body = CompletionRequest(**fields)
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


def engine_start_failure(model: str, exc: Exception) -> EngineUnavailable:
    """The reason vLLM did not start, in one line (Serve shows it as the deployment's status message)."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the failure of Ray's engine-config task
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    reason = f"{type(cause).__name__}: {lines[-1]}"
    if "Device string must not be empty" in reason:  # vLLM's platform detection found no accelerator
        reason += " (vLLM found no usable GPU on the node: backend vllm needs NVIDIA/AMD GPU workers)"
    return EngineUnavailable(f"model {model!r}: vLLM did not start: {reason}")
