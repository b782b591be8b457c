"""Why a model's replica is still starting, told by the replica and read by the ingress.

Serve shows a replica whose constructor is still running only as STARTING (after 30 s, "taking
long to initialize"). A replica waiting for its weights (the store unreachable) says why in
Ray's internal key-value store (the GCS, so any node can read it), one key per replica; the
ingress shows the newest fresh note as the starting model's reason. A replica killed while
waiting leaves its note behind, so notes older than STALE_S are ignored.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

logger = logging.getLogger("ray.serve.modelserve.status")

NAMESPACE = "modelserve-startup"
STALE_S = 60.0  # a waiting replica renews its note at least this often (its backoff is shorter)


class StartupNote:
    """One replica's note about its start; `post` replaces it, `clear` removes it once started (or failed)."""

    def __init__(self, model: str) -> None:
        self._key = f"{model}/{uuid.uuid4().hex}".encode()
        self._posted = False

    def post(self, text: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key, json.dumps({"text": text, "at": time.time()}).encode(), namespace=NAMESPACE)
        self._posted = True

    def clear(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        if self._posted:  # most replicas start without ever waiting: no GCS call for them
            _internal_kv_del(self._key, namespace=NAMESPACE)
            self._posted = False


def read_note(model: str) -> str | None:
    """The newest fresh note of any replica of `model`, None if there is none or the GCS does not answer
    (blocking: GCS calls)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    newest: tuple[float, str] | None = None
    try:
        raws = [_internal_kv_get(key, namespace=NAMESPACE)
                for key in _internal_kv_list(f"{model}/".encode(), namespace=NAMESPACE)]
    except Exception as exc:  # noqa: BLE001 - the note only adds a reason to a model's state
        logger.warning("could not read the startup notes of %s: %s", model, exc)
        return None
    for raw in raws:
        try:
            note = json.loads(raw) if raw else None
        except ValueError:
            note = None
        if note and time.time() - note["at"] <= STALE_S and (newest is None or note["at"] > newest[0]):
            newest = (note["at"], note["text"])
    return newest[1] if newest else None
