"""An ingress replica's link to the usage actor (usage_actor.py): reserve quota, settle usage, query it.

Reserving waits for the actor (a quota is only as good as its one truth); settling is fire-and-forget,
made from an empty context like the limiter's calls, so a client disconnect that cancels the request
cannot cancel the call that records what the request used.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from datetime import date
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from serve_app.access.limiter_client import CALL_TIMEOUT_S, LIMITER_NAMESPACE
from serve_app.access.usage import GroupBy, QuotaGrant, QuotaScope
from serve_app.access.usage_actor import UsageLedger
from serve_app.access.usage_store import UsageSettings


class UsageUnavailable(Exception):
    """The usage actor did not answer (or cannot read its store): quota-limited requests are refused."""


class UsageBook:
    def __init__(self, name: str, settings: UsageSettings) -> None:
        self.name = name
        self._settings = settings.model_dump(mode="json")
        self._actor: ray.actor.ActorHandle | None = None

    async def reserve(self, scopes: list[QuotaScope], tokens: int) -> tuple[str, QuotaGrant]:
        """Hold `tokens` against every quota in `scopes`; returns the reservation id to settle with."""
        reservation = uuid.uuid4().hex
        grant = await self._call("reserve", reservation, scopes, tokens)
        return reservation, grant

    def settle(self, reservation: str | None, tenant: str, key: str, model: str, prompt: int, completion: int) -> None:
        try:
            self._submit("settle", reservation, tenant, key, model, prompt, completion)
        except RayActorError:
            self._actor = None

    async def query(self, tenant: str | None, key: str | None, model: str | None, start: date | None,
                    end: date | None, group_by: GroupBy) -> list[dict[str, Any]]:
        return await self._call("query", tenant, key, model, start, end, group_by)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(self._submit(method, *args), CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, asyncio.TimeoutError) as exc:
            self._actor = None
            raise UsageUnavailable(str(exc)) from None

    def _submit(self, method: str, *args: Any) -> ray.ObjectRef:
        return contextvars.Context().run(lambda: getattr(self._handle(), method).remote(*args))

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = UsageLedger.options(
                name=self.name, namespace=LIMITER_NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote(self._settings)
        return self._actor
