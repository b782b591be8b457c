"""The checks the ingress runs per request, against the active policy document (policy.py).

`AccessGate` holds them, in request order: `authenticate` (401, run by AccessMiddleware before routing),
then from the ingress handlers `allows` (404, the same answer as for a model that does not exist),
`max_tokens` (clamp or 400) and `admit` (429). The request's `RequestAccount` collects usage until the
response ends and AccessMiddleware settles it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from opentelemetry import trace

from deployments.api import GenerationChunk, GenerationRequest
from deployments.strict import ConfigError
from serve_app.access.authn import Authenticator, AuthError, Principal
from serve_app.access.limiter_actor import Quota
from serve_app.access.limiter_client import Admission, LimiterUnavailable, SharedLimiter
from serve_app.access.policy import PolicyDocument, TenantPolicy, parse_policy, policy_revision
from serve_app.access.quotas import QuotaGate
from serve_app.access.usage_client import UsageBook
from serve_app.ingress.errors import RETRY_AFTER_S
from serve_app.ingress.protocol import OpenAIError

logger = logging.getLogger("ray.serve.modelserve.policy")

ANONYMOUS = Principal(tenant="anonymous", roles=frozenset({"admin"}), subject="anonymous")
CHARS_PER_TOKEN = 4


def reset_duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


def rate_limit_headers(requests: Quota | None, tokens: Quota | None) -> dict[str, str]:
    headers = {}
    for kind, quota in (("requests", requests), ("tokens", tokens)):
        if quota is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(quota.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(quota.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = reset_duration(quota.reset_s)
    return headers


def estimated_tokens(request: GenerationRequest) -> int:
    """What a request may cost before it runs: prompt characters / 4 plus the completion budget of its n choices."""
    chars = len(request.prompt or "") + sum(len(m.get("content", "")) for m in request.messages or ())
    sampling = request.sampling
    return math.ceil(chars / CHARS_PER_TOKEN) + (sampling.max_tokens or sampling.max_tokens_cap or 0) * sampling.n


class RequestAccount:
    """One authenticated request: who, which model, its rate-limit lease and the usage seen so far."""

    def __init__(self, principal: Principal, policy: TenantPolicy, revision: str) -> None:
        self.principal = principal
        self.policy = policy
        self.revision = revision
        self.model: str | None = None
        self.client_ids: dict[str, str] = {}  # the request's `user` / `safety_identifier`, for the audit line
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.admission: Admission | None = None
        self.settlers: list[Callable[[], None]] = []  # more end-of-request bookkeeping (quotas.py)
        self._limiter: SharedLimiter | None = None

    def hold(self, admission: Admission, limiter: SharedLimiter) -> None:
        """Keep the limiter's answer (for the rate-limit headers) and, if admitted, the lease to settle."""
        self.admission = admission
        self._limiter = limiter if admission.admitted else None

    def record(self, chunk: GenerationChunk) -> None:
        # n choices: chunks carry the running total of all of them, not always in order
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, max(self.completion_tokens, chunk.completion_tokens)

    def rate_headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers of an admitted request (a refusal carries its own on the 429)."""
        if self.admission is None or not self.admission.admitted:
            return {}
        return rate_limit_headers(self.admission.requests, self.admission.tokens)

    def settle(self) -> None:
        """Close the lease with the real usage; called once the response has ended, however it ended."""
        if self._limiter is not None and self.admission is not None and self.admission.lease is not None:
            self._limiter.release(self.admission.lease, self.prompt_tokens + self.completion_tokens)
        self._limiter = None
        settlers, self.settlers = self.settlers, []
        for settle in settlers:
            settle()


async def authenticated(request: Request) -> RequestAccount:
    """FastAPI dependency: the caller's account, which AccessMiddleware authenticated before routing.

    Async so FastAPI calls it on the event loop: a plain `def` dependency costs a worker-thread hop.
    """
    return request.state.account


Caller = Annotated[RequestAccount, Depends(authenticated)]


@dataclass(frozen=True)
class ActivePolicy:
    document: PolicyDocument
    authenticator: Authenticator | None
    revision: str


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class AccessGate:
    """The ingress's access checks, against the policy of the latest `configure` (swapped atomically)."""

    def __init__(self, limiter_name: str, usage: UsageBook, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.NoOpTracer()  # spans `auth` and `policy` when the ingress traces
        self._limiter = SharedLimiter(limiter_name)
        self._quotas = QuotaGate(usage)
        self._active: ActivePolicy | None = None

    def configure(self, user_config: Mapping[str, Any] | None) -> None:
        """Apply a policy document (the ingress user_config), swapping it in atomically.

        At replica start a bad document raises (no replica serves without a policy). On a live reload it
        is logged and the previous policy stays in force: a typo must not take the running ingress down.
        """
        revision = policy_revision(user_config)
        try:
            document = parse_policy(user_config, f"policy {revision} (ingress user_config)")
            authenticator = Authenticator(document.auth, document.api_key_principals()) if document.enabled else None
        except (ConfigError, ValueError, OSError) as exc:
            if self._active is None:
                raise
            logger.error(
                "policy %s REJECTED, still enforcing %s (a replica starting now would fail): %s",
                revision,
                self._active.revision,
                str(exc).replace("\n", "; "),
            )
            return
        self._active = ActivePolicy(document, authenticator, revision)
        if document.enabled and any(not t.limits().unlimited for t in [document.default, *document.tenants.values()]):
            self._limiter.connect()
        if not document.enabled:
            logger.warning("access control is DISABLED: every caller is an anonymous admin")
        logger.info("access policy %s applied: tenants %s", revision, sorted(document.tenants))

    async def authenticate(self, authorization: str | None) -> RequestAccount:
        """Who is calling, from the Authorization header (401 otherwise), with their tenant's policy."""
        with self._tracer.start_as_current_span("auth", record_exception=False, set_status_on_exception=False):
            return await self._authenticate(authorization)

    async def _authenticate(self, authorization: str | None) -> RequestAccount:
        active = self._active
        if active is None:
            raise OpenAIError(503, "Access policy not loaded yet.", type="server_error", code="not_ready")
        if active.authenticator is None:
            principal = ANONYMOUS
        else:
            try:
                principal = await active.authenticator.authenticate(authorization)
            except AuthError as exc:
                raise unauthorized(str(exc)) from None
        return RequestAccount(principal, active.document.tenant(principal.tenant), active.revision)

    @staticmethod
    def allows(account: RequestAccount, model: str) -> bool:
        return account.principal.is_admin or account.policy.allows(model)

    @staticmethod
    def max_tokens(account: RequestAccount, requested: int | None) -> int | None:
        """The request's max_tokens within the tenant cap (clamped or refused above it); None if it set none.

        An unset max_tokens stays unset: the model's default_max_tokens applies, bounded by the cap.
        """
        cap = account.policy.max_tokens
        if cap is None or requested is None or requested <= cap:
            return requested
        if account.policy.over_max_tokens == "reject":
            raise OpenAIError(
                400,
                f"max_tokens is {requested}, above this tenant's limit of {cap}.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        return cap

    async def admit(self, account: RequestAccount, request: GenerationRequest) -> None:
        """Reserve the tenant's and key's token quotas, take the tenant's request/token/concurrency allowance in
        the shared limiter, or answer 429."""
        with self._tracer.start_as_current_span("policy", record_exception=False, set_status_on_exception=False):
            await self._admit(account, request)

    async def _admit(self, account: RequestAccount, request: GenerationRequest) -> None:
        active = self._active
        if active is not None and active.document.enabled:
            scopes = active.document.quota_scopes(account.principal)
            await self._quotas.admit(account, scopes, estimated_tokens(request))
        limits = account.policy.limits()
        if limits.unlimited or self._active is None or not self._active.document.enabled:
            return
        try:
            admission = await self._limiter.acquire(account.principal.tenant, limits, estimated_tokens(request))
        except LimiterUnavailable as exc:
            logger.error("rate limiter %s unavailable: %s", self._limiter.name, exc)
            raise OpenAIError(
                503,
                "Rate limiting is temporarily unavailable. Retry shortly.",
                type="server_error",
                code="rate_limiter_unavailable",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None
        account.hold(admission, self._limiter)
        if not admission.admitted:
            what = {"requests": "requests per minute", "tokens": "tokens per minute"}.get(
                admission.exceeded or "", "concurrent requests"
            )
            retry_after = str(max(1, math.ceil(admission.retry_after_s)))
            headers = {"Retry-After": retry_after, **rate_limit_headers(admission.requests, admission.tokens)}
            message = f"Rate limit reached for tenant '{account.principal.tenant}' on {what}. Retry later."
            kind = "tokens" if admission.exceeded == "tokens" else "requests"
            raise OpenAIError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)
