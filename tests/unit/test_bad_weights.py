"""Weights llama.cpp cannot load fail the engine's start with llama.cpp's own reason, not a bare "failed"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.api import EngineUnavailable
from deployments.llama_cpp.engine import BatchedLlamaEngine
from deployments.spec import ModelSpec
from deployments.weights.cache import WeightCache
from tests.support.tiny_gguf import broken_ggufs, write_tiny_llama_gguf

REASONS = {
    "truncated": "data is not within the file bounds, model is corrupted or incomplete",
    "garbage": "failed to read key-value pairs",
    "unknown-arch": "unknown model architecture: 'tinyfoo'",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_unloadable_weights_say_why(kind: str, tmp_path: Path) -> None:
    good = write_tiny_llama_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(broken_ggufs(good)[kind])
    spec = ModelSpec.model_validate({"name": "m", "source": str(bad), "engine": {"n_ctx": 64, "n_threads": 1}})
    engine = BatchedLlamaEngine(spec, WeightCache(tmp_path / "cache"))
    with pytest.raises(EngineUnavailable) as failed:
        asyncio.run(engine.start())
    assert failed.value.message.startswith(f"model 'm': llama.cpp could not load {kind}.gguf: ")
    assert REASONS[kind] in failed.value.message, failed.value.message
