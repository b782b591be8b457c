"""Replica deaths of each model, from Ray's actor table: the crash loop that Serve reports as healthy.

Serve replaces a replica whose process dies and calls the deployment HEALTHY again as soon as the
new one has loaded, so a model whose replicas die on every request (a segfault in the engine, an
out-of-memory kill) looks fine in `serve status` while every call fails. Ray keeps each dead actor
with its cause and its worker's log: several recent deaths of a model's replicas make the model
`failed`, with the tail of the last dead worker's error output as the reason.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve.modelserve.crash_watch")

CRASH_WINDOW_S = 120.0  # deaths older than this are forgotten: a model recovers without an operator
CRASH_THRESHOLD = 3  # deaths within the window that make a crash loop
CHECK_INTERVAL_S = 5.0  # how often the actor table is read (one state-API call per model)
# Ways a worker dies on its own. Serve's own stops (downscaling, redeploys) end replicas by
# ray.kill or an intended exit, which are not crashes.
_CRASH_REASONS = {"WORKER_DIED", "OUT_OF_MEMORY"}
_TAIL_LINES = 12
_SIGNAL_LINE = re.compile(r"\*\*\* SIG[A-Z]+ received|^PC: @|Fatal Python error|MemoryError")
_FATAL_START = re.compile(r"^\*\*\* SIG[A-Z]+ received|Fatal Python error|MemoryError")
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


@dataclass(frozen=True)
class CrashReport:
    """A model's replica deaths within the window, and what the last one left on stderr."""

    deaths: int
    reason: str = ""
    error_tail: tuple[str, ...] = ()

    @property
    def crash_looping(self) -> bool:
        return self.deaths >= CRASH_THRESHOLD


def replica_class_name(app: str, deployment: str) -> str:
    """How Ray names a Serve replica actor's class (`ServeReplica:<app>:<deployment>`)."""
    return f"ServeReplica:{app}:{deployment}"


class CrashWatch:
    """Counts each model's replica crashes over a sliding window, from Ray's table of dead actors.

    Ray does not record when an actor died, so a death counts from when this watch first saw it.
    Deaths already in the table at the watch's first read are history (an ingress that restarts
    does not see an old loop as a new one); a model deployed later starts with none.
    """

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, float]] = {}  # model -> dead actor id -> first seen (monotonic), -inf: old
        self._tails: dict[str, tuple[str, tuple[str, ...]]] = {}  # model -> (actor id, its stderr tail)
        self._primed = False

    def read_all(self, deployments: dict[str, str]) -> dict[str, CrashReport | Exception]:
        """Each model's (application -> deployment) crashes in the last CRASH_WINDOW_S s; blocking state-API calls."""
        reports: dict[str, CrashReport | Exception] = {}
        for app, deployment in deployments.items():
            try:
                reports[app] = self._read(app, deployment, history=not self._primed)
            except Exception as exc:  # noqa: BLE001 - one model's failed read must not hide the others
                reports[app] = exc
        self._primed = True
        return reports

    def _read(self, app: str, deployment: str, history: bool) -> CrashReport:
        from ray.util.state import list_actors

        dead = list_actors(
            filters=[("class_name", "=", replica_class_name(app, deployment)), ("state", "=", "DEAD")],
            detail=True, limit=10_000, timeout=10, raise_on_missing_output=False,
        )
        now = time.monotonic()
        seen = self._seen.setdefault(app, {})
        reasons = {}
        for actor in dead:
            if (reason := _crash_reason(actor)) is not None:
                reasons[actor.actor_id] = reason
                seen.setdefault(actor.actor_id, float("-inf") if history else now)
        recent = sorted((when, actor_id) for actor_id, when in seen.items() if now - when <= CRASH_WINDOW_S)
        if not recent:
            return CrashReport(0)
        last_id = recent[-1][1]
        if self._tails.get(app, ("",))[0] != last_id:
            self._tails[app] = (last_id, _error_tail(last_id))
        tail = self._tails[app][1]
        lines = (_strip(line) for line in tail)
        summary = "; ".join(dict.fromkeys(line for line in lines if _SIGNAL_LINE.search(line)))[:400]
        cause = reasons.get(last_id, "WORKER_DIED")
        reason = (
            f"crash loop: {len(recent)} replicas died in the last {CRASH_WINDOW_S:.0f} s "
            f"(last: {cause}{': ' + summary if summary else ''})"
        )
        return CrashReport(len(recent), reason, tail)


def _crash_reason(actor: Any) -> str | None:
    """The death cause's reason if the worker died on its own (crash, OOM kill), else None."""
    context = (actor.death_cause or {}).get("actor_died_error_context") or {}
    reason = str(context.get("reason") or "")
    return reason if reason in _CRASH_REASONS else None


def _strip(line: str) -> str:
    """A stderr line without glog's `[time E pid tid] file:line:` prefix."""
    return _LOG_PREFIX.sub("", line).strip()


def _error_tail(actor_id: str) -> tuple[str, ...]:
    """What the dead replica's worker wrote to stderr as it died: from the fatal signal on, else the last lines."""
    from ray.util.state import get_log

    try:
        text = "".join(get_log(actor_id=actor_id, suffix="err", tail=300, timeout=10))
    except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the death itself is what counts
        logger.info("no error log for dead replica %s: %s", actor_id, exc)
        return ()
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    fatal = next((i for i, line in enumerate(lines) if _FATAL_START.search(_strip(line))), None)
    return tuple(lines[fatal:fatal + _TAIL_LINES] if fatal is not None else lines[-_TAIL_LINES:])
