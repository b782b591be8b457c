"""Imports flow one way: serve_app.cli -> serve_app -> deployments, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DEPLOYMENTS = [
    "deployments",
    "deployments.api",
    "deployments.spec",
    "deployments.settings",
    "deployments.strict",
    "deployments.model_server",
    "deployments.llama_cpp.engine",
    "deployments.llama_cpp.scheduler",
    "deployments.llama_cpp.model",
    "deployments.llama_cpp.context",
    "deployments.llama_cpp.prompt",
    "deployments.llama_cpp.chat_prompt",
    "deployments.llama_cpp.sampling",
    "deployments.llama_cpp.text",
    "deployments.vllm",
    "deployments.weights.cache",
    "deployments.weights.download",
    "deployments.weights.entries",
    "deployments.weights.s3",
    "deployments.weights.source",
]
APP = ["serve_app.app", "serve_app.ingress.routes", "serve_app.access.envelope", "serve_app.access.gate"]


def loaded_under(prefix: str) -> str:
    """A line of code printing the modules under `prefix` loaded so far, as a JSON list."""
    return f"print(json.dumps(sorted(m for m in sys.modules if m == {prefix!r} or m.startswith({prefix + '.'!r}))))\n"


@pytest.fixture(scope="module")
def layers() -> list[list[str]]:
    """In one fresh interpreter: what of serve_app the deployments load, then what of serve_app.cli the app adds.
    The app imports the deployments too, so loading them first changes nothing of what it loads."""
    code = (
        f"import importlib, json, sys\nfor name in {DEPLOYMENTS!r}:\n    importlib.import_module(name)\n"
        f"{loaded_under('serve_app')}"
        f"for name in {APP!r}:\n    importlib.import_module(name)\n"
        f"{loaded_under('serve_app.cli')}"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_deployments_import_nothing_of_serve_app(layers: list[list[str]]) -> None:
    assert layers[0] == []


def test_the_serve_app_imports_nothing_of_the_cli(layers: list[list[str]]) -> None:
    assert layers[1] == []


def test_the_package_ships_every_subpackage() -> None:
    """What `pip install .` (the KubeRay image) installs: every folder of code, found by pyproject's include."""
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    on_disk = {str(init.parent.relative_to(ROOT)).replace("/", ".")
               for top in ("serve_app", "deployments") for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= set(find_packages(str(ROOT), include=include)), on_disk
