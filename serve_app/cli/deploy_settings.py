"""Kubernetes deploy settings (kuberay/deploy.yaml): cluster shape, images, storage and secret names.

Kept apart from the Serve app config because it describes where the app runs, not what it
serves; `render` combines the two into manifests. Plain validated data; whether every Serve
replica fits some worker pod (`render --dry-run`) is placement.py's question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from deployments.strict import ConfigError, Strict, describe_validation_error

GIB = 1024**3
CPU_GROUP, GPU_GROUP = "cpu-workers", "gpu-workers"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")



def _pinned_image(value: str) -> str:
    """Images must carry a tag or digest so a re-apply never silently changes what runs."""
    name, _, digest = value.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    pinned = digest.startswith("sha256:") if digest else tag not in ("", "latest")
    if not pinned or not name or any(char.isspace() for char in value):
        raise ValueError(f"image {value!r} must be name:tag (not :latest) or name@sha256:digest")
    return value


PinnedImage = Annotated[str, AfterValidator(_pinned_image)]


@dataclass(frozen=True)
class ReplicaDemand:
    """What one Serve replica asks Ray for (its `ray_actor_options`, with Serve's defaults)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int = 0
    accelerator_type: str | None = None
    custom_resources: dict[str, float] = field(default_factory=dict)


class HeadSettings(Strict):
    """The head pod runs GCS, dashboard, Serve controller and autoscaler; no replicas (num-cpus 0)."""

    cpu: float = Field(2, gt=0)
    memory_gib: float = Field(4, gt=0)


class WorkerGroupSettings(Strict):
    """One autoscaled group of identical worker pods."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    cpu: int = Field(4, ge=1, description="CPUs per pod; KubeRay gives Ray this many (integer) CPUs.")
    memory_gib: float = Field(8, gt=0, description="Memory per pod; KubeRay gives Ray this as `memory`.")

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @property
    def gpus(self) -> int:
        return 0

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def shortfalls(self, demand: ReplicaDemand) -> list[str]:
        """Why one replica cannot be placed on one pod of this group (empty: it fits)."""
        reasons = []
        if demand.num_cpus > self.cpu:
            reasons.append(f"num_cpus {demand.num_cpus:g} > {self.cpu} per pod")
        if demand.num_gpus > self.gpus:
            reasons.append(f"num_gpus {demand.num_gpus:g} > {self.gpus} per pod")
        if demand.memory_bytes > self.memory_bytes:
            reasons.append(f"memory {demand.memory_bytes / GIB:.2f} GiB > {self.memory_gib:g} GiB per pod")
        if demand.accelerator_type is not None and demand.accelerator_type != self.accelerator_label:
            reasons.append(f"accelerator_type {demand.accelerator_type!r} != {self.accelerator_label!r}")
        for name in demand.custom_resources:
            reasons.append(f"custom resource {name!r} is not offered")
        return reasons

    @property
    def accelerator_label(self) -> str | None:
        return None


class Toleration(Strict):
    """A Kubernetes toleration, by its Kubernetes field names."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = Field(None, ge=0)


class GpuWorkerGroupSettings(WorkerGroupSettings):
    """Optional GPU pods (vLLM and any num_gpus>0 deployment), usually on tainted GPU nodes."""

    enabled: bool = False
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(2, ge=1)
    cpu: int = Field(8, ge=1)
    memory_gib: float = Field(32, gt=0)
    gpus_per_pod: int = Field(1, ge=1)
    image: PinnedImage | None = Field(None, description="GPU image (e.g. built on -py311-gpu); default: the app image.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    accelerator_type: str | None = Field(
        None, description="Ray node label ray.io/accelerator-type, e.g. L4, A10G (matches actor accelerator_type)."
    )

    @property
    def gpus(self) -> int:
        return self.gpus_per_pod

    @property
    def accelerator_label(self) -> str | None:
        return self.accelerator_type


class AutoscalerSettings(Strict):
    """KubeRay in-tree autoscaler sidecar."""

    idle_timeout_seconds: int = Field(300, ge=0, description="Idle worker pods are removed after this long.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    cpu: float = Field(0.5, gt=0)
    memory_gib: float = Field(0.5, gt=0)


class MinioSettings(Strict):
    """In-cluster MinIO holding s3:// model weights; credentials come from the S3 secret."""

    enabled: bool = True
    endpoint: str | None = Field(None, description="S3 endpoint for Ray pods; default: the in-cluster MinIO.")
    bucket: str = Field("models", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    storage_gib: int = Field(20, ge=1)
    storage_class: str | None = None
    image: PinnedImage = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
    mc_image: PinnedImage = "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"


class SecretNames(Strict):
    """Kubernetes Secrets the pods read by reference (keys are the env var names)."""

    s3: str = Field("modelserve-s3", pattern=_DNS1035.pattern, description="AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY")
    jwt: str = Field("modelserve-jwt", pattern=_DNS1035.pattern, description="MODELSERVE_JWT_SECRET")


class DeploySettings(Strict):
    """Everything about the Kubernetes deployment that is not in serve_config.yaml."""

    name: str = Field("modelserve", max_length=47, description="RayService name (KubeRay: DNS-1035, <= 47).")
    namespace: str = Field("modelserve", max_length=63)
    image: PinnedImage = Field(description="App image built from kuberay/Dockerfile, name:tag.")
    ray_version: str = Field(pattern=r"^\d+\.\d+\.\d+$", description="Ray version inside the image.")
    head: HeadSettings = Field(default_factory=HeadSettings)
    cpu_workers: WorkerGroupSettings = Field(default_factory=WorkerGroupSettings)
    gpu_workers: GpuWorkerGroupSettings = Field(default_factory=GpuWorkerGroupSettings)
    autoscaler: AutoscalerSettings = Field(default_factory=AutoscalerSettings)
    minio: MinioSettings = Field(default_factory=MinioSettings)
    model_cache_path: str = Field("/models", pattern=r"^/[^\s]*$", description="hostPath on every node.")
    secrets: SecretNames = Field(default_factory=SecretNames)

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS1035.match(value):
            raise ValueError("must be lower-case letters, digits and '-', starting with a letter")
        return value

    @property
    def minio_service(self) -> str:
        return f"{self.name}-minio"

    @property
    def s3_endpoint(self) -> str | None:
        """What AWS_ENDPOINT_URL is in Ray pods: explicit endpoint, else the in-cluster MinIO, else AWS."""
        if self.minio.endpoint:
            return self.minio.endpoint
        if self.minio.enabled:
            return f"http://{self.minio_service}.{self.namespace}.svc.cluster.local:9000"
        return None

    @property
    def worker_groups(self) -> list[WorkerGroupSettings]:
        """Groups that exist in the cluster, CPU first."""
        return [self.cpu_workers] + ([self.gpu_workers] if self.gpu_workers.enabled else [])


def load_deploy_settings(path: str | Path) -> DeploySettings:
    """Read and validate kuberay/deploy.yaml, naming each bad field."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    try:
        return DeploySettings.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(f"invalid deploy settings in {path}:\n" + describe_validation_error(exc, data)) from None
