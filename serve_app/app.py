"""The application builder: `import_path: serve_app.app:build_app` in a Serve config."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.server import ModelServer
from serve_app.config import ConfigError, ModelSpec, parse_app_args
from serve_app.ingress import OpenAIIngress
from serve_app.policy import parse_policy


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` completely, then bind one deployment per model and the ingress holding their handles."""
    app_args = parse_app_args(args)
    models = {spec.name: model_deployment(spec) for spec in app_args.models}
    access = parse_policy(app_args.access, "args.access (policy document)")  # secure default: deny all but admin
    ingress = OpenAIIngress.options(
        user_config=access.model_dump(mode="json") if app_args.access is None else app_args.access,
        **app_args.ingress.deployment.serve_options(),
    )
    return ingress.bind(app_args.model_dump(mode="json", exclude={"access"}), models)


def model_deployment(spec: ModelSpec) -> Application:
    """The model's Serve deployment; vLLM's (the gpu extra) is imported only when a model uses it."""
    if spec.backend == "vllm":
        try:
            from deployments.vllm_engine import build_vllm_deployment
        except (ImportError, RuntimeError) as exc:  # RuntimeError: e.g. torchvision built for another torch
            raise ConfigError(
                f"model {spec.name!r} uses backend vllm, but Ray Serve LLM/vLLM does not import here ({exc}); "
                "install the gpu extra: pip install 'modelserve[gpu]'"
            ) from None
        return build_vllm_deployment(spec)
    return ModelServer.options(name=spec.deployment_name, **spec.deployment.serve_options()).bind(
        spec.model_dump(mode="json")
    )
