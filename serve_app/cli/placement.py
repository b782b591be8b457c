"""Placement (`modelserve render --dry-run`): does every Serve replica fit some worker pod?

Reads what each deployment of a Serve config asks Ray for (its ray_actor_options, or vLLM's GPUs)
and the worker groups of kuberay/deploy.yaml, and reports where each replica can go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments.settings import DeploymentSettings, VllmSettings
from serve_app.cli.deploy_settings import (
    CPU_GROUP,
    GIB,
    GPU_GROUP,
    DeploySettings,
    ReplicaDemand,
    WorkerGroupSettings,
)
from serve_app.cli.serve_file import parse_serve_config
from serve_app.config import INGRESS_DEPLOYMENT


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
    plans = [(app, [(INGRESS_DEPLOYMENT, "ingress", args.ingress.deployment, None)]) for app, args in apps.ingress] + [
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
