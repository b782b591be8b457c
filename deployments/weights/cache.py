"""Node-local cache of model weights, shared by every replica process on the node.

Replicas of one model start together on a node, so each source is downloaded once (the others
wait for the entry's download lock and reuse it), written under a temporary name and renamed
only after verification; `meta.json` is written last, so an interrupted fetch is never served.
Sources are local paths, `package://` modules (GGUF chunks assembled once) and `s3://` objects
or prefixes. Locks, leases and eviction within the size budget live in
`deployments.weights.entries`.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import platformdirs

from deployments.weights.entries import (
    CacheEntries,
    CacheEntry,
    CacheFull,
    WeightFetchError,
    read_json,
    write_json,
)
from deployments.weights.retry import RetryPolicy
from deployments.weights.source import Source, SourceError, StorageSettings, parse_source

logger = logging.getLogger("modelserve.weights")

Progress = Callable[[int, int], None]
_Producer = Callable[[Path], "tuple[str, int]"]  # fills an entry dir; returns (relpath, bytes fetched)


@dataclass
class FetchStats:
    """What one fetch cost, for metrics (bytes and seconds downloaded, cache hits)."""

    source: str
    label: str
    cache_hit: bool
    bytes_downloaded: int = 0
    seconds: float = 0.0


@dataclass
class _Job:
    source: str
    label: str
    progress: Progress | None
    started: float = field(default_factory=time.monotonic)

    @property
    def what(self) -> str:
        return f"model {self.label!r}" if self.label else self.source

    def error(self, reason: str, transient: bool = False) -> WeightFetchError:
        who = f"model {self.label!r}: " if self.label else ""
        return WeightFetchError(f"{who}cannot fetch weights from {self.source}: {reason}", transient)


def entry_name(source: str) -> str:
    """Readable, filesystem-safe cache entry name, unique per source.

    The endpoint is not part of it: the same object reached through another URL is reused,
    and a different object under the same URI has another ETag, so it is refreshed.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split("://", 1)[-1]).strip("-.")[:80]
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"


class WeightCache:
    """Fetches weights from paths, `package://` modules and `s3://` URIs into a node-local cache."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        default_root = Path(platformdirs.user_cache_dir("modelserve")) / "weights"
        self.root = Path(root or os.environ.get("MODELSERVE_CACHE_DIR") or default_root)
        budget = os.environ.get("MODELSERVE_CACHE_MAX_BYTES")
        max_bytes = max_bytes if max_bytes is not None else (int(budget) if budget else None)
        self._entries = CacheEntries(self.root, max_bytes)
        self.stats_listeners: list[Callable[[FetchStats], None]] = []
        self.last_stats: FetchStats | None = None
        self.retry = RetryPolicy()

    def fetch(
        self, source: str, storage: StorageSettings | None = None, *, label: str = "", progress: Progress | None = None
    ) -> Path:
        """Local path of the weights for `source` (a file, or a directory for directory sources),
        downloading into the cache if needed."""
        job = _Job(source, label, progress)
        try:
            parsed = parse_source(source)
        except SourceError as exc:
            raise job.error(str(exc)) from None
        if parsed.scheme == "package":
            return self._fetch_package(job, parsed.location)
        if parsed.scheme == "s3":
            return self._fetch_s3(job, parsed, storage or StorageSettings())
        if not parsed.path.exists():
            raise job.error(f"{parsed.path} does not exist")
        self._record(job, cache_hit=True)
        return parsed.path

    def lease(self, path: Path) -> AbstractContextManager[Path]:
        """Hold while the weights at `path` are in use: eviction skips leased entries."""
        return self._entries.lease(path)

    def entries(self) -> list[CacheEntry]:
        """Every cache entry, complete or not, least recently used first."""
        return self._entries.listing()

    def remove(self, source_or_name: str) -> list[str]:
        """Remove the entries with this name or source; refuses entries in use."""
        return self._entries.remove(source_or_name)

    def _fill(self, name: str, fingerprint: dict[str, Any], job: _Job, produce: _Producer) -> Path:
        """The one discipline for every source: serve a matching entry, else produce it once under
        the entry lock (checking again after the wait) and publish it with `meta.json` last."""
        if path := self._cached(name, fingerprint, job):
            return path
        with self._entries.locked(name, job.what, job.source) as entry_dir:
            if path := self._cached(name, fingerprint, job):  # produced by another process meanwhile
                return path
            self._entries.withdraw(name)  # incomplete until verified and in place
            relpath, fetched = produce(entry_dir)
            self._entries.publish(
                name, {"source": job.source, "label": job.label, "relpath": relpath, "fingerprint": fingerprint}
            )
        self._record(job, cache_hit=False, bytes_downloaded=fetched)
        return entry_dir / relpath

    def _cached(self, name: str, fingerprint: dict[str, Any], job: _Job) -> Path | None:
        """The entry's path if it is complete and matches `fingerprint` (recorded as a hit)."""
        meta = self._entries.meta(name)
        path = self._entries.directory(name) / meta["relpath"] if meta else None
        if not path or meta.get("fingerprint") != fingerprint or not path.exists():
            return None
        self._entries.touch(name)
        self._record(job, cache_hit=True)
        return path

    def _record(self, job: _Job, cache_hit: bool, bytes_downloaded: int = 0) -> None:
        stats = FetchStats(job.source, job.label, cache_hit, bytes_downloaded, time.monotonic() - job.started)
        self.last_stats = stats
        for listener in self.stats_listeners:
            listener(stats)

    def _make_room(self, needed: int, keep: str, job: _Job) -> None:
        """Evict least recently used, unleased entries until `needed` more bytes fit the budget."""
        try:
            self._entries.make_room(needed, keep)
        except CacheFull as exc:
            raise job.error(str(exc)) from None

    def _fetch_package(self, job: _Job, module_name: str) -> Path:
        """Assemble a GGUF shipped in a Python package (chunks + `assemble()`) once per node."""
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise job.error(f"Python module {module_name!r} is not installed (pip install its package)") from None
        assemble, filename = getattr(module, "assemble", None), getattr(module, "MODEL_NAME", None)
        if not callable(assemble) or not isinstance(filename, str):
            raise job.error(f"module {module_name!r} does not provide assemble() and MODEL_NAME")
        dists = importlib.metadata.packages_distributions().get(module_name.split(".")[0], [])
        version = importlib.metadata.version(dists[0]) if dists else None
        fingerprint = {"sha256": getattr(module, "EXPECTED_SHA256", None), "version": version}
        name = entry_name(job.source)

        def assemble_into(entry_dir: Path) -> tuple[str, int]:
            chunks = getattr(module, "chunk_paths", list)()
            self._make_room(sum(Path(chunk).stat().st_size for chunk in chunks), keep=name, job=job)
            partial = entry_dir / f"{filename}.partial"
            logger.info("%s: assembling %s into %s", job.what, job.source, entry_dir)
            try:
                assemble(partial, overwrite=True)  # writes, then checks the sha256
                os.replace(partial, entry_dir / filename)
            except (OSError, ValueError) as exc:
                partial.unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
                    raise job.error(f"{reason} while assembling into {entry_dir}") from None
                raise job.error(f"assembled file failed verification ({exc})") from None
            size = (entry_dir / filename).stat().st_size
            if job.progress:
                job.progress(size, size)
            return filename, size

        return self._fill(name, fingerprint, job, assemble_into)

    def _fetch_s3(self, job: _Job, source: Source, storage: StorageSettings) -> Path:
        """One object (`s3://bucket/key`) or every object under a prefix (`s3://bucket/prefix/`)."""
        from deployments.weights import s3 as s3_store

        try:
            bucket, key = source.location, source.key
            client = s3_store.make_client(storage, retries=self.retry.call_retries)
            name = entry_name(job.source)
            fetch = self._fetch_s3_prefix if source.is_directory else self._fetch_s3_file
            try:
                return fetch(job, client, bucket, key, name)
            except s3_store.ObjectChanged:
                logger.info("%s: %s changed while downloading; starting over", job.what, job.source)
                return fetch(job, client, bucket, key, name)  # a second change in a row is reported
        except s3_store.StoreError as exc:
            raise job.error(str(exc), exc.transient) from None

    def _fetch_s3_file(self, job: _Job, client: Any, bucket: str, key: str, name: str) -> Path:
        from deployments.weights import download as s3_download
        from deployments.weights import s3 as s3_store

        info = s3_store.head(client, bucket, key)  # the one request a warm start costs
        filename = PurePosixPath(key).name

        def download_into(entry_dir: Path) -> tuple[str, int]:
            self._make_room(info.size, keep=name, job=job)
            progress = s3_download.TransferProgress(job.what, info.size, job.progress)
            partial = entry_dir / f"{filename}.partial"
            fetched = s3_download.Download(client, bucket, info, partial, progress, self.retry).run()
            progress.log(f"downloaded {fetched} bytes in {time.monotonic() - job.started:.1f} s")
            os.replace(partial, entry_dir / filename)
            return filename, fetched

        return self._fill(name, {"etag": info.etag, "size": info.size}, job, download_into)

    def _fetch_s3_prefix(self, job: _Job, client: Any, bucket: str, prefix: str, name: str) -> Path:
        """A model directory: one LIST decides freshness; only new or changed files download."""
        from deployments.weights import download as s3_download
        from deployments.weights import s3 as s3_store

        listing = {obj.key[len(prefix) :]: obj for obj in s3_store.list_objects(client, bucket, prefix)}
        if not listing:
            raise s3_store.StoreError(f"no objects under s3://{bucket}/{prefix}")
        for relative in listing:
            if relative.startswith("/") or ".." in PurePosixPath(relative).parts or ".partial" in relative:
                raise s3_store.StoreError(f"refusing object key {prefix + relative!r} (unsafe local path)")
        files = {rel: [obj.etag, obj.size] for rel, obj in sorted(listing.items())}
        dirname = PurePosixPath(prefix.rstrip("/")).name or bucket

        def download_into(entry_dir: Path) -> tuple[str, int]:
            verified_path = entry_dir / "verified.json"  # files in place: a failed fetch resumes from here
            verified, target = read_json(verified_path) or {}, entry_dir / dirname
            stale = sorted(rel for rel in listing if verified.get(rel) != files[rel] or not (target / rel).is_file())
            self._make_room(sum(listing[rel].size for rel in stale), keep=name, job=job)
            progress = s3_download.TransferProgress(job.what, sum(listing[rel].size for rel in stale), job.progress)
            for rel in stale:
                info = s3_store.head(client, bucket, listing[rel].key)  # metadata: the sha256
                if info.etag != listing[rel].etag:
                    raise s3_store.ObjectChanged(f"{info.key} changed while listing")
                destination = target / rel
                destination.parent.mkdir(parents=True, exist_ok=True)
                partial = destination.with_name(destination.name + ".partial")
                s3_download.Download(client, bucket, info, partial, progress, self.retry).run()
                os.replace(partial, destination)
                verified[rel] = files[rel]
                write_json(verified_path, verified)
            progress.log(f"downloaded {progress.downloaded} bytes in {time.monotonic() - job.started:.1f} s")
            for local in [p for p in target.rglob("*") if p.is_file() and ".partial" not in p.name]:
                if local.relative_to(target).as_posix() not in listing:
                    local.unlink()  # removed from the store
            write_json(verified_path, files)
            return dirname, progress.downloaded

        return self._fill(name, {"files": files}, job, download_into)
