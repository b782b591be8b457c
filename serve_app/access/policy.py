"""The access policy document: who may use which models and how much.

A policy document (a YAML file in policies/, delivered to the ingress as its Serve `user_config`) holds
the auth settings, one `TenantPolicy` per tenant, the policy for unknown tenants (deny by default) and
hashed static API keys. Plain validated data: the checks that apply it per request live in gate.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from deployments.strict import ConfigError, Strict, describe_validation_error
from serve_app.access.authn import Principal
from serve_app.access.keys import AuthSettings
from serve_app.access.limiter_actor import Limits
from serve_app.access.usage import QuotaLimits, QuotaScope

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class TenantPolicy(Strict):
    """What one tenant may use. Limits left unset are unlimited."""

    models: list[str] = Field(default_factory=list, description="Glob patterns (case-sensitive) of usable model ids.")
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on max_tokens; also bounds the model's default_max_tokens when a request sets none."
    )
    over_max_tokens: Literal["clamp", "reject"] = Field("clamp", description="Above the cap: lower it, or answer 400.")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt + completion tokens.")
    max_concurrent_requests: int | None = Field(None, ge=1)
    weight: float = Field(
        1.0, gt=0, le=1000, description="Share of a replica's slots against other tenants waiting for them: a tenant "
        "of weight 2 is admitted twice the tokens of one of weight 1 (fair scheduling)."
    )
    tokens_per_day: int | None = Field(None, ge=1, description="Quota: prompt + completion tokens per UTC day.")
    tokens_per_month: int | None = Field(None, ge=1, description="Quota: tokens per calendar month (UTC).")

    @field_validator("models")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("a model pattern must not be empty")
        return patterns

    def allows(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)

    def limits(self) -> Limits:
        return Limits(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests)

    def quota(self) -> QuotaLimits:
        return QuotaLimits(self.tokens_per_day, self.tokens_per_month)


class ApiKeyEntry(Strict):
    """A static API key for a service account; only its SHA-256 is stored (`modelserve api-key` makes one)."""

    name: str = Field(min_length=1)
    sha256: str
    tenant: str = Field(min_length=1)
    roles: list[str] = Field(default_factory=list)
    tokens_per_day: int | None = Field(None, ge=1, description="This key's own quota, within its tenant's.")
    tokens_per_month: int | None = Field(None, ge=1)

    @property
    def subject(self) -> str:
        return f"api-key:{self.name}"

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_HEX.match(value):
            raise ValueError("must be the 64-character lowercase hex SHA-256 of the key (never the key itself)")
        return value


class PolicyDocument(Strict):
    """One policy file = the ingress `user_config`: auth settings, tenants, the unknown-tenant default, API keys."""

    enabled: bool = Field(True, description="false turns auth, policy and limits off (benchmarks only).")
    auth: AuthSettings = Field(default_factory=AuthSettings)
    default: TenantPolicy = Field(default_factory=TenantPolicy, description="Unknown tenants; no models = deny.")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyDocument:
        if any(not name.strip() for name in self.tenants):
            raise ValueError("tenant names must not be empty")
        hashes = [key.sha256 for key in self.api_keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("api_keys: the same key hash is listed twice")
        return self

    def tenant(self, name: str) -> TenantPolicy:
        return self.tenants.get(name, self.default)

    def quota_scopes(self, principal: Principal) -> list[QuotaScope]:
        """The token quotas a caller's requests count against: its tenant's and, for an API key, the key's."""
        keys = {k.subject: QuotaLimits(k.tokens_per_day, k.tokens_per_month) for k in self.api_keys}
        scopes = [QuotaScope(f"tenant:{principal.tenant}", self.tenant(principal.tenant).quota()),
                  QuotaScope(f"key:{principal.subject}", keys.get(principal.subject, QuotaLimits()))]
        return [scope for scope in scopes if not scope.limits.unlimited]

    def api_key_principals(self) -> dict[str, Principal]:
        return {k.sha256: Principal(k.tenant, frozenset(k.roles), k.subject) for k in self.api_keys}


def parse_policy(data: Any, source: str = "policy") -> PolicyDocument:
    """Validate a policy document, raising ConfigError with one line per bad field."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"invalid {source}: expected a mapping, got {type(data).__name__}")
    try:
        return PolicyDocument.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n" + describe_validation_error(exc, data)) from None


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """A policy file's data, validated (raw, so it is inlined as written)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read policy {path}: {exc}") from None
    parse_policy(data, str(path))
    return data or {}


def policy_revision(data: Mapping[str, Any] | None) -> str:
    """A short content hash, logged with every audit line so operators see which policy answered."""
    return hashlib.sha256(json.dumps(data or {}, sort_keys=True).encode()).hexdigest()[:12]
