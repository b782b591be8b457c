"""Where usage survives restarts: the deployment's S3/MinIO bucket (a local directory for `modelserve up`).

The layout is an append-only log plus snapshots. Every flush of the usage actor writes one object
`<prefix>log/<seq>.jsonl` (the records settled since the last flush, seq increasing by one); every few
flushes `<prefix>snapshot.json` holds all rows through a seq. Loading reads the snapshot and replays
the log objects after it, so a lost snapshot write costs nothing and a lost log write only the records
of one flush interval. Only one writer exists: the single named usage actor.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import botocore.exceptions as boto_errors
from pydantic import Field

from deployments.strict import Strict
from deployments.weights.s3 import make_client
from deployments.weights.source import StorageSettings
from serve_app.access.usage import RowKey, Totals, UsageRecord

SNAPSHOT = "snapshot.json"
LOG = "log/"


class UsageSettings(Strict):
    """Where the usage actor keeps usage and quota state, and how often it writes."""

    bucket: str | None = Field(
        None, description="S3/MinIO bucket for usage (endpoint and keys as for s3:// weights: AWS_* env). "
        "None = the local directory `local_dir`, for a one-machine `modelserve up` only.",
    )
    prefix: str = Field("modelserve-usage/", description="Key prefix inside the bucket (or the directory).")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    local_dir: str = Field("~/.local/share/modelserve/usage", description="Used only when `bucket` is None.")
    flush_interval_s: float = Field(2.0, gt=0, description="Settled usage is written at most this late.")
    snapshot_every: int = Field(30, ge=1, description="Write a snapshot every this many log objects.")


class Objects(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, body: bytes) -> None: ...
    def keys_after(self, prefix: str, after: str) -> list[str]: ...


class S3Objects:
    """Objects in an S3 bucket (boto3); errors propagate, so the actor retries rather than lose usage."""

    def __init__(self, bucket: str, storage: StorageSettings) -> None:
        self.bucket = bucket
        self._client = make_client(storage)

    def get(self, key: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except boto_errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise

    def put(self, key: str, body: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def keys_after(self, prefix: str, after: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                        StartAfter=after)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


class DirObjects:
    """The same objects as files under a directory; each write lands whole (write, then rename)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser()

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.exists() else None

    def put(self, key: str, body: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(body)
        os.replace(partial, path)

    def keys_after(self, prefix: str, after: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        keys = (f"{prefix}{p.name}" for p in folder.iterdir() if not p.name.endswith(".partial"))
        return sorted(k for k in keys if k > after)


def open_objects(settings: UsageSettings) -> Objects:
    if settings.bucket:
        return S3Objects(settings.bucket, settings.storage)
    return DirObjects(settings.local_dir)


class UsageLog:
    """The usage log and snapshots under `prefix` of one object store."""

    def __init__(self, objects: Objects, prefix: str) -> None:
        self._objects = objects
        self._prefix = prefix

    def load(self) -> tuple[dict[RowKey, Totals], int]:
        """All rows (snapshot + the log after it) and the seq the next log object gets."""
        snapshot = json.loads(self._objects.get(self._prefix + SNAPSHOT) or b'{"through": -1, "rows": []}')
        rows = {tuple(row[:4]): Totals(*row[4:]) for row in snapshot["rows"]}
        through = snapshot["through"]
        after = self._log_key(through) if through >= 0 else ""
        for key in self._objects.keys_after(self._prefix + LOG, after):
            through = max(through, int(key.rsplit("/", 1)[1].split(".")[0]))
            for line in (self._objects.get(key) or b"").splitlines():
                record = UsageRecord(**json.loads(line))
                rows.setdefault(record.row, Totals()).add(1, record.prompt_tokens, record.completion_tokens)
        return rows, through + 1  # type: ignore[return-value]

    def append(self, seq: int, records: list[UsageRecord]) -> None:
        self._objects.put(self._log_key(seq), "".join(json.dumps(asdict(r)) + "\n" for r in records).encode())

    def snapshot(self, through: int, rows: dict[RowKey, Totals]) -> None:
        body = {"through": through, "rows": [[*row, *asdict(t).values()] for row, t in sorted(rows.items())]}
        self._objects.put(self._prefix + SNAPSHOT, json.dumps(body).encode())

    def _log_key(self, seq: int) -> str:
        return f"{self._prefix}{LOG}{seq:012d}.jsonl"


def describe_location(settings: UsageSettings) -> str:
    """For logs: where usage goes (never credentials)."""
    if settings.bucket:
        return f"s3://{settings.bucket}/{settings.prefix}"
    return str(Path(settings.local_dir).expanduser() / settings.prefix)


def usage_log(settings: UsageSettings | dict[str, Any]) -> UsageLog:
    settings = settings if isinstance(settings, UsageSettings) else UsageSettings.model_validate(settings)
    return UsageLog(open_objects(settings), settings.prefix)
