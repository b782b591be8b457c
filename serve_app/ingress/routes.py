"""The OpenAI-compatible ingress: the only door to the model deployments. Thin routes.

Each route checks its request (protocol models, request_fields), finds the model (status) and
admits the caller (access.gate); `serving` runs the generation and shapes its answer. Every
failure leaves as an OpenAI error object with a meaningful status (errors); never a bare 500.
"""


import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from deployments.api import GenerationRequest
from deployments.spec import model_deployment_name
from deployments.tracing import Tracing
from serve_app.access.envelope import AccessMiddleware
from serve_app.access.gate import AccessGate, Caller, RequestAccount
from serve_app.access.usage_client import UsageBook
from serve_app.config import INGRESS_DEPLOYMENT, IngressArgs
from serve_app.ingress.cors import CorsGate
from serve_app.ingress.embeddings import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    admission_estimate,
    engine_request,
    response,
    usage_chunk,
)
from serve_app.ingress.errors import (
    document_errors,
    install_error_handlers,
)
from serve_app.ingress.metrics import IngressMetrics
from serve_app.ingress.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, new_id, now
from serve_app.ingress.request_fields import audit_identifiers, check_fields
from serve_app.ingress.request_limits import SizeGate, check_prompt_size
from serve_app.ingress.responses import ModelCard, ModelList, ModelStatus
from serve_app.ingress.serving import (
    Serving,
    chat_events,
    chat_response,
    completion_events,
    completion_response,
    sampling_params,
    sse_response,
)
from serve_app.ingress.status import StatusCache
from serve_app.ingress.tool_calls import engine_message, tool_use
from serve_app.ingress.tracing import TracingMiddleware
from serve_app.ingress.usage_api import UsageParams, UsageReport, usage_report

logger = logging.getLogger("modelserve.ingress")

MISSING_MODEL_RECHECK_S = 0.5

app = FastAPI(title="modelserve", description="OpenAI-compatible LLM serving on Ray Serve.")
app.add_middleware(AccessMiddleware)  # authenticates every route but /health, settles limits, audits
app.add_middleware(TracingMiddleware)  # outside it: the request span covers authentication
app.add_middleware(CorsGate)  # outside it: browsers' preflights carry no credentials
app.add_middleware(SizeGate)  # outermost: an oversized request costs nothing, not even authentication
install_error_handlers(app)
document_errors(app)


PLACEMENT_TIMEOUT_S = 2.0  # the admin status does not wait for a model at zero to wake up


def require_admin(account: RequestAccount) -> None:
    if not account.principal.is_admin:
        raise OpenAIError(403, "This endpoint needs the admin role.", type="permission_error", code="permission_denied")


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class OpenAIIngress:
    """Routes OpenAI requests to per-model deployments by the `model` field."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._args = IngressArgs.model_validate(args)
        self._created = now()
        app_name = serve.get_replica_context().app_name
        usage = UsageBook(f"modelserve-usage:{app_name}", self._args.ingress.usage)
        self._tracing = Tracing(self._args.ingress.tracing, "ingress")
        self._access = AccessGate(limiter_name=f"modelserve-limits:{app_name}", usage=usage,
                                  tracer=self._tracing.tracer)
        self._usage = usage
        self._metrics = IngressMetrics()
        self._serving = Serving(self._args.ingress, self._metrics, self._tracing.tracer)
        self._status = StatusCache(on_crashes=self._metrics.record_crashes)
        app.state.access_gate = self._access
        app.state.cors = self._args.ingress.cors
        app.state.request_limits = self._args.ingress.limits
        app.state.metrics = self._metrics
        app.state.tracing = self._tracing

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The policy document (auth, tenants, limits): applied at start and in place on every `serve deploy`."""
        self._access.configure(user_config)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self, account: Caller) -> ModelList:
        models = (await self._status.snapshot()).models
        allowed = sorted(name for name in models if self._access.allows(account, name))
        return ModelList(data=[self._card(name, models[name]) for name in allowed])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, account: Caller) -> ModelCard:
        return self._card(*await self._model(model_id, account))

    @app.get("/v1/admin/status")
    async def admin_status(self, account: Caller) -> dict[str, Any]:
        """Every model's state and replica counts, whatever the caller's allowlist: admins only."""
        require_admin(account)
        snapshot = await self._status.snapshot()
        names = sorted(snapshot.models)
        placements = await asyncio.gather(*(  # never a call that would wake a model at zero
            self._placement(name) if snapshot.models[name].running_replicas else asyncio.sleep(0) for name in names
        ))
        models = {}
        for name, placement in zip(names, placements):
            crashes = snapshot.crashes.get(name)
            models[name] = {
                "application": name, "deployment": model_deployment_name(name), **snapshot.models[name].model_dump(),
                "replica_deaths": crashes.deaths if crashes else 0,
                "last_crash_output": list(crashes.error_tail) if crashes and crashes.deaths else [],
                "placement": placement,
            }
        return {"models": models, "ingress": (snapshot.ingress or ModelStatus(state="unknown")).model_dump()}

    @app.get("/v1/admin/usage")
    async def admin_usage(self, query: UsageParams, account: Caller) -> UsageReport:
        """Token usage by UTC day or month, tenant, key and model, filtered by the query: admins only."""
        require_admin(account)
        return await usage_report(self._usage, query)

    async def _placement(self, model: str) -> dict[str, Any] | None:
        """What one running replica of the model reports about its hardware use (None: no replica answered)."""
        try:
            return await asyncio.wait_for(self._serving.handle(model).placement.remote(), PLACEMENT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - at zero, starting, failed, or a backend without the method
            return None

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, account: Caller) -> Any:
        check_fields(body)
        check_prompt_size(self._args.ingress.limits, sum(len(m.text()) for m in body.messages), "messages")
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        request = GenerationRequest(
            request_id=new_id("chatcmpl"),
            sampling=sampling_params(
                body, self._access.max_tokens(account, body.token_limit()), account.policy.max_tokens
            ),
            messages=tuple(engine_message(m) for m in body.messages),
            tools=tool_use(body),
            priority=body.priority or 0,
        )
        first, stream = await self._serving.open(model, status, request, account,
                                                 lambda: self._access.admit(account, request))
        sampling = request.sampling
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(chat_events(request.request_id, model, first, stream, include_usage, sampling))
        choices = await self._serving.collect(model, first, stream, sampling.n)
        return chat_response(request.request_id, model, choices, sampling)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, account: Caller) -> Any:
        check_fields(body)
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        prompt = body.prompt if isinstance(body.prompt, str) else str(body.prompt[0])  # one string: checked
        check_prompt_size(self._args.ingress.limits, len(prompt), "prompt")
        request = GenerationRequest(
            request_id=new_id("cmpl"),
            sampling=sampling_params(
                body, self._access.max_tokens(account, body.token_limit()), account.policy.max_tokens
            ),
            prompt=prompt,
            priority=body.priority or 0,
        )
        first, stream = await self._serving.open(model, status, request, account,
                                                 lambda: self._access.admit(account, request))
        prefix, sampling = prompt if body.echo else "", request.sampling
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(completion_events(request.request_id, model, prefix, first, stream, include_usage,
                                                  sampling))
        choices = await self._serving.collect(model, first, stream, sampling.n)
        return completion_response(request.request_id, model, prefix, choices, sampling)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest, account: Caller) -> EmbeddingsResponse:
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        request = engine_request(body, new_id("embd"))
        check_prompt_size(self._args.ingress.limits, sum(len(item) for item in request.inputs), "input")
        await self._access.admit(account, admission_estimate(request))
        result = await self._serving.embed(model, status, request)
        account.record(usage_chunk(result))
        return response(body, model, result)

    async def _model(self, name: str, account: RequestAccount) -> tuple[str, ModelStatus]:
        """The model, if Serve runs it and the caller may use it; both failures get the same 404 (no leaking)."""
        account.model = name
        status = (await self._status.cached()).models.get(name)
        if status is None:  # perhaps deployed a moment ago: look again, at most twice a second
            status = (await self._status.snapshot(max_age_s=MISSING_MODEL_RECHECK_S)).models.get(name)
        if status is None or not self._access.allows(account, name):
            raise OpenAIError(
                404, f"The model '{name}' does not exist or you do not have access to it.",
                param="model", code="model_not_found",
            )
        return name, status

    def _card(self, name: str, status: ModelStatus) -> ModelCard:
        return ModelCard(id=name, created=self._created, owned_by="modelserve", status=status)
