"""The OpenAI-compatible ingress: the only door to the model deployments.

Requests are validated by the protocol models, turned into engine-neutral
`GenerationRequest`s and sent to the model's deployment handle. Every failure leaves as
an OpenAI error object with a meaningful status; nothing answers a bare 500.
"""


import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api import GenerationChunk, GenerationRequest, SamplingParams
from deployments.spec import model_deployment_name
from deployments.tool_use import ToolUse
from serve_app.access.envelope import AccessMiddleware
from serve_app.access.gate import AccessGate, Caller, MeteredStream, RequestAccount
from serve_app.config import INGRESS_DEPLOYMENT, IngressArgs
from serve_app.ingress.choices import Choices, chat_logprobs, completion_logprobs
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
    FAILED_MODEL_RETRY_AFTER_S,
    document_errors,
    install_error_handlers,
    model_error,
)
from serve_app.ingress.generation_fields import generation_options
from serve_app.ingress.metrics import IngressMetrics
from serve_app.ingress.protocol import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    ModelStatus,
    OpenAIError,
    SamplingFields,
    new_id,
    now,
)
from serve_app.ingress.request_fields import audit_identifiers, check_fields
from serve_app.ingress.request_limits import SizeGate
from serve_app.ingress.status import StatusCache
from serve_app.ingress.tool_calls import StreamedReply, engine_message, reply, tool_use

logger = logging.getLogger("modelserve.ingress")

MISSING_MODEL_RECHECK_S = 0.5

app = FastAPI(title="modelserve", description="OpenAI-compatible LLM serving on Ray Serve.")
app.add_middleware(AccessMiddleware)  # authenticates every route but /health, settles limits, audits
app.add_middleware(CorsGate)  # outside it: browsers' preflights carry no credentials
app.add_middleware(SizeGate)  # outermost: an oversized request costs nothing, not even authentication
install_error_handlers(app)
document_errors(app)


PLACEMENT_TIMEOUT_S = 2.0  # the admin status does not wait for a model at zero to wake up


def sampling_params(body: SamplingFields, max_tokens: int | None, cap: int | None) -> SamplingParams:
    return SamplingParams(
        **generation_options(body),  # type: ignore[arg-type]
        max_tokens=max_tokens,
        max_tokens_cap=cap,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(body.stop_list()),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


def sse(payload: BaseModel) -> str:
    """One server-sent event; the protocol models decide which empty fields the schema wants omitted."""
    return f"data: {payload.model_dump_json()}\n\n"


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class OpenAIIngress:
    """Routes OpenAI requests to per-model deployments by the `model` field."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._args = IngressArgs.model_validate(args)
        self._handles: dict[str, DeploymentHandle] = {}
        self._created = now()
        self._access = AccessGate(limiter_name=f"modelserve-limits:{serve.get_replica_context().app_name}")
        self._metrics = IngressMetrics()
        self._status = StatusCache(on_crashes=self._metrics.record_crashes)
        app.state.access_gate = self._access
        app.state.cors = self._args.ingress.cors
        app.state.request_limits = self._args.ingress.limits
        app.state.metrics = self._metrics

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
        if not account.principal.is_admin:
            raise OpenAIError(403, "This endpoint needs the admin role.", type="permission_error",
                              code="permission_denied")
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

    async def _placement(self, model: str) -> dict[str, Any] | None:
        """What one running replica of the model reports about its hardware use (None: no replica answered)."""
        handle = serve.get_deployment_handle(model_deployment_name(model), app_name=model)
        try:
            return await asyncio.wait_for(handle.placement.remote(), PLACEMENT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - at zero, starting, failed, or a backend without the method
            return None

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, account: Caller) -> Any:
        check_fields(body)
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        request = GenerationRequest(
            request_id=new_id("chatcmpl"),
            sampling=sampling_params(
                body, self._access.max_tokens(account, body.token_limit()), account.policy.max_tokens
            ),
            messages=tuple(engine_message(m) for m in body.messages),
            tools=tool_use(body),
        )
        if request.tools is not None and request.sampling.n > 1:
            raise OpenAIError(400, "n > 1 with tools is not supported: send one request per choice.", param="n",
                              code="unsupported_parameter")
        await self._access.admit(account, request)
        first, stream = await self._open(model, status, request, account)
        sampling = request.sampling
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events(request.request_id, model, first, stream, include_usage, sampling, request.tools)
            return self._sse_response(events)
        choices = await self._collect(model, first, stream, sampling.n)
        return ChatCompletionResponse(
            id=request.request_id,
            created=now(),
            model=model,
            choices=[
                ChatCompletionChoice(
                    index=index, message=AssistantMessage(content=content, tool_calls=calls), finish_reason=finish,
                    logprobs=None if sampling.logprobs is None else chat_logprobs(tuple(choice.logprobs)),
                )
                for index, choice in enumerate(choices.items)
                for content, calls, finish in [reply(choice.text, choice.finish_reason, request.tools)]
            ],
            usage=choices.usage(),
        )

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, account: Caller) -> Any:
        check_fields(body)
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        prompt = body.prompt if isinstance(body.prompt, str) else str(body.prompt[0])  # one string: checked
        request = GenerationRequest(
            request_id=new_id("cmpl"),
            sampling=sampling_params(
                body, self._access.max_tokens(account, body.token_limit()), account.policy.max_tokens
            ),
            prompt=prompt,
        )
        await self._access.admit(account, request)
        first, stream = await self._open(model, status, request, account)
        prefix, sampling = prompt if body.echo else "", request.sampling
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._completion_events(request.request_id, model, prefix, first, stream, include_usage, sampling)
            return self._sse_response(events)
        choices = await self._collect(model, first, stream, sampling.n)
        return CompletionResponse(
            id=request.request_id,
            created=now(),
            model=model,
            choices=[
                CompletionChoice(
                    index=index, text=prefix + choice.text, finish_reason=choice.finish_reason,
                    logprobs=None if sampling.logprobs is None else completion_logprobs(tuple(choice.logprobs), 0),
                )
                for index, choice in enumerate(choices.items)
            ],
            usage=choices.usage(),
        )

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest, account: Caller) -> EmbeddingsResponse:
        account.client_ids = audit_identifiers(body)
        model, status = await self._model(body.model, account)
        request = engine_request(body, new_id("embd"))
        await self._access.admit(account, admission_estimate(request))
        if status.state == "failed":
            raise OpenAIError(503, f"Model '{model}' is unavailable: {status.message}", type="server_error",
                              code="model_unavailable", headers={"Retry-After": "30"})
        self._handle(model)  # makes sure the handle exists
        call = self._handles[model].embed.remote(request)
        try:
            result = await asyncio.wait_for(call, self._args.ingress.first_token_timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            raise model_error(exc, model) from None
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

    def _handle(self, model: str) -> DeploymentHandle:
        """The model application's deployment handle (Serve keeps it pointed at the live replicas)."""
        if model not in self._handles:
            self._handles[model] = serve.get_deployment_handle(model_deployment_name(model), app_name=model)
        return self._handles[model].options(stream=True)

    async def _open(
        self, model: str, status: ModelStatus, request: GenerationRequest, account: RequestAccount
    ) -> tuple[GenerationChunk, MeteredStream]:
        """Start a generation and wait for its first chunk, so early failures get a proper status."""
        if status.state == "failed":  # answer now rather than wait out the timeout
            raise OpenAIError(503, f"Model '{model}' is unavailable: {status.message}", type="server_error",
                              code="model_unavailable", headers={"Retry-After": FAILED_MODEL_RETRY_AFTER_S})
        started = time.perf_counter()
        stream: MeteredStream | None = None
        try:  # Serve may refuse at `.remote()` already (queue full) or at the first chunk
            request = dataclasses.replace(request, submitted_at=time.time())
            stream = MeteredStream(self._handle(model).generate.remote(request), account)
            first = await asyncio.wait_for(stream.__anext__(), self._args.ingress.first_token_timeout_s)
        except BaseException as exc:
            if stream is not None:
                stream.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise model_error(exc, model) from None
        self._metrics.record_first_token(model, time.perf_counter() - started)
        return first, stream

    async def _collect(self, model: str, first: GenerationChunk, stream: MeteredStream, n: int) -> Choices:
        choices = Choices(n)
        choices.add(first)
        try:
            while not choices.done:
                choices.add(await stream.__anext__())
        except StopAsyncIteration:
            pass
        except Exception as exc:
            raise model_error(exc, model) from None
        finally:
            stream.cancel()
        return choices

    @staticmethod
    def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _chunks(
        model: str, first: GenerationChunk, stream: MeteredStream, choices: Choices
    ) -> AsyncIterator[GenerationChunk]:
        """All chunks of a started generation, added to `choices`; cancels the model side however the client leaves."""
        try:
            choices.add(first)
            yield first
            if not choices.done:
                async for chunk in stream:
                    choices.add(chunk)
                    yield chunk
                    if choices.done:
                        break
        except (StopAsyncIteration, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise model_error(exc, model) from None
        finally:
            stream.cancel()

    async def _chat_events(
        self, rid: str, model: str, first: GenerationChunk, stream: MeteredStream, include_usage: bool,
        sampling: SamplingParams, tools: ToolUse | None,
    ) -> AsyncIterator[str]:
        created, output = now(), StreamedReply(tools)

        def frame(index: int, delta: DeltaMessage, finish: str | None = None, chunk: GenerationChunk | None = None
                  ) -> ChatCompletionChunk:
            logprobs = chat_logprobs(chunk.logprobs) if chunk and sampling.logprobs is not None else None
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

        for index in range(sampling.n):
            yield sse(frame(index, DeltaMessage(role="assistant", content="")))
        choices = Choices(sampling.n)
        try:
            async for chunk in self._chunks(model, first, stream, choices):
                if tools is None:  # text as it comes, with its logprobs
                    if chunk.text or chunk.logprobs:
                        yield sse(frame(chunk.index, DeltaMessage(content=chunk.text), chunk=chunk))
                else:  # one choice (n > 1 is refused with tools): possible calls held back until complete
                    for delta in output.feed(chunk.text):
                        yield sse(frame(chunk.index, delta))
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                    if tools is not None:
                        held, finish = output.finish(finish)
                        for delta in held:
                            yield sse(frame(chunk.index, delta))
                    yield sse(frame(chunk.index, DeltaMessage(), finish))
            if include_usage:
                yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=choices.usage()))
        except OpenAIError as exc:
            yield f"data: {exc.body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    async def _completion_events(
        self,
        rid: str,
        model: str,
        prefix: str,
        first: GenerationChunk,
        stream: MeteredStream,
        include_usage: bool,
        sampling: SamplingParams,
    ) -> AsyncIterator[str]:
        created = now()

        def frame(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> CompletionResponse:
            choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
            return CompletionResponse(id=rid, created=created, model=model, choices=[choice])

        if prefix:
            for index in range(sampling.n):
                yield sse(frame(index, prefix))
        choices = Choices(sampling.n)
        try:
            async for chunk in self._chunks(model, first, stream, choices):
                if chunk.text or chunk.finish_reason or chunk.logprobs:
                    choice = choices.items[chunk.index]
                    logprobs = None
                    if sampling.logprobs is not None:
                        logprobs = completion_logprobs(chunk.logprobs, choice.offset)
                    choice.offset += len(chunk.text)
                    yield sse(frame(chunk.index, chunk.text, chunk.finish_reason, logprobs))
            if include_usage:
                yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=choices.usage()))
        except OpenAIError as exc:
            yield f"data: {exc.body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
