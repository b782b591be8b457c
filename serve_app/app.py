"""The application builders of a Serve config: the ingress (`serve_app.app:build_app`) and one
application per model (`serve_app.app:build_model_app`).

Serve versions every deployment of an application by the application's args, so each model
lives in an application of its own, named after the model: `serve deploy` adds, changes or
removes one model without restarting the others, and the ingress finds models by name.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.model_server import ModelServer
from deployments.prefix_router import request_router_config
from deployments.spec import ModelSpec
from deployments.strict import ConfigError
from serve_app.access.policy import parse_policy
from serve_app.config import (
    INGRESS_DEPLOYMENT,
    INGRESS_IMPORT_PATH,
    MODEL_IMPORT_PATH,
    parse_ingress_args,
    parse_model_args,
)
from serve_app.ingress.routes import OpenAIIngress


def build_app(args: dict[str, Any]) -> Application:
    """The ingress: auth, policy and the OpenAI routes, in front of every model application."""
    ingress_args = parse_ingress_args(args)
    access = parse_policy(ingress_args.access, "args.access (policy document)")  # secure default: deny all but admin
    ingress = OpenAIIngress.options(
        user_config=access.model_dump(mode="json") if ingress_args.access is None else ingress_args.access,
        **ingress_args.ingress.deployment.serve_options(),
    )
    return ingress.bind(ingress_args.model_dump(mode="json", exclude={"access"}))


def build_model_app(args: dict[str, Any]) -> Application:
    """One model's application (name it after the model, `route_prefix: null`), validated completely first."""
    return model_deployment(parse_model_args(args))


def model_deployment(spec: ModelSpec) -> Application:
    """The model's Serve deployment; vLLM's (the gpu extra) is imported only when a model uses it."""
    if spec.backend == "vllm":
        try:
            from deployments.vllm.server import build_vllm_deployment
        except (ImportError, RuntimeError) as exc:  # RuntimeError: e.g. torchvision built for another torch
            raise ConfigError(
                f"model {spec.name!r} uses backend vllm, but Ray Serve LLM/vLLM does not import here ({exc}); "
                "install the gpu extra: pip install 'modelserve[gpu]'"
            ) from None
        return build_vllm_deployment(spec)
    router = request_router_config(spec.routing, spec.engine.prefix_cache == "shared")
    options = spec.deployment.serve_options() | ({"request_router_config": router} if router else {})
    return ModelServer.options(name=spec.deployment_name, **options).bind(spec.model_dump(mode="json"))


def run_targets(applications: list[dict[str, Any]]) -> list[serve.RunTarget]:
    """Serve config `applications` as `serve.run_many` targets, for running them from Python (tests, benches).

    The ingress's policy override (its deployment's `user_config`) travels as `args.access`.
    """
    targets = []
    for application in applications:
        args = dict(application.get("args") or {})
        if application["import_path"] == INGRESS_IMPORT_PATH:
            overrides = {d.get("name"): d for d in application.get("deployments") or []}
            if "user_config" in overrides.get(INGRESS_DEPLOYMENT, {}):
                args["access"] = overrides[INGRESS_DEPLOYMENT]["user_config"]
            app = build_app(args)
        elif application["import_path"] == MODEL_IMPORT_PATH:
            app = build_model_app(args)
        else:
            raise ConfigError(f"application {application.get('name')!r}: not a modelserve application")
        targets.append(serve.RunTarget(app, name=application["name"], route_prefix=application.get("route_prefix")))
    return targets
