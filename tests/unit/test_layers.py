"""Imports flow one way: serve_app.cli -> serve_app -> deployments, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def imported_after(modules: list[str], prefix: str) -> list[str]:
    """The modules under `prefix` that importing `modules` loads, in a fresh interpreter."""
    code = (
        f"import importlib, json, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m == {prefix!r} or m.startswith({prefix + '.'!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_deployments_import_nothing_of_serve_app() -> None:
    assert imported_after(DEPLOYMENTS, "serve_app") == []


def test_the_serve_app_imports_nothing_of_the_cli() -> None:
    assert imported_after(APP, "serve_app.cli") == []


def test_the_package_ships_every_subpackage() -> None:
    """What `pip install .` (the KubeRay image) installs: every folder of code, found by pyproject's include."""
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    on_disk = {str(init.parent.relative_to(ROOT)).replace("/", ".")
               for top in ("serve_app", "deployments") for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= set(find_packages(str(ROOT), include=include)), on_disk
