"""`modelserve render`: a deployable serveConfigV2, writing only its own files, --check and --dry-run.

What the rendered objects hold is tests/unit/test_manifests.py.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cli import kube
from serve_app.cli import render as cli_render
from serve_app.cli.deploy_settings import GIB
from serve_app.cli.serve_file import parse_serve_config
from tests.support.manifests import (
    KUBERAY,
    SERVE_CONFIG,
    model,
    needs_real_config,
    serve_config,
    write_inputs,
)


def run_cli(*argv: str | Path) -> int:
    """Run `render` through argparse exactly as serve_app/cli.py registers it."""
    parser = argparse.ArgumentParser(prog="modelserve")
    cli_render.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


@needs_real_config
def test_committed_serve_config_v2_is_the_deployable_serve_config() -> None:
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(deployed)
    assert deployed["http_options"]["host"] == "0.0.0.0" and deployed["http_options"]["port"] == 8000
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    ingress = deployed["applications"][0]["args"]["ingress"]
    assert ingress.pop("usage") == {"bucket": "models"}  # usage goes to the deployment's bucket (deploy.yaml)
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
