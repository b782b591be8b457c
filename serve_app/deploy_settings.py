"""Kubernetes deploy settings (kuberay/deploy.yaml): cluster shape, images, storage and secret names.

Kept apart from the Serve app config because it describes where the app runs, not what it
serves; `render` combines the two into manifests. Plain validated data, plus the question only
these settings can answer (`render --dry-run`): does every Serve replica fit some worker pod?
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.config import ConfigError, DeploymentSettings, VllmSettings, describe_validation_error
from serve_app.serve_config import parse_serve_config

GIB = 1024**3
CPU_GROUP, GPU_GROUP = "cpu-workers", "gpu-workers"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class _Strict(BaseModel):
    """Unknown keys are typos, not extensions."""

    model_config = ConfigDict(extra="forbid")


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


class HeadSettings(_Strict):
    """The head pod runs GCS, dashboard, Serve controller and autoscaler; no replicas (num-cpus 0)."""

    cpu: float = Field(2, gt=0)
    memory_gib: float = Field(4, gt=0)


class WorkerGroupSettings(_Strict):
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


class Toleration(_Strict):
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


class AutoscalerSettings(_Strict):
    """KubeRay in-tree autoscaler sidecar."""

    idle_timeout_seconds: int = Field(300, ge=0, description="Idle worker pods are removed after this long.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    cpu: float = Field(0.5, gt=0)
    memory_gib: float = Field(0.5, gt=0)


class MinioSettings(_Strict):
    """In-cluster MinIO holding s3:// model weights; credentials come from the S3 secret."""

    enabled: bool = True
    endpoint: str | None = Field(None, description="S3 endpoint for Ray pods; default: the in-cluster MinIO.")
    bucket: str = Field("models", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    storage_gib: int = Field(20, ge=1)
    storage_class: str | None = None
    image: PinnedImage = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
    mc_image: PinnedImage = "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"


class SecretNames(_Strict):
    """Kubernetes Secrets the pods read by reference (keys are the env var names)."""

    s3: str = Field("modelserve-s3", pattern=_DNS1035.pattern, description="AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY")
    jwt: str = Field("modelserve-jwt", pattern=_DNS1035.pattern, description="MODELSERVE_JWT_SECRET")


class DeploySettings(_Strict):
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


@dataclass(frozen=True)
class DeploymentPlan:
    """Where one Serve deployment's replicas can go in the cluster these settings describe."""

    deployment: str
    description: str
    min_replicas: int
    max_replicas: int
    demand: ReplicaDemand
    groups: list[str]
    problems: list[str]


def replica_demand(ray_actor_options: dict[str, Any]) -> ReplicaDemand:
    """Ray resources of one replica; Serve gives a replica 1 CPU unless told otherwise."""
    custom = dict(ray_actor_options.get("resources") or {})
    accelerator = ray_actor_options.get("accelerator_type")
    for name in [key for key in custom if key.startswith("accelerator_type:")]:
        accelerator = accelerator or name.split(":", 1)[1]
        del custom[name]
    return ReplicaDemand(
        num_cpus=float(ray_actor_options.get("num_cpus", 1.0)),
        num_gpus=float(ray_actor_options.get("num_gpus", 0.0)),
        memory_bytes=int(ray_actor_options.get("memory") or 0),
        accelerator_type=accelerator,
        custom_resources={key: float(value) for key, value in custom.items()},
    )


def replica_bounds(options: dict[str, Any]) -> tuple[int, int]:
    """(min, max) replicas from Serve deployment options."""
    autoscaling = options.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("min_replicas", 1)), int(autoscaling.get("max_replicas", 1))
    replicas = int(options.get("num_replicas", 1))
    return replicas, replicas


def plan_deployment(
    settings: DeploySettings, deployment: str, description: str, options: dict[str, Any], needs_gpu_group: bool
) -> DeploymentPlan:
    """Check one deployment against every worker group; GPU work may only go to the GPU group."""
    demand = replica_demand(options.get("ray_actor_options") or {})
    low, high = replica_bounds(options)
    gpu = settings.gpu_workers
    problems: list[str] = []
    if (needs_gpu_group or demand.num_gpus > 0) and not gpu.enabled:
        problems.append("needs GPUs but there is no GPU worker group (set gpu_workers.enabled: true)")
    candidates = {CPU_GROUP: settings.cpu_workers, GPU_GROUP: gpu}
    if needs_gpu_group or demand.num_gpus > 0:
        candidates.pop(CPU_GROUP)
    if not gpu.enabled:
        candidates.pop(GPU_GROUP)
    fits = [name for name, group in candidates.items() if not group.shortfalls(demand)]
    if candidates and not fits:
        for name, group in candidates.items():
            problems.append(f"does not fit a {name} pod: " + "; ".join(group.shortfalls(demand)))
    return DeploymentPlan(deployment, description, low, high, demand, fits, problems)


def plan_placement(serve_config: dict[str, Any], settings: DeploySettings) -> tuple[str, list[str]]:
    """Human-readable plan of a validated Serve config on these settings, and what makes it undeployable."""
    lines = [f"RayService {settings.namespace}/{settings.name}: image {settings.image}, Ray {settings.ray_version}"]
    for group_name, group in ((CPU_GROUP, settings.cpu_workers), (GPU_GROUP, settings.gpu_workers)):
        if group in settings.worker_groups:
            gpus = f", {group.gpus} GPU" + (f" ({group.accelerator_label})" if group.accelerator_label else "")
            lines.append(
                f"  worker group {group_name}: {group.min_replicas}-{group.max_replicas} pods x "
                f"{group.cpu} CPU, {group.memory_gib:g} GiB{gpus if group.gpus else ''}"
            )
        else:
            lines.append(f"  worker group {group_name}: disabled")
    problems: list[str] = []
    peak_cpus = peak_gpus = 0.0
    apps = parse_serve_config(serve_config, "serve config")
    plans = [(app, [("ingress", "ingress", args.ingress.deployment, None)]) for app, args in apps.ingress] + [
        (app, [(m.deployment_name, f"model {m.name} ({m.backend})", m.deployment, m.vllm)]) for app, m in apps.models
    ]
    for application, entries in plans:
        overrides = {entry.get("name"): entry for entry in application.get("deployments") or []}
        lines.append(f"application {application.get('name', 'default')} ({application.get('route_prefix', '/')}):")
        for deployment, description, options, vllm in entries:
            merged = _with_override(options, overrides.pop(deployment, {}))
            if vllm is not None:
                merged["ray_actor_options"] = {**(merged.get("ray_actor_options") or {}), **vllm_replica_gpus(vllm)}
            plan = plan_deployment(settings, deployment, description, merged, needs_gpu_group=vllm is not None)
            demand = plan.demand
            memory = f"{demand.memory_bytes / GIB:.2f} GiB" if demand.memory_bytes else "no memory reservation"
            groups = {CPU_GROUP: settings.cpu_workers, GPU_GROUP: settings.gpu_workers}
            fits = [f"{name} ({_per_pod(groups[name], demand)})" for name in plan.groups]
            lines.append(
                f"  {plan.deployment}: {plan.description}, replicas {plan.min_replicas}-{plan.max_replicas}, "
                f"per replica {demand.num_cpus:g} CPU, {demand.num_gpus:g} GPU, {memory}"
                f" -> {', '.join(fits) or 'NO FIT'}"
            )
            problems += [f"{plan.deployment} ({plan.description}): {problem}" for problem in plan.problems]
            peak_cpus += plan.max_replicas * demand.num_cpus
            peak_gpus += plan.max_replicas * demand.num_gpus
        lines += [f"  note: override for unknown deployment {name!r} not checked" for name in overrides]
    capacity_cpus = sum(group.max_replicas * group.cpu for group in settings.worker_groups)
    capacity_gpus = sum(group.max_replicas * group.gpus for group in settings.worker_groups)
    lines.append(
        f"at max replicas: {peak_cpus:g} CPU, {peak_gpus:g} GPU wanted; "
        f"worker groups at max pods: {capacity_cpus} CPU, {capacity_gpus} GPU"
    )
    if peak_cpus > capacity_cpus or peak_gpus > capacity_gpus:
        lines.append("  warning: the autoscaler cannot reach every deployment's max_replicas at once")
    return "\n".join(lines), problems


def _per_pod(group: WorkerGroupSettings, demand: ReplicaDemand) -> str:
    """How many such replicas one pod of the group holds by CPU, and the cores they leave idle."""
    if demand.num_cpus <= 0:
        return "no CPU reserved"
    count = int(group.cpu // demand.num_cpus)
    idle = group.cpu - count * demand.num_cpus
    return f"{count} per pod" + (f", {idle:g} CPU of each pod idle" if idle else "")


def vllm_replica_gpus(vllm: VllmSettings) -> dict[str, Any]:
    """What a vLLM replica takes beyond its actor: one GPU bundle per parallel worker, all on one pod (STRICT_PACK)."""
    accelerator = {"accelerator_type": vllm.accelerator_type} if vllm.accelerator_type else {}
    return {"num_gpus": vllm.num_gpus, **accelerator}


def _with_override(options: DeploymentSettings, override: dict[str, Any]) -> dict[str, Any]:
    """Serve options after the config's per-deployment override (top-level keys replace)."""
    merged = options.serve_options()
    merged.update({key: value for key, value in override.items() if key != "name"})
    if "num_replicas" in override:
        merged.pop("autoscaling_config", None)
    if "autoscaling_config" in override:
        merged.pop("num_replicas", None)
    return merged
