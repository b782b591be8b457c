"""Model lifecycle as Serve sees it (ready, scaling, at zero, starting, failed), for /v1/models and admin status.

`serve.status()` is a controller round trip, so the ingress keeps the answer for a
couple of seconds rather than asking on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serve_app.protocol import ModelStatus

logger = logging.getLogger("ray.serve.modelserve.status")

_STARTING = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def classify(status: str, replica_states: dict[str, int], message: str) -> ModelStatus:
    """Turn one Serve deployment overview into the state users care about."""
    running = replica_states.get("RUNNING", 0)
    starting = sum(replica_states.get(s, 0) for s in _STARTING)
    if status in ("DEPLOY_FAILED", "UNHEALTHY"):
        state = "failed"
        message = message.strip().splitlines()[-1] if message.strip() else status  # the reason, not the traceback
    elif running == 0 and starting == 0:
        state = "at_zero"
    elif status in ("UPSCALING", "DOWNSCALING"):
        state = "scaling"
    elif running == 0:
        state = "starting"
    else:
        state = "ready"
    return ModelStatus(state=state, running_replicas=running, starting_replicas=starting, message=message)


class StatusCache:
    """Deployment states of this app, refreshed at most every `ttl_s` seconds."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self._ttl_s = ttl_s
        self._fetched_at = 0.0
        self._states: dict[str, ModelStatus] = {}
        self._lock = asyncio.Lock()

    async def deployments(self) -> dict[str, ModelStatus]:
        async with self._lock:
            if time.monotonic() - self._fetched_at > self._ttl_s:
                try:
                    self._states = await asyncio.to_thread(self._read)
                except Exception as exc:  # noqa: BLE001 - status is advisory; serving must not depend on it
                    logger.warning("could not read Serve status: %s", exc)
                    self._states = {}
                self._fetched_at = time.monotonic()
            return self._states

    @staticmethod
    def _read() -> dict[str, ModelStatus]:
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        if app is None:
            return {}
        return {
            name: classify(
                _name(overview.status), {_name(k): v for k, v in overview.replica_states.items()}, overview.message
            )
            for name, overview in app.deployments.items()
        }


def _name(value: object) -> str:
    """Serve reports states as str-enums or plain strings depending on the path: normalize to the name."""
    return str(getattr(value, "value", value))
