"""The `args` of the ingress and model applications of a Serve config, as plain validated data.

A model application's args are a `ModelSpec` (deployments.spec) plus defaults merged under it;
a config with a typo is rejected before any deployment starts (never half an app).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

from pydantic import Field, ValidationError, model_validator

from deployments.settings import DeploymentSettings
from deployments.spec import ModelSpec
from deployments.strict import ConfigError, Strict, describe_validation_error
from deployments.tracing import TracingSettings
from serve_app.access.usage_store import UsageSettings
from serve_app.ingress.cors import CorsSettings
from serve_app.ingress.request_limits import RequestLimits

INGRESS_IMPORT_PATH = "serve_app.app:build_app"
MODEL_IMPORT_PATH = "serve_app.app:build_model_app"
INGRESS_DEPLOYMENT = "ingress"  # the ingress application's deployment: its user_config holds the policy


class IngressDeploymentSettings(DeploymentSettings):
    """The ingress only awaits model streams, so one replica holds many requests; its queue is unbounded."""

    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)


class IngressSettings(Strict):
    """Serve options of the ingress deployment."""

    deployment: IngressDeploymentSettings = Field(default_factory=IngressDeploymentSettings)
    first_token_timeout_s: float = Field(
        120.0, gt=0, description="How long a request may wait for a model to produce anything before 503."
    )
    max_queue_wait_s: float = Field(
        0.5, gt=0, description="How long a request may wait for a free slot of a running model before 503 + "
        "Retry-After; a model scaling up from zero replicas gets `first_token_timeout_s` instead.",
    )
    cors: CorsSettings = Field(default_factory=CorsSettings, description="Web origins allowed to call the API.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request header and body size limits.")
    usage: UsageSettings = Field(default_factory=UsageSettings, description="Where token usage and quota state "
                                 "are kept (the S3/MinIO bucket in a cluster).")
    tracing: TracingSettings = Field(default_factory=TracingSettings, description="OpenTelemetry spans of each "
                                     "request, exported over OTLP/HTTP (off by default).")


class IngressArgs(Strict):
    """The `args` of the ingress application (`serve_app.app:build_app`)."""

    ingress: IngressSettings = Field(default_factory=IngressSettings)
    access: dict[str, Any] | None = Field(
        None,
        description="Initial policy document (serve_app.access.policy) for the ingress user_config. A Serve config "
        "sets it on the ingress deployment's user_config instead (`modelserve policy sync`): changing `args` "
        "restarts the ingress, changing that user_config reloads the policy in place.",
    )


class ModelAppArgs(Strict):
    """The `args` of one model's application (`serve_app.app:build_model_app`).

    One application per model, because Serve versions every deployment of an application by
    the application's args: a model of its own can be added, changed or removed by
    `serve deploy` without restarting the other models' replicas.
    """

    model: ModelSpec
    model_defaults: dict[str, Any] = Field(
        default_factory=dict, description="Merged under the model entry (a YAML anchor shares one block)."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_model_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults, model = data.get("model_defaults") or {}, data.get("model")
        if not isinstance(defaults, dict) or not isinstance(model, dict):
            return data
        return {**data, "model": deep_merge(_without_overridden_alternatives(defaults, model), model)}


# Settings that say the same thing two ways: a model giving one overrides the defaults' other.
_ALTERNATIVES = (
    (("deployment", "num_replicas"), ("deployment", "autoscaling_config")),
    (("engine", "n_threads"), ("deployment", "ray_actor_options", "num_cpus")),
)


def _without_overridden_alternatives(defaults: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Drop from the defaults each setting whose alternative the model sets itself.

    A model choosing `num_replicas` overrides the defaults' `autoscaling_config`, and one choosing
    `engine.n_threads` the defaults' `ray_actor_options.num_cpus` (each also the other way round).
    """
    result = copy.deepcopy(defaults)
    for pair in _ALTERNATIVES:
        for own, inherited in (pair, pair[::-1]):
            if _has_path(model, own) and isinstance(parent := _get_path(result, inherited[:-1]), dict):
                parent.pop(inherited[-1], None)
    return result


def _get_path(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _has_path(data: Any, path: tuple[str, ...]) -> bool:
    parent = _get_path(data, path[:-1])
    return isinstance(parent, dict) and path[-1] in parent


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` onto `base`: nested dicts merge key by key, anything else is replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_ingress_args(args: dict[str, Any] | None) -> IngressArgs:
    """Validate the ingress application's args, raising ConfigError with field-level messages."""
    try:
        return IngressArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError("invalid modelserve ingress config:\n" + describe_validation_error(exc, args)) from None


def parse_model_args(args: dict[str, Any] | None) -> ModelSpec:
    """Validate a model application's args (defaults merged), raising ConfigError with field-level messages."""
    try:
        spec = ModelAppArgs.model_validate(args or {}).model
    except ValidationError as exc:
        entry = (args or {}).get("model")
        name = f" {entry['name']!r}" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else ""
        raise ConfigError(f"invalid config of model{name}:\n" + describe_validation_error(exc, args)) from None
    require_backend_packages(spec)
    return spec


def require_backend_packages(spec: ModelSpec) -> None:
    """One clear error, before anything deploys, when a model's backend is not installed here."""
    if spec.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"model {spec.name!r} uses backend vllm, which needs the gpu extra: "
                          "pip install 'modelserve[gpu]'")
