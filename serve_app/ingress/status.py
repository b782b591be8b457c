"""Which models Serve runs and where each is in its lifecycle (ready, scaling, at zero, starting, failed).

The ingress routes by this and shows it in /v1/models and the admin status. `serve.status()`
is a controller round trip of ~17 ms (the controller builds every application's details), so
the answer is kept for a couple of seconds. Generation requests never wait for it once it is
known: they take the cached answer and renew it in the background (only a model the cache
does not hold is looked up at once). /v1/models and the admin status wait for a fresh one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray import serve

from deployments.spec import model_deployment_name
from serve_app.config import INGRESS_DEPLOYMENT
from serve_app.ingress.crash_watch import CHECK_INTERVAL_S, CrashReport, CrashWatch
from serve_app.ingress.responses import ModelStatus

logger = logging.getLogger("ray.serve.modelserve.status")

_STARTING = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def classify(status: str, replica_states: dict[str, int], message: str) -> ModelStatus:
    """Turn one Serve deployment overview into the state users care about."""
    running = replica_states.get("RUNNING", 0)
    starting = sum(replica_states.get(s, 0) for s in _STARTING)
    if status == "DEPLOY_FAILED" or (status == "UNHEALTHY" and running == 0):
        state = "failed"
        message = message.strip().splitlines()[-1] if message.strip() else status  # the reason, not the traceback
    elif status == "UNHEALTHY":  # a replica died or failed its health check; Serve routes to the healthy ones
        state = "ready"
    elif running == 0 and starting == 0:
        state = "at_zero"
    elif status in ("UPSCALING", "DOWNSCALING"):
        state = "scaling"
    elif running == 0:
        state = "starting"
    else:
        state = "ready"
    return ModelStatus(state=state, running_replicas=running, starting_replicas=starting, message=message)


@dataclass(frozen=True)
class ServeSnapshot:
    """The models Serve runs (application name = model id) and the ingress's own state."""

    models: dict[str, ModelStatus] = field(default_factory=dict)
    ingress: ModelStatus | None = None
    crashes: dict[str, CrashReport] = field(default_factory=dict)


class StatusCache:
    """Which models exist and their states, renewed from Serve once older than `ttl_s` seconds.

    A model is any application holding the deployment named after it
    (`model_deployment_name`), so `serve deploy` adding or removing a model application is
    all the ingress needs to know.
    """

    def __init__(self, ttl_s: float = 2.0, on_crashes: Callable[[str, CrashReport], None] | None = None) -> None:
        self._ttl_s = ttl_s
        self._fetched_at: float | None = None  # when the snapshot's read began
        self._snapshot = ServeSnapshot()
        self._refresh: asyncio.Task[None] | None = None
        self._crash_watch = CrashWatch()
        self._crashes: dict[str, CrashReport] = {}
        self._crashes_read_at = float("-inf")
        self._on_crashes = on_crashes

    async def snapshot(self, max_age_s: float | None = None) -> ServeSnapshot:
        """A snapshot no older than `max_age_s` (default: the ttl), waiting for a read if the cached one is."""
        if self._age() > (self._ttl_s if max_age_s is None else max_age_s):
            await asyncio.shield(self._start_refresh())  # shared: a caller that goes away does not cancel it
        return self._snapshot

    async def cached(self) -> ServeSnapshot:
        """For the generation path: the cached snapshot at once, renewed in the background past the ttl."""
        if self._fetched_at is None:
            return await self.snapshot()
        if self._age() > self._ttl_s:
            self._start_refresh()
        return self._snapshot

    def _age(self) -> float:
        return float("inf") if self._fetched_at is None else time.monotonic() - self._fetched_at

    def _start_refresh(self) -> asyncio.Task[None]:
        """One read at a time, outside any request's context (Serve cancels a request's Ray calls with it)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._fetch(), context=contextvars.Context())
        return self._refresh

    async def _fetch(self) -> None:
        started = time.monotonic()
        try:
            self._snapshot = await asyncio.to_thread(self._read)
        except Exception as exc:  # noqa: BLE001 - keep serving the last known models
            logger.warning("could not read Serve status: %s", exc)
        self._fetched_at = started

    def _read(self) -> ServeSnapshot:
        own_app = serve.get_replica_context().app_name
        models: dict[str, ModelStatus] = {}
        ingress: ModelStatus | None = None
        for app_name, app in serve.status().applications.items():
            for name, overview in app.deployments.items():
                status = classify(
                    _name(overview.status), {_name(k): v for k, v in overview.replica_states.items()},
                    overview.message,
                )
                if app_name == own_app and name == INGRESS_DEPLOYMENT:
                    ingress = status
                elif app_name != own_app and name == model_deployment_name(app_name):
                    models[app_name] = status
        crashes = self._read_crashes(models)
        for name, report in crashes.items():
            if report.crash_looping:  # the loop's reason says more than Serve's "health check failed"
                models[name] = models[name].model_copy(update={"state": "failed", "message": report.reason})
        return ServeSnapshot(models, ingress, crashes)

    def _read_crashes(self, models: dict[str, ModelStatus]) -> dict[str, CrashReport]:
        """Each model's recent replica deaths, read from Ray every CHECK_INTERVAL_S (a state-API call per model)."""
        if time.monotonic() - self._crashes_read_at >= CHECK_INTERVAL_S:
            self._crashes_read_at = time.monotonic()
            crashes = {}
            for name, report in self._crash_watch.read_all({m: model_deployment_name(m) for m in models}).items():
                if isinstance(report, Exception):  # keep the last known deaths when the state API fails
                    logger.warning("could not read replica deaths of %s: %s", name, report)
                    report = self._crashes.get(name, CrashReport(0))
                crashes[name] = report
                if self._on_crashes is not None:
                    self._on_crashes(name, report)
            self._crashes = crashes
        return {name: report for name, report in self._crashes.items() if name in models}


def _name(value: object) -> str:
    """Serve reports states as str-enums or plain strings depending on the path: normalize to the name."""
    return str(getattr(value, "value", value))
