"""The application builder: `import_path: serve_app.app:build_app` in a Serve config."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.server import ModelServer
from serve_app.config import parse_app_args
from serve_app.ingress import OpenAIIngress


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` completely, then bind one deployment per model and the ingress holding their handles."""
    app_args = parse_app_args(args)
    models = {
        spec.name: ModelServer.options(name=spec.deployment_name, **spec.deployment.serve_options()).bind(
            spec.model_dump(mode="json")
        )
        for spec in app_args.models
    }
    ingress = OpenAIIngress.options(**app_args.ingress.deployment.serve_options())
    return ingress.bind(app_args.model_dump(mode="json"), models)
