"""The rendered manifests: schema-valid objects, secrets by reference only, what every Ray pod carries.

No cluster is needed: core kinds are validated with kubernetes-validate's bundled schemas, the
RayService with the vendored KubeRay CRD schema (tests/schemas/SOURCE.md), both strict about
unknown fields like `kubectl apply` is; `kubectl kustomize` (when installed) builds kuberay/.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from serve_app.cli import manifests as render
from serve_app.cli.deploy_settings import load_deploy_settings
from serve_app.cli.serve_file import SERVE_PROCESS_ENV
from tests.support.manifests import (
    GPU_SETTINGS,
    KUBERAY,
    ROOT,
    documents,
    needs_real_config,
    ray_pod_templates,
    rayservice,
    serve_config,
    settings,
)

CRD_SCHEMA = ROOT / "tests" / "schemas" / "rayservice-v1.openapi.json"
K8S_VERSION = kubernetes_validate.latest_version()
SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MODELSERVE_JWT_SECRET"}


def _strict(schema: Any) -> Any:
    """The CRD schema as `kubectl apply` (strict field validation) treats it: unknown fields are errors."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Any:
    """x-kubernetes-list-type: map/set lists must not repeat an item key, as the API server enforces."""
    if not isinstance(instance, list) or list_type not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = [tuple(item.get(key) for key in keys) if list_type == "map" else json.dumps(item) for item in instance]
    if len(seen) != len(set(seen)):
        yield jsonschema.ValidationError(f"duplicate items in x-kubernetes-list-type={list_type} list")


@functools.cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    schema = _strict(json.loads(CRD_SCHEMA.read_text()))
    validator_class = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})
    return validator_class(schema)


def assert_valid(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in rayservice_validator().iter_errors(doc)]
        assert not errors, "\n".join(errors)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overrides", [{}, GPU_SETTINGS], ids=["cpu+minio", "gpu+external-s3"])
def test_every_rendered_object_validates_against_its_schema(overrides: dict[str, Any]) -> None:
    deploy = settings(**overrides)
    files = render.render_manifests(serve_config(), deploy, (KUBERAY / "grafana-dashboard.json").read_text())
    docs = documents(files)
    minio_kinds = {"PersistentVolumeClaim", "Deployment", "Service", "Job"}
    expected = {"Namespace", "RayService", "ConfigMap"} | (minio_kinds if deploy.minio.enabled else set())
    assert {doc["kind"] for doc in docs} == expected
    for doc in docs:
        assert_valid(doc)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["resources"] == sorted(
        name for name in files if name.endswith(".yaml") and name != "kustomization.yaml"
    )
    for generator in kustomization["secretGenerator"]:
        assert [f"{env}.example" for env in generator["envs"]] == [f"{generator['name']}.env.example"]
        assert f"{generator['name']}.env.example" in files


def test_crd_validation_is_strict_about_unknown_and_mistyped_fields() -> None:
    service = rayservice(render.render_manifests(serve_config(), settings()))
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        assert_valid(typo)
    mistyped = copy.deepcopy(service)
    mistyped["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    with pytest.raises(AssertionError, match="Fast"):
        assert_valid(mistyped)


def test_secrets_only_by_reference_never_by_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = "s3cr3t-sentinel-value-4e1b"
    for variable in SECRET_VARIABLES:
        monkeypatch.setenv(variable, sentinel)
    for overrides in ({}, GPU_SETTINGS):
        files = render.render_manifests(serve_config(), settings(**overrides))
        assert not any(sentinel in text for text in files.values())
        docs = documents(files)
        assert "Secret" not in {doc["kind"] for doc in docs}
        containers = [c for doc in docs for c in _containers(doc)]
        secret_env = [
            e for c in containers for e in c.get("env", []) if e["name"] in SECRET_VARIABLES | {"MINIO_ROOT_PASSWORD"}
        ]
        assert secret_env and all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in secret_env)
    for example in KUBERAY.glob("*.env.example"):
        values = [line.split("=", 1)[1] for line in example.read_text().splitlines() if "=" in line and line[0] != "#"]
        assert values and all(value.startswith("change-me") for value in values)
    assert "*.env" in (KUBERAY / ".gitignore").read_text().splitlines()


def test_ray_pods_mount_jwt_keys_as_a_secret_directory_and_carry_the_serve_process_env() -> None:
    deploy = settings()
    service = rayservice(render.render_manifests(serve_config(), deploy))
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        container = pod["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == render.JWT_MOUNT)
        assert "subPath" not in mount and mount["readOnly"]  # subPath mounts never see Secret updates
        assert volumes[mount["name"]]["secret"] == {"secretName": deploy.secrets.jwt}
        assert {"name": "MODELSERVE_JWT_SECRET_FILE", "value": render.JWT_MOUNT} in container["env"]
        assert not any(e["name"] == "MODELSERVE_JWT_SECRET" for e in container["env"])
        assert all({"name": k, "value": v} in container["env"] for k, v in SERVE_PROCESS_ENV.items())  # every Ray pod
        init = pod["spec"]["initContainers"][0]
        assert all(m["mountPath"] != render.JWT_MOUNT for m in init["volumeMounts"])


def _containers(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [c for key in ("containers", "initContainers") for c in node.get(key, [])]
        return found + [c for key, value in node.items() for c in _containers(value)]
    return [c for item in node for c in _containers(item)] if isinstance(node, list) else []


def test_ray_pods_share_cache_path_export_metrics_and_leave_probes_to_kuberay() -> None:
    deploy = settings(model_cache_path="/var/cache/models", **GPU_SETTINGS)
    service = rayservice(render.render_manifests(serve_config(), deploy))
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    templates = ray_pod_templates(service)
    assert set(templates) == {"head", "cpu-workers", "gpu-workers"}
    for template in templates.values():
        ray_container = template["spec"]["containers"][0]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == "8080"
        assert {"name": "metrics", "containerPort": 8080} in ray_container["ports"]
        assert {"name": "serve", "containerPort": 8000} in ray_container["ports"]
        volume = next(v for v in template["spec"]["volumes"] if "hostPath" in v)
        assert volume["hostPath"] == {"path": "/var/cache/models", "type": "DirectoryOrCreate"}
        assert {"name": volume["name"], "mountPath": "/var/cache/models"} in ray_container["volumeMounts"]
        assert {"name": "MODELSERVE_CACHE_DIR", "value": "/var/cache/models"} in ray_container["env"]
        assert {"name": "AWS_ENDPOINT_URL", "value": "https://s3.example.internal"} in ray_container["env"]
        assert ray_container["resources"]["requests"] == ray_container["resources"]["limits"]
        assert "readinessProbe" not in ray_container and "livenessProbe" not in ray_container
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_gpu_worker_group_requests_gpus_on_selected_tolerated_nodes() -> None:
    service = rayservice(render.render_manifests(serve_config(), settings(**GPU_SETTINGS)))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("gpu-workers", 0, 2)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["image"] == "registry.example/modelserve-gpu:0.1.0"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert group["labels"] == {"ray.io/accelerator-type": "L4"}
    cpu_group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (needed for `kubectl kustomize`)")
@needs_real_config
def test_kustomize_builds_committed_manifests_with_generated_secrets(tmp_path: Path) -> None:
    copy_dir = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, copy_dir)
    for example in copy_dir.glob("*.env.example"):
        example.with_suffix("").write_text(example.read_text())  # the documented `cp x.env.example x.env`
    built = subprocess.run(["kubectl", "kustomize", str(copy_dir)], capture_output=True, text=True, check=True)
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    deploy = load_deploy_settings(KUBERAY / "deploy.yaml")
    secrets = {doc["metadata"]["name"]: set(doc["data"]) for doc in docs if doc["kind"] == "Secret"}
    assert secrets == {
        deploy.secrets.s3: {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        deploy.secrets.jwt: {"key-1"},  # file names in the mounted directory: the kids
    }
    for doc in docs:
        assert_valid(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == deploy.namespace
        for container in _containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["key"] in secrets[ref["name"]], env


def test_image_ray_version_matches_installed_ray_and_dockerfile() -> None:
    deploy = load_deploy_settings(KUBERAY / "deploy.yaml")
    assert deploy.ray_version == ray.__version__
    assert f"ARG BASE_IMAGE=rayproject/ray:{deploy.ray_version}-py311\n" in (KUBERAY / "Dockerfile").read_text()
