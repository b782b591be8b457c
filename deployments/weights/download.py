"""Verified, resumable download of one S3 object version into the weight cache.

Downloads use parallel ranged GETs pinned to one object version (`If-Match: <ETag>`) into
a preallocated `.partial` file; a `.partial.json` next to it records finished chunks so an
interrupted download resumes while the object is unchanged. The main thread hashes the file
in order while the workers download, so size, ETag (MD5 / multipart MD5) and the `sha256`
metadata are checked before the caller renames the file into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions as boto_errors

from deployments.weights.retry import RetryPolicy
from deployments.weights.s3 import CHUNK_BYTES, WORKERS, ObjectChanged, ObjectInfo, StoreError, describe, is_transient

logger = logging.getLogger("modelserve.weights")

_BLOCK = 1024 * 1024
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_MD5 = re.compile(r"^[0-9a-f]{32}-(\d+)$")


class TransferProgress:
    """Counts bytes for the caller's callback and logs progress (bytes, rate) every 5 seconds."""

    def __init__(self, what: str, total: int, callback: Callable[[int, int], None] | None):
        self.what, self.total, self.callback = what, total, callback
        self.done = self.downloaded = 0
        self._started = self._logged = time.monotonic()
        self._lock = threading.Lock()

    def add(self, size: int, downloaded: bool = True) -> None:
        with self._lock:
            self.done += size
            self.downloaded += size if downloaded else 0
            if self.callback:
                self.callback(self.done, self.total)
            if time.monotonic() - self._logged >= 5.0:
                self._logged = time.monotonic()
                self.log(f"{_mb(self.done)} of {_mb(self.total)}")

    def log(self, event: str) -> None:
        rate = self.downloaded / 1e6 / max(time.monotonic() - self._started, 1e-9)
        logger.info("%s: %s (%.1f MB/s)", self.what, event, rate)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


class _Verifier:
    """Hashes the file in order as its downloaded prefix grows; `finish` checks size and content.

    Content is checked against the `sha256` metadata when the object has it, else against an
    MD5 (single-part) or multipart-MD5 ETag. Every GET also carries If-Match, so all bytes
    come from the one object version the ETag names.
    """

    def __init__(self, info: ObjectInfo, descriptor: int, part_size: int | None):
        self.info, self.descriptor, self.part_size = info, descriptor, part_size
        self.position = 0
        self.sha256 = hashlib.sha256() if info.sha256 else None
        self.md5 = hashlib.md5(usedforsecurity=False) if part_size else None
        self.part_digests: list[bytes] = []

    def advance(self, upto: int) -> None:
        while self.position < upto:
            part_end = (self.position // self.part_size + 1) * self.part_size if self.part_size else upto
            block = os.pread(
                self.descriptor, min(_BLOCK, upto - self.position, part_end - self.position), self.position
            )
            if not block:
                break
            self.position += len(block)
            if self.sha256:
                self.sha256.update(block)
            if self.md5:
                self.md5.update(block)
                if self.position == part_end or self.position == self.info.size:
                    self.part_digests.append(self.md5.digest())
                    self.md5 = hashlib.md5(usedforsecurity=False)

    def finish(self) -> None:
        where = f"s3://…/{self.info.key}"
        if self.position != self.info.size or os.fstat(self.descriptor).st_size != self.info.size:
            raise StoreError(f"{where}: truncated download ({self.position} of {self.info.size} bytes)")
        if _MD5.match(self.info.etag) and self.part_digests and self.part_digests[0].hex() != self.info.etag:
            raise StoreError(f"{where}: content does not match its ETag (corrupt transfer)")
        multipart = _MULTIPART_MD5.match(self.info.etag)
        if multipart and self.part_digests:
            etag = hashlib.md5(b"".join(self.part_digests), usedforsecurity=False).hexdigest()
            if f"{etag}-{len(self.part_digests)}" != self.info.etag:
                raise StoreError(f"{where}: content does not match its multipart ETag (corrupt transfer)")
        if self.sha256 and self.sha256.hexdigest() != self.info.sha256.lower():
            raise StoreError(f"{where}: sha256 does not match the object's sha256 metadata (corrupt object)")


def _flush_until(descriptor: int, finished: threading.Event) -> None:
    """Write data back while downloading, so the final fsync has little left to wait for."""
    while not finished.wait(0.25):
        os.fdatasync(descriptor)


def _part_size(client: Any, bucket: str, info: ObjectInfo) -> int | None:
    """Bytes per part for ETag checking: the whole object, or part 1's size for multipart uploads."""
    if _MD5.match(info.etag):
        return max(info.size, 1)
    if not _MULTIPART_MD5.match(info.etag):
        return None  # e.g. SSE-KMS ETags are not content digests
    try:
        return client.head_object(Bucket=bucket, Key=info.key, PartNumber=1)["ContentLength"]
    except (boto_errors.ClientError, boto_errors.BotoCoreError):
        logger.debug("store does not report part sizes; ETag of %s not verified", info.key)
        return None


@dataclass
class Download:
    """Downloads one object version into `partial` (resuming what an earlier attempt left) and verifies it.

    `run()` returns the bytes transferred. On failure the partial file is removed, except
    after a network outage: then it stays for the next fetch to resume.
    """

    client: Any
    bucket: str
    info: ObjectInfo
    partial: Path
    progress: TransferProgress
    retry: RetryPolicy

    def __post_init__(self) -> None:
        self.state_path = self.partial.with_name(self.partial.name + ".json")
        self.identity = {"etag": self.info.etag, "size": self.info.size, "chunk": CHUNK_BYTES}
        self.chunks = math.ceil(self.info.size / CHUNK_BYTES)
        self.stop = threading.Event()
        self.deadline = 0.0

    def run(self) -> int:
        for attempt in (1, 2):
            done = self._resumable_chunks()
            resumed = min(len(done) * CHUNK_BYTES, self.info.size)
            if resumed:
                logger.info("%s: resuming with %s already downloaded", self.progress.what, _mb(resumed))
                self.progress.add(resumed, downloaded=False)
            try:
                self._attempt(done)
            except StoreError as exc:
                if exc.keep_partial:
                    raise
                self._discard()
                if resumed and attempt == 1 and not isinstance(exc, ObjectChanged):
                    logger.warning("%s: resumed download failed verification; restarting", self.progress.what)
                    self.progress.add(-self.progress.done, downloaded=False)
                    continue
                raise
            except OSError as exc:
                self._discard()
                if exc.errno == errno.ENOSPC:
                    raise StoreError(f"disk full: {_mb(self.info.size)} do not fit in {self.partial.parent}") from None
                raise StoreError(f"cannot write {self.partial}: {exc.strerror or exc}") from None
            self.state_path.unlink(missing_ok=True)
            break
        return self.progress.downloaded

    def _resumable_chunks(self) -> set[int]:
        """Chunks a previous attempt finished for this same object version; otherwise start clean."""
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if self.partial.exists() and state.get("identity") == self.identity:
            return set(state["done"])
        self._discard()
        return set()

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def _attempt(self, done: set[int]) -> None:
        descriptor = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.info.size:
                os.posix_fallocate(descriptor, 0, self.info.size)  # a full disk shows here, before any GET
            part_size = None if self.info.sha256 else _part_size(self.client, self.bucket, self.info)
            verifier = _Verifier(self.info, descriptor, part_size)
            finished = threading.Event()
            flusher = threading.Thread(target=_flush_until, args=(descriptor, finished), daemon=True)
            flusher.start()
            try:
                self._transfer(descriptor, done, verifier)
            finally:
                finished.set()
                flusher.join()
            verifier.finish()
            os.fsync(descriptor)  # durable before the rename publishes it
        finally:
            os.close(descriptor)

    def _prefix_bytes(self, done: set[int]) -> int:
        first_missing = next((i for i in range(self.chunks) if i not in done), self.chunks)
        return min(first_missing * CHUNK_BYTES, self.info.size)

    def _transfer(self, descriptor: int, done: set[int], verifier: _Verifier) -> None:
        """Fetch missing chunks in parallel, recording finished ones and hashing the in-order prefix."""
        self.deadline = time.monotonic() + self.retry.budget_s
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="weights-download") as pool:
            futures: dict[Future[None], int] = {}
            for index in sorted(set(range(self.chunks)) - done):
                start = index * CHUNK_BYTES
                futures[pool.submit(self._fetch_range, descriptor, start, min(start + CHUNK_BYTES, self.info.size))] = (
                    index
                )
            try:
                verifier.advance(self._prefix_bytes(done))
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        future.result()
                        done.add(futures[future])
                    temporary = self.state_path.with_name(self.state_path.name + ".tmp")
                    temporary.write_text(json.dumps({"identity": self.identity, "done": sorted(done)}))
                    os.replace(temporary, self.state_path)
                    verifier.advance(self._prefix_bytes(done))
            except BaseException:
                self.stop.set()
                raise

    def _fetch_range(self, descriptor: int, start: int, end: int) -> None:
        """GET bytes [start, end) of this object version into the file, retrying transient failures."""
        position, attempt, key = start, 0, self.info.key
        while position < end and not self.stop.is_set():
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={position}-{end - 1}", IfMatch=f'"{self.info.etag}"'
                )
                for block in response["Body"].iter_chunks(_BLOCK):
                    view = memoryview(block)
                    while view:
                        written = os.pwrite(descriptor, view, position)
                        view, position = view[written:], position + written
                    self.progress.add(len(block))
                    if self.stop.is_set():
                        return
                if position < end:
                    raise boto_errors.IncompleteReadError(actual_bytes=position - start, expected_bytes=end - start)
            except Exception as exc:  # classified here; anything else is re-raised
                if not is_transient(exc):
                    if isinstance(exc, (boto_errors.ClientError, boto_errors.BotoCoreError)):
                        raise describe(exc, self.client, self.bucket, key) from None
                    raise
                attempt += 1
                if attempt >= self.retry.attempts or time.monotonic() + self.retry.backoff(attempt) > self.deadline:
                    raise StoreError(
                        f"network error after {attempt} attempts ({type(exc).__name__}); "
                        "the partial download is kept and resumes on the next fetch",
                        keep_partial=True,
                    ) from None
                logger.warning("transient error on %s (%s); retrying", key, type(exc).__name__)
                time.sleep(self.retry.backoff(attempt))
