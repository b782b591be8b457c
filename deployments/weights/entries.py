"""The weight cache's entries on disk, and the rules for writing, using and deleting them.

Every replica process on a node shares one cache, so who may touch an entry when is decided
here, apart from fetching (`deployments.weights.cache`, which knows the sources): a filelock per
entry serializes its download, a shared flock on a sidecar file is the lease a running replica
holds on weights in use, and a size budget evicts the least recently used unleased entries.

Layout under `root`: `entries/<name>/meta.json` next to the weights (a file or a directory),
`locks/<name>.lock` (downloads) and `locks/<name>.lease` (replicas using the entry). An
entry without `meta.json` is incomplete and never served.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger("modelserve.weights")

_META = "meta.json"


class WeightFetchError(Exception):
    """Weights could not be made available; the message names model and source, never secrets.

    `transient`: the store could not be reached or was failing, so trying again later may succeed.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class CacheFull(Exception):
    """The size budget cannot fit a download: entries in use hold the rest of it."""


@dataclass(frozen=True)
class CacheEntry:
    name: str
    source: str
    path: Path
    size: int
    last_used: float
    leased: bool
    complete: bool


def _tree_size(path: Path, skip_partial: bool = False) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not (skip_partial and ".partial" in p.name))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old content or the new, never half of it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, sort_keys=True))
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class CacheEntries:
    """The entries under `root` and their locks; `max_bytes`, if set, bounds their total size."""

    def __init__(self, root: Path, max_bytes: int | None) -> None:
        self.root, self.max_bytes = root, max_bytes
        try:
            for sub in ("entries", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WeightFetchError(f"cannot use {self.root} as the weight cache: {exc.strerror or exc}") from None

    def directory(self, name: str) -> Path:
        return self.root / "entries" / name

    def meta(self, name: str) -> dict[str, Any] | None:
        """The entry's metadata if it is complete, else None."""
        return read_json(self.directory(name) / _META)

    def withdraw(self, name: str) -> None:
        """Mark the entry incomplete before its weights change."""
        (self.directory(name) / _META).unlink(missing_ok=True)

    def publish(self, name: str, meta: dict[str, Any]) -> None:
        """Mark the entry complete: only once its weights are verified and in place."""
        write_json(self.directory(name) / _META, meta)

    @contextmanager
    def lease(self, path: Path) -> Iterator[Path]:
        """Hold while the weights at `path` are in use: eviction skips leased entries."""
        name = self._name_for_path(Path(path))
        if name is None:
            yield Path(path)  # a local source, not a cache entry: nothing to protect
            return
        with self._lease_lock(name, fcntl.LOCK_SH):
            if not (self.directory(name) / _META).exists() or not Path(path).exists():
                raise WeightFetchError(f"cached weights at {path} were evicted before use; fetch them again")
            self.touch(name)
            yield Path(path)

    def listing(self) -> list[CacheEntry]:
        """Every cache entry, complete or not, least recently used first."""
        found = []
        for entry_dir in (self.root / "entries").iterdir():
            meta = read_json(entry_dir / _META)
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
        matches = [e.name for e in self.listing() if source_or_name in (e.name, e.source)]
        if not matches:
            raise WeightFetchError(f"no cache entry named {source_or_name!r} (see `cache ls`)")
        for name in matches:
            if not self._try_evict(name):
                raise WeightFetchError(f"cache entry {name} is in use by a running replica or a download")
        return matches

    @contextmanager
    def locked(self, name: str, what: str, source: str) -> Iterator[Path]:
        """Hold the entry's download lock: while another process downloads it, wait (then reuse)."""
        lock = self._download_lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("%s: waiting for another process downloading %s", what, source)
            lock.acquire()
        entry_dir = self.directory(name)
        try:
            entry_dir.mkdir(parents=True, exist_ok=True)
            yield entry_dir
        finally:
            if entry_dir.exists() and not any(entry_dir.iterdir()):
                entry_dir.rmdir()  # a failed first download leaves no empty entry behind
            lock.release()

    def make_room(self, needed: int, keep: str) -> None:
        """Evict least recently used, unleased entries until `needed` more bytes fit the budget."""
        if self.max_bytes is None:
            return
        entries = [e for e in self.listing() if e.name != keep]
        used = sum(e.size for e in entries) + _tree_size(self.directory(keep), skip_partial=True)
        for entry in entries:
            if used + needed <= self.max_bytes:
                break
            if not entry.leased and self._try_evict(entry.name):
                logger.info("evicted %s (%d bytes) from the weight cache", entry.source or entry.name, entry.size)
                used -= entry.size
        if used + needed > self.max_bytes:
            raise CacheFull(
                f"cache budget exceeded: needs {needed} bytes, {used} of {self.max_bytes} are held by entries "
                "in use (raise MODELSERVE_CACHE_MAX_BYTES or stop unused replicas)"
            )

    def touch(self, name: str) -> None:
        """Record a use: the mtime of `meta.json` orders eviction."""
        try:
            os.utime(self.directory(name) / _META)
        except FileNotFoundError:
            pass

    def _name_for_path(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to((self.root / "entries").resolve())
        except ValueError:
            return None
        return relative.parts[0] if relative.parts else None

    def _download_lock(self, name: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{name}.lock"))

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
                    self.withdraw(name)
                    shutil.rmtree(self.directory(name), ignore_errors=True)
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
