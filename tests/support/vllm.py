"""Shared by the vLLM tests (tests/unit/test_vllm.py, tests/e2e/test_vllm_serving.py): model entries and
the gpu-extra fixtures (a private Ray with a logical GPU, a tiny Hugging Face model in S3).

Run them with the gpu extra: `-m gpu tests/unit/test_vllm.py tests/e2e/test_vllm_serving.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.cli.weights import push_path
from tests.support.s3_server import TEST_CREDENTIALS, MotoS3

# A Hugging Face-format config.json of a tiny llama: enough for vLLM to reach engine start, no weights.
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}


def vllm_model(name: str = "qwen-7b", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "backend": "vllm", "source": "s3://models/qwen-7b/", **overrides}


@pytest.fixture(scope="module")
def gpu_extra() -> None:
    pytest.importorskip("vllm", reason="needs the gpu extra (vLLM)")
    pytest.importorskip("ray.serve.llm", reason="needs the gpu extra (ray[llm])")


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def tiny_hf_source(moto: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face-format model directory pushed to S3 the way operators do (`modelserve push`)."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    (directory / "generation_config.json").write_text(json.dumps({"max_new_tokens": 16}))
    client = moto.client()
    client.create_bucket(Bucket="models")
    client.create_bucket(Bucket="broken")
    client.put_object(Bucket="broken", Key="gguf-only/model.gguf", Body=b"GGUF")
    push_path(client, directory, "s3://models/tiny-hf/")
    return "s3://models/tiny-hf/"


@pytest.fixture(scope="module")
def ray_with_gpu(gpu_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private local Ray advertising one logical GPU; replicas inherit the cache dir and S3 credentials."""
    import ray

    if ray.is_initialized():
        pytest.skip("needs its own local Ray with a logical GPU: run `-m gpu tests/unit/test_vllm.py` on its own")
    cache_dir = tmp_path_factory.mktemp("weight-cache")
    with pytest.MonkeyPatch.context() as env:
        for name, value in TEST_CREDENTIALS.items():
            env.setenv(name, value)
        env.setenv("MODELSERVE_CACHE_DIR", str(cache_dir))
        ray.init(
            address="local",
            num_gpus=1,
            num_cpus=4,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="warning",
        )
        try:
            yield cache_dir
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
