"""Render modelserve's Kubernetes manifests: the KubeRay RayService, MinIO (`serve_app.cli.minio`), kustomization.

serve_config.yaml says what is served and kuberay/deploy.yaml where; the manifests are
derived from both and never hand-edited (the `render` command in `serve_app.cli.render`
writes and checks them).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from pydantic import ValidationError

from deployments.strict import ConfigError, describe_validation_error
from serve_app.access.keys import SECRET_FILE_ENV
from serve_app.cli import kube
from serve_app.cli.deploy_settings import (
    CPU_GROUP,
    GPU_GROUP,
    DeploySettings,
    GpuWorkerGroupSettings,
    WorkerGroupSettings,
)
from serve_app.cli.minio import minio_objects
from serve_app.cli.serve_file import SERVE_PROCESS_ENV, ingress_applications, parse_serve_config

SERVE_PORT = 8000
METRICS_PORT = 8080
JWT_MOUNT = "/etc/modelserve/jwt"  # one file per key of the Secret, named by its kid: rotation without restarts
JWT_VOLUME = "jwt-keys"
CACHE_VOLUME = "model-cache"
RAY_USER = "1000:100"  # uid:gid of the `ray` user in rayproject/ray images
PROMETHEUS_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}


def deployable_serve_config(serve_config: dict[str, Any]) -> dict[str, Any]:
    """Validated copy of the Serve config with the proxy on all interfaces at SERVE_PORT."""
    from ray.serve.schema import ServeDeploySchema  # deferred: importing Ray takes about a second

    config = copy.deepcopy(serve_config)
    config["http_options"] = {**(config.get("http_options") or {}), "host": "0.0.0.0", "port": SERVE_PORT}
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ConfigError("serve config rejected by Ray Serve:\n" + describe_validation_error(exc, config)) from None
    parse_serve_config(config, "serve config")
    return config


def _ray_container(
    settings: DeploySettings, name: str, image: str, resources: dict[str, Any], ports: dict[str, int]
) -> dict[str, Any]:
    """A Ray container; probes are left to KubeRay, which injects raylet/GCS/proxy health checks."""
    env: list[dict[str, Any]] = [{"name": "MODELSERVE_CACHE_DIR", "value": settings.model_cache_path}]
    if settings.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    env += [kube.secret_env(key, settings.secrets.s3) for key in kube.S3_SECRET_KEYS]
    env.append({"name": SECRET_FILE_ENV, "value": JWT_MOUNT})
    env += [{"name": key, "value": value} for key, value in SERVE_PROCESS_ENV.items()]
    return {
        "name": name,
        "image": image,
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
        "env": env,
        "resources": resources,
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": settings.model_cache_path},
            {"name": JWT_VOLUME, "mountPath": JWT_MOUNT, "readOnly": True},
        ],
    }


def _ray_pod_template(
    settings: DeploySettings, component: str, container: dict[str, Any], extra_spec: dict[str, Any]
) -> dict[str, Any]:
    """Pod with the node-local model cache (hostPath), made writable for the `ray` user first."""
    cache_owner = {
        "name": "model-cache-owner",
        "image": container["image"],
        "command": ["chown", RAY_USER, settings.model_cache_path],
        "securityContext": {"runAsUser": 0},
        "resources": kube.resources(0.1, 0.125),
        "volumeMounts": [m for m in container["volumeMounts"] if m["name"] == CACHE_VOLUME],
    }
    return {
        "metadata": {"labels": kube.labels(settings, component), "annotations": dict(PROMETHEUS_ANNOTATIONS)},
        "spec": {
            "initContainers": [cache_owner],
            "containers": [container],
            "volumes": [
                {"name": CACHE_VOLUME, "hostPath": {"path": settings.model_cache_path, "type": "DirectoryOrCreate"}},
                # Kubelet refreshes a Secret volume in place (no subPath): a key added to the Secret is a new kid
                # the ingress accepts after its next key reload, with no pod restart.
                {"name": JWT_VOLUME, "secret": {"secretName": settings.secrets.jwt}},
            ],
            **extra_spec,
        },
    }


def _worker_group(settings: DeploySettings, group_name: str, group: WorkerGroupSettings) -> dict[str, Any]:
    image, extra_spec, ray_labels = settings.image, {}, {}
    ray_start_params = {"metrics-export-port": str(METRICS_PORT)}
    if isinstance(group, GpuWorkerGroupSettings):
        image = group.image or settings.image
        if group.node_selector:
            extra_spec["nodeSelector"] = dict(group.node_selector)
        if group.tolerations:
            extra_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in group.tolerations]
        if group.accelerator_type:
            ray_labels["ray.io/accelerator-type"] = group.accelerator_type
            # vLLM replicas ask for this resource; declared so the autoscaler knows this group offers it (KubeRay quoting)
            ray_start_params["resources"] = json.dumps(json.dumps({f"accelerator_type:{group.accelerator_type}": 1}))
    resources = kube.resources(group.cpu, group.memory_gib, group.gpus)
    container = _ray_container(settings, "ray-worker", image, resources, {"serve": SERVE_PORT, "metrics": METRICS_PORT})
    spec: dict[str, Any] = {
        "groupName": group_name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": ray_start_params,
        "template": _ray_pod_template(settings, group_name, container, extra_spec),
    }
    if ray_labels:
        spec["labels"] = ray_labels
    return spec


def _rayservice(settings: DeploySettings, serve_config: dict[str, Any]) -> dict[str, Any]:
    head_ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": SERVE_PORT, "metrics": METRICS_PORT}
    head = _ray_container(
        settings, "ray-head", settings.image, kube.resources(settings.head.cpu, settings.head.memory_gib), head_ports
    )
    workers = [_worker_group(settings, CPU_GROUP, settings.cpu_workers)]
    if settings.gpu_workers.enabled:
        workers.append(_worker_group(settings, GPU_GROUP, settings.gpu_workers))
    autoscaler = settings.autoscaler
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": kube.metadata(settings, settings.name, "rayservice"),
        "spec": {
            "serveConfigV2": yaml.dump(serve_config, Dumper=kube.Dumper, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": settings.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": autoscaler.upscaling_mode,
                    "idleTimeoutSeconds": autoscaler.idle_timeout_seconds,
                    "resources": kube.resources(autoscaler.cpu, autoscaler.memory_gib),
                },
                "headGroupSpec": {
                    # num-cpus 0 keeps replicas off the head so losing a worker never takes down GCS.
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "0",
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": _ray_pod_template(settings, "ray-head", head, {}),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def _env_example(secret: str, keys: dict[str, str]) -> str:
    lines = [f"# Copy to {secret}.env (git-ignored) with real values; kustomize makes Secret {secret} from it."]
    return kube.HEADER + "\n".join(lines + [f"{key}={value}" for key, value in keys.items()]) + "\n"


def with_usage_bucket(serve_config: dict[str, Any], bucket: str) -> dict[str, Any]:
    """Ingress applications keep usage in the deployment's bucket unless the Serve config names one."""
    config = copy.deepcopy(serve_config)
    for application in ingress_applications(config):
        usage = application.setdefault("args", {}).setdefault("ingress", {}).setdefault("usage", {})
        usage.setdefault("bucket", bucket)
    return config


def grafana_dashboard(settings: DeploySettings, dashboard_json: str) -> dict[str, Any]:
    """The dashboard as a ConfigMap that Grafana's dashboard sidecar (label grafana_dashboard) picks up."""
    metadata = kube.metadata(settings, f"{settings.name}-grafana-dashboard", "grafana-dashboard")
    metadata["labels"]["grafana_dashboard"] = "1"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"modelserve.json": dashboard_json}}


def render_manifests(
    serve_config: dict[str, Any], settings: DeploySettings, dashboard_json: str | None = None
) -> dict[str, str]:
    """All files of kuberay/ that are derived from the two configs (and the dashboard): file name -> text."""
    config = deployable_serve_config(with_usage_bucket(serve_config, settings.minio.bucket))
    s3, jwt = settings.secrets.s3, settings.secrets.jwt
    files = {
        "namespace.yaml": kube.to_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": settings.namespace}}),
        "rayservice.yaml": kube.to_yaml(_rayservice(settings, config)),
        f"{s3}.env.example": _env_example(
            s3, {kube.S3_SECRET_KEYS[0]: "change-me", kube.S3_SECRET_KEYS[1]: "change-me-to-8-or-more-characters"}
        ),
        f"{jwt}.env.example": _env_example(jwt, {"key-1": "change-me-to-a-long-random-string-of-32-or-more-bytes"}),
    }
    if dashboard_json is not None:
        files["grafana-dashboard.yaml"] = kube.to_yaml(grafana_dashboard(settings, dashboard_json))
    if settings.minio.enabled:
        files["minio.yaml"] = kube.to_yaml(*minio_objects(settings))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": settings.namespace,
        "resources": sorted(name for name in files if name.endswith(".yaml")),
        # Fixed names: kustomize cannot rewrite hashed Secret names inside the RayService CRD.
        "generatorOptions": {"disableNameSuffixHash": True},
        "secretGenerator": [{"name": secret, "envs": [f"{secret}.env"]} for secret in (s3, jwt)],
    }
    files["kustomization.yaml"] = kube.to_yaml(kustomization)
    return dict(sorted(files.items()))
