"""The real ingress app (routes, middleware, policy, serving) in this process, with stand-ins for what Serve gives it.

Serve supplies the ingress three things: its replica context (the route handlers' `self`), model
deployment handles, and the status of its applications. Here a stand-in replica context holds a
real `OpenAIIngress` built by its own `__init__`/`reconfigure`, `serve.get_deployment_handle`
returns stand-in models that answer like a llama.cpp replica (chunks, engine errors, cancellation),
and the status lists those models as ready. The usage actor's link is a stand-in too: the real one
would start (or join!) a Ray cluster on the first settled request. So the app can be driven
in-process (starlette's TestClient, schemathesis' ASGI transport) in milliseconds per request, with no Ray.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve

from deployments.api import (
    STARTED,
    ContextLengthExceeded,
    GenerationChunk,
    GenerationRequest,
    InvalidGenerationRequest,
    Started,
)
from deployments.embedding import EmbeddingRequest, EmbeddingResult, WrongModelKind
from serve_app.cli.tokens import mint_token
from serve_app.ingress import routes
from serve_app.ingress.responses import ModelStatus
from serve_app.ingress.status import ServeSnapshot

CHAT_MODEL, EMBED_MODEL = "stand-in", "stand-in-embed"
WINDOW_CHARS = 4096  # the stand-in model's context, in prompt characters
SLOTS = 4  # sequences one replica decodes at once (n above it is refused, as by llama.cpp replicas)
MAX_CHUNKS = 3  # the stand-in stops after this many tokens, so even max_tokens = 2^31 answers at once
DIMENSIONS = 8
POLICY = {
    "auth": {"algorithms": ["HS256"]},
    "default": {"models": []},
    "tenants": {"fuzz": {"models": ["*"], "max_tokens": 4096, "over_max_tokens": "clamp"}},
}


class StandInStream:
    """What `handle.options(stream=True).generate.remote(request)` gives: STARTED, chunks of every choice, the end."""

    def __init__(self, request: GenerationRequest, model: StandInModel) -> None:
        self._chunks = self._generate(request)
        self._model = model
        self.closed = False
        model.open_streams += 1

    def _generate(self, request: GenerationRequest) -> Iterator[GenerationChunk | Started]:
        yield STARTED  # as ModelServer does: the request has a slot; the engine's chunks or its error follow
        sampling = request.sampling
        text = request.prompt if request.messages is None else "".join(str(m.get("content")) for m in request.messages)
        param = "prompt" if request.messages is None else "messages"
        if sampling.n > SLOTS:
            raise InvalidGenerationRequest(f"n is {sampling.n}, but a replica decodes at most {SLOTS}", param="n")
        if len(text or "") >= WINDOW_CHARS:
            raise ContextLengthExceeded(f"The prompt is longer than this model's {WINDOW_CHARS} characters.", param)
        budget = min(sampling.max_tokens or MAX_CHUNKS, MAX_CHUNKS)
        prompt_tokens = 1 + len(text or "") // 4
        for step in range(1, budget + 1):
            for index in range(sampling.n):
                finish = ("length" if sampling.max_tokens == budget else "stop") if step == budget else None
                yield GenerationChunk(" ok", prompt_tokens, step, finish, index=index)

    def __aiter__(self) -> StandInStream:
        return self

    async def __anext__(self) -> GenerationChunk | Started:
        await asyncio.sleep(0)
        if self.closed:
            raise StopAsyncIteration
        try:
            return next(self._chunks)
        except StopIteration:
            self.cancel()
            raise StopAsyncIteration from None
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            self._model.open_streams -= 1


@dataclass
class StandInModel:
    """A model deployment's handle: `generate` streams, `embed` and `placement` answer once."""

    embedding: bool = False
    open_streams: int = 0  # generations started and neither finished nor cancelled: must end at 0
    calls: list[str] = field(default_factory=list)

    def options(self, **_: Any) -> StandInModel:
        return self

    @property
    def generate(self) -> SimpleNamespace:
        def remote(request: GenerationRequest) -> StandInStream:
            self.calls.append("generate")
            if self.embedding:
                raise WrongModelKind("This model serves embeddings only.", param="model")
            return StandInStream(request, self)

        return SimpleNamespace(remote=remote)

    @property
    def embed(self) -> SimpleNamespace:
        async def remote(request: EmbeddingRequest) -> EmbeddingResult:
            self.calls.append("embed")
            if not self.embedding:
                raise WrongModelKind("This model generates text; it serves no embeddings.", param="model")
            vector = struct.pack(f"<{DIMENSIONS}f", 1.0, *[0.0] * (DIMENSIONS - 1))
            tokens = sum(len(item) for item in request.inputs)
            return EmbeddingResult(tuple(vector for _ in request.inputs), tokens)

        return SimpleNamespace(remote=remote)

    @property
    def placement(self) -> SimpleNamespace:
        async def remote() -> dict[str, Any]:
            return {"slots": SLOTS, "busy_slots": self.open_streams}

        return SimpleNamespace(remote=remote)


class StandInStatus:
    """The ingress's StatusCache as Serve would fill it: both stand-in models ready with one replica."""

    def __init__(self, on_crashes: Any = None) -> None:
        ready = ModelStatus(state="ready", running_replicas=1)
        self._snapshot = ServeSnapshot({CHAT_MODEL: ready, EMBED_MODEL: ready}, ready)

    async def snapshot(self, max_age_s: float | None = None) -> ServeSnapshot:
        return self._snapshot

    async def cached(self) -> ServeSnapshot:
        return self._snapshot


class StandInUsageBook:
    """The usage actor's link (usage_client.UsageBook) as the stand-in policy uses it: it sets no quotas, so
    the ingress only settles each request's usage, kept here to inspect."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, str, str, int, int]] = []  # tenant, key, model, prompt, completion

    def settle(self, reservation: str | None, tenant: str, key: str, model: str, prompt: int, completion: int) -> None:
        self.settled.append((tenant, key, model, prompt, completion))


@dataclass
class InProcessIngress:
    """The app to call, the tokens to call it with, and the stand-in models to inspect."""

    app: Any
    models: dict[str, StandInModel]
    usage: StandInUsageBook
    token: str
    admin_token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def open_streams(self) -> int:
        return sum(model.open_streams for model in self.models.values())


@contextmanager
def ingress_in_process(monkeypatch: pytest.MonkeyPatch, **ingress: Any) -> Iterator[InProcessIngress]:
    """The ingress replica of `routes.app`, built as Serve builds it, with `ingress` settings (IngressSettings)."""
    secret = os.urandom(32).hex()
    monkeypatch.setenv("MODELSERVE_JWT_SECRET", secret)
    models = {CHAT_MODEL: StandInModel(), EMBED_MODEL: StandInModel(embedding=True)}
    wrapper = routes.OpenAIIngress.func_or_class  # Serve's ASGI wrapper around the ingress class
    replica = wrapper.__new__(wrapper)
    context = SimpleNamespace(app_name="modelserve", servable_object=replica)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(serve, "get_deployment_handle", lambda _deployment, app_name: models[app_name])
    # Serve froze a copy of the routes module's globals (and of its app) with the class: patch that copy.
    frozen_globals = wrapper.__mro__[1].__init__.__globals__
    monkeypatch.setitem(frozen_globals, "StatusCache", StandInStatus)
    usage = StandInUsageBook()
    monkeypatch.setitem(frozen_globals, "UsageBook", lambda _name, _settings: usage)
    saved_state = dict(wrapper_state := replica_app_state(wrapper))  # an outer in-process ingress's, if any
    loop = asyncio.new_event_loop()  # the replica's own, for its start and its shutdown
    ingress.setdefault("max_queue_wait_s", 30)  # these tests are not about the deadline; a busy CI machine is slow
    loop.run_until_complete(replica.__init__({"ingress": ingress}))
    loop.run_until_complete(replica._run_asgi_lifespan_startup())
    replica.reconfigure(POLICY)
    try:
        yield InProcessIngress(replica.app, models, usage, mint_token(secret, "fuzz", [], 600),
                               mint_token(secret, "ops", ["admin"], 600))
    finally:
        loop.run_until_complete(replica.__del__())  # Serve's wrapper shuts the app's lifespan down
        loop.close()
        wrapper_state.clear()
        wrapper_state.update(saved_state)


def replica_app_state(wrapper: type) -> dict[str, Any]:
    """The state of the app Serve froze with the class: one per process, shared by nested in-process ingresses."""
    return wrapper.__mro__[1].__init__.__globals__["app"].state._state
