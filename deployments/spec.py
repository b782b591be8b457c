"""What a model is, as plain validated data: its name, weights and settings (`deployments.settings`), checked together.

Everything a model deployment needs travels in a `ModelSpec`, so a config with a typo is
rejected before any replica starts (never half an app). The Serve application args around it
(model defaults, the ingress) are the app's business: `serve_app.config`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from deployments.settings import (
    VLLM_MAX_ONGOING_REQUESTS,
    VLLM_OWNED_ARGS,
    DeploymentSettings,
    EngineSettings,
    RoutingSettings,
    VllmSettings,
)
from deployments.strict import Strict
from deployments.tracing import TracingSettings
from deployments.weights.source import StorageSettings, parse_source

Backend = Literal["llama_cpp", "vllm"]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


class ModelSpec(Strict):
    """One served model: its OpenAI id, engine, weights and Serve deployment."""

    name: str = Field(description="The OpenAI `model` id clients send.")
    backend: Backend = "llama_cpp"
    source: str = Field(description="Where the weights are: a path, file://, s3:// or package:// URI.")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    vllm: VllmSettings | None = Field(None, description="vLLM engine settings (backend vllm only).")
    tracing: TracingSettings = Field(default_factory=TracingSettings, description="OpenTelemetry spans of the "
                                     "replica's requests (llama_cpp backend), joined to the ingress's traces.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _MODEL_NAME.match(value):
            raise ValueError("model name must be 1-128 characters of letters, digits and . _ : / @ -")
        return value

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        parse_source(value)  # SourceError is a ValueError: pydantic reports its message
        return value

    @model_validator(mode="after")
    def _slots_match_ongoing_requests(self) -> ModelSpec:
        """A llama.cpp replica decodes `parallel` requests and holds `max_waiting` more for fair admission, so Serve
        sends it that many: max_ongoing_requests follows them (giving it with another value is an error)."""
        if self.backend != "llama_cpp":
            return self
        engine, deployment = self.engine, self.deployment
        ongoing = engine.parallel + engine.max_waiting
        if "max_ongoing_requests" in deployment.model_fields_set and deployment.max_ongoing_requests != ongoing:
            raise ValueError(
                f"deployment.max_ongoing_requests ({deployment.max_ongoing_requests}) is not engine.parallel "
                f"({engine.parallel}) + engine.max_waiting ({engine.max_waiting}): a llama.cpp replica decodes "
                "`parallel` requests and holds `max_waiting` more, so set those two (max_ongoing_requests follows)"
            )
        deployment.max_ongoing_requests = ongoing
        return self

    @model_validator(mode="after")
    def _threads_match_cpus(self) -> ModelSpec:
        """A llama.cpp replica runs exactly as many threads as Ray reserves CPUs for it, never more.

        Otherwise Ray places replicas by a CPU count their threads exceed, and two replicas on one
        node decode on the same cores (measured: throughput falls to a fifth). Whichever of
        engine.n_threads and ray_actor_options.num_cpus is given sets the other (Serve's default:
        1 CPU); giving both with different values is an error.
        """
        if self.backend != "llama_cpp":
            return self
        actor = self.deployment.ray_actor_options
        threads, cpus = self.engine.n_threads, actor.get("num_cpus")
        if cpus is not None:
            if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus < 1 or cpus != int(cpus):
                raise ValueError(
                    f"deployment.ray_actor_options.num_cpus is {cpus!r}: a llama.cpp replica decodes on whole "
                    "cores, one thread each, so reserve a whole number of CPUs (at least 1)"
                )
            if threads is not None and threads != cpus:
                raise ValueError(
                    f"engine.n_threads ({threads}) and deployment.ray_actor_options.num_cpus ({cpus:g}) differ: "
                    "a llama.cpp replica runs one decode thread per CPU Ray reserves for it, so set one of them "
                    "(the other follows)"
                )
        self.engine.n_threads = int(cpus if cpus is not None else threads or 1)
        self.deployment.ray_actor_options = {**actor, "num_cpus": self.engine.n_threads}
        return self

    @model_validator(mode="after")
    def _vllm_entry(self) -> ModelSpec:
        """vLLM loads a Hugging Face-format directory and gets its GPUs from `vllm`, not from ray_actor_options."""
        if self.backend != "vllm":
            if self.vllm is not None:
                raise ValueError(f"the 'vllm' section is for backend vllm only (this model's backend is {self.backend})")
            return self
        self.vllm = self.vllm or VllmSettings()
        source = parse_source(self.source)
        if source.scheme == "package":
            raise ValueError("backend vllm loads a Hugging Face-format model directory, not a package:// GGUF")
        if source.scheme == "s3" and not source.is_directory:
            raise ValueError(f"backend vllm loads a model directory: end the s3:// prefix with '/' (use {self.source}/)")
        kwargs = set(self.engine.engine_kwargs)
        if owned := sorted(kwargs.intersection(VLLM_OWNED_ARGS)):
            raise ValueError(f"engine.engine_kwargs {owned} are set by modelserve from the model's name and source")
        if self.tracing.enabled:
            raise ValueError("tracing.enabled: a vllm model's replica records no spans yet; turn tracing off for it "
                             "(its requests are still traced at the ingress)")
        if typed := sorted(kwargs.intersection({*VllmSettings.model_fields, "enable_auto_tool_choice"})):
            raise ValueError(f"engine.engine_kwargs {typed}: set these under 'vllm:' instead, where they are checked")
        actor = self.deployment.ray_actor_options
        if actor.get("num_gpus") or actor.get("accelerator_type"):
            raise ValueError(
                "backend vllm takes its GPUs from vllm.tensor_parallel_size x vllm.pipeline_parallel_size and "
                "vllm.accelerator_type: remove deployment.ray_actor_options num_gpus/accelerator_type"
            )
        if "max_ongoing_requests" not in self.deployment.model_fields_set:
            self.deployment.max_ongoing_requests = VLLM_MAX_ONGOING_REQUESTS
        return self

    @model_validator(mode="after")
    def _embedding_backend(self) -> ModelSpec:
        if self.engine.embedding and self.backend != "llama_cpp":
            raise ValueError("engine.embedding is served by backend llama_cpp only")
        return self

    @property
    def deployment_name(self) -> str:
        return model_deployment_name(self.name)


def model_deployment_name(model: str) -> str:
    """The Serve deployment of a model, inside the application named after the model: stable, derived from the id.

    The ingress finds a model application by this name, so it needs no list of models.
    """
    return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model).strip("-")
