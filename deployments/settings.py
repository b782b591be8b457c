"""The settings a model entry groups: its engine, its vLLM arguments and its Serve deployment.

Plain validated data; `deployments.spec.ModelSpec` checks how they fit together (slots and
ongoing requests, threads and CPUs, which backend takes which).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deployments.strict import Strict

MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ


class EngineSettings(Strict):
    """How the engine loads and runs the model (backend-specific keys are ignored by the other)."""

    n_ctx: int = Field(2048, ge=32, description="Context window of each sequence slot in tokens (llama.cpp).")
    n_threads: int | None = Field(
        None, ge=1, description="llama.cpp decode (and prompt) threads of one replica. Always equal to the CPUs Ray "
        "reserves for the replica (deployment.ray_actor_options.num_cpus): set either, the other follows.",
    )
    n_batch: int = Field(512, ge=1, description="Prompt-processing batch size (llama.cpp).")
    parallel: int = Field(
        4,
        ge=1,
        le=MAX_PARALLEL,
        description="Sequence slots one llama.cpp replica decodes together (continuous batching); "
        "the deployment's max_ongoing_requests is parallel + max_waiting.",
    )
    max_waiting: int = Field(
        32, ge=0, le=1024, description="llama.cpp: requests one replica holds beyond its slots, admitted into free "
        "slots by fair share across tenants (policy `weight`, request `priority`); more wait in Serve's queue, "
        "first come first served (deployment.max_queued_requests).",
    )
    prefill_chunk: int = Field(
        512,
        ge=1,
        description="Prompt tokens fed per decode step while other sequences stream (chunked prefill): "
        "bounds how long a new prompt pauses them. With nothing streaming, prompts go n_batch at a time. "
        "Smaller chunks pause streams less but fill new prompts slower (bench/bench_multiturn.py).",
    )
    prefix_reuse: bool = Field(
        True,
        description="llama.cpp: a new prompt takes the free slot whose cached KV shares the longest prefix with it "
        "and prefills only the rest (llama-server's cache_prompt): each chat turn skips the history already "
        "cached. Outputs then depend slightly on what ran before (batch-dependent CPU kernels).",
    )
    prefix_cache: Literal["tenant", "shared"] = Field(
        "tenant",
        description="Whose cached prefixes a request may reuse: tenant = only its own tenant's (a shared cache "
        "tells tenants through time-to-first-token what others sent, vLLM's CVE-2025-46570); shared = anyone's "
        "(for public system prompts).",
    )
    prompt_cache_ram_mib: int = Field(
        512, ge=0, le=1 << 20,
        description="llama.cpp, with prefix_reuse: host RAM in MiB for the KV of prompts whose slot another prompt "
        "took (llama-server's --cache-ram), least recently used out first; a later turn of such a conversation gets "
        "it back instead of prefilling its history, so more conversations stay warm than there are slots. 0: off. "
        "512 is llama-server's 8192 scaled to a replica of the shipped sizing (a 4-CPU, 8 GiB pod holds two): about "
        "the replica's own KV (8 x 4096 tokens of the demo model), so it roughly doubles the conversations kept.",
    )
    chat_format: str | None = Field(
        None, description="llama-cpp-python chat format name (e.g. 'gemma'); overrides the GGUF template."
    )
    chat_template: str | None = Field(None, description="Jinja chat template; overrides chat_format and GGUF.")
    default_max_tokens: int | None = Field(
        1024, ge=1, description="Completion budget of a request that sets no max_tokens (a tenant's max_tokens still "
        "clamps it); null: up to the context window.",
    )
    stream_interval_ms: float = Field(
        100.0, ge=0, description="Tokens produced within this window travel as one stream item (first one at once): "
        "each item costs Serve a few ms of CPU on its way to the client (proxy, ingress, replica).",
    )
    stream_items_per_s: float = Field(
        40.0, ge=0, description="llama.cpp: under load, the stream items one replica sends per second in all (0: no "
        "cap). Each stream's interval grows to (active streams / this) so Serve's per-item CPU stays bounded.",
    )
    repack: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama.cpp: repack weights into the CPU's extra buffer types at load (llama-server's "
        "--repack / --no-repack). auto = on, except on CPUs with AMX, where llama.cpp's AMX path crashes on the "
        "first decode (ggml-org/llama.cpp#20824).",
    )
    embedding: bool = Field(
        False, description="llama.cpp: an embedding model, serving /v1/embeddings (and refusing chat and completions)."
    )
    pooling: Literal["model", "mean", "cls", "last"] = Field(
        "model", description="Embedding models: how token vectors pool into one; model = the GGUF's own pooling "
        "(a decoder GGUF has none: set mean).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra backend parameters (llama.cpp: model or context parameter fields by name).",
    )


class RoutingSettings(Strict):
    """How the ingress picks a replica of a llama.cpp model (`deployments.prefix_router`)."""

    prefix_affinity: bool = Field(
        True, description="Send a request to the replica that served the longest prefix of its prompt (a "
        "conversation's earlier turns), whose prefix cache holds it, and a prompt none was sent to the replica sent "
        "the fewest; false: Serve's power-of-two choice.",
    )
    imbalanced_threshold: int = Field(
        2, ge=0, description="Prefix affinity holds while replicas' ongoing requests differ by at most this; "
        "beyond it the least-loaded replica gets the request.",
    )


class AutoscalingSettings(Strict):
    """Ray Serve autoscaling, by the names Serve uses."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentSettings(Strict):
    """Ray Serve deployment options, passed through to `Deployment.options()`."""

    num_replicas: int | None = Field(None, ge=0)
    autoscaling_config: AutoscalingSettings | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(16, ge=-1)
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentSettings:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for `Deployment.options()`."""
        options = self.model_dump(exclude_none=True)
        if self.num_replicas is None and self.autoscaling_config is None:
            options["num_replicas"] = 1
        return options


VLLM_MAX_ONGOING_REQUESTS = 256  # vLLM batches many sequences per step; 4 (the llama.cpp default) would starve it
VLLM_OWNED_ARGS = ("model", "served_model_name", "distributed_executor_backend")  # set from name/source by Ray


class VllmSettings(Strict):
    """vLLM engine arguments checked before deploying; any other vLLM engine argument goes in engine.engine_kwargs.

    A replica gets tensor_parallel_size x pipeline_parallel_size GPUs, all on one node (the weights
    are cached per node), so these settings also decide which GPU pods can hold it.
    """

    max_model_len: int | None = Field(None, ge=32, description="Context window in tokens; None = the model's own.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    quantization: str | None = Field(
        None, pattern=r"^[a-z0-9_]+$", description="vLLM quantization method (awq, gptq, fp8, ...); None = as saved."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs each layer is split across.")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="GPU stages the layers are split into.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type of the GPUs (L4, A10G, H100, ...); must match the GPU worker group."
    )
    tool_call_parser: str | None = Field(
        None, pattern=r"^[a-z0-9_.-]+$", description="vLLM's parser for the model's tool call format (hermes, "
        "llama3_json, mistral, ...): turns on `tools` (vLLM's enable_auto_tool_choice); None = `tools` refused.",
    )

    @field_validator("accelerator_type")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from ray.util.accelerators import accelerators  # the table Ray Serve LLM checks against (core Ray)

        known = sorted(
            name for key, name in vars(accelerators).items()
            if not key.startswith("_") and isinstance(name, str) and not name.startswith("TPU")
        )
        if value not in known:
            raise ValueError(f"unknown GPU accelerator type {value!r} (Ray knows {', '.join(known)})")
        return value

    @property
    def num_gpus(self) -> int:
        """GPUs one replica takes (one placement-group bundle each)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments among these settings (unset ones are left to vLLM)."""
        args = self.model_dump(exclude={"accelerator_type", "tool_call_parser"}, exclude_none=True)
        if self.tool_call_parser:
            args.update(enable_auto_tool_choice=True, tool_call_parser=self.tool_call_parser)
        return args
