"""CLI subcommands for model weights: push to S3, list a bucket, fill and manage the local cache,
copy a model between two S3 stores.

`register(subparsers)` adds them to the main `modelserve` parser; each sets `func(args) -> exit code`.
Credentials come from the standard AWS environment variables, never from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from deployments.weights.cache import WeightCache, WeightFetchError
from deployments.weights.source import StorageSettings

_DST_ENV = {
    "aws_access_key_id": "MODELSERVE_DST_AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "MODELSERVE_DST_AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "MODELSERVE_DST_AWS_SESSION_TOKEN",
}
_IMPORT_EPILOG = """\
The source store uses --endpoint-url/--region and the standard AWS_* environment variables.
The destination store uses --dst-endpoint-url/--dst-region and the credentials in
MODELSERVE_DST_AWS_ACCESS_KEY_ID, MODELSERVE_DST_AWS_SECRET_ACCESS_KEY and (optionally)
MODELSERVE_DST_AWS_SESSION_TOKEN; when those are unset it uses the AWS_* variables too.
The model is fetched (and verified) through the local weight cache, then pushed with its sha256."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add push, pull, ls, cache ls/rm and import to the main CLI."""
    push = subparsers.add_parser(
        "push", help="upload a model file or directory to S3 (multipart, sha256 recorded in metadata)"
    )
    push.add_argument("path", type=Path, help="a weights file or a model directory")
    push.add_argument(
        "destination",
        help="s3://bucket/key; for a file a trailing / appends its name, a directory goes under the prefix",
    )
    _storage_options(push)
    push.set_defaults(func=_push)

    pull = subparsers.add_parser("pull", help="download a model into the local weight cache ahead of time")
    pull.add_argument("source", help="s3://bucket/key, s3://bucket/prefix/, package://module or a path")
    pull.add_argument("--label", default="", help="model name used in messages")
    _storage_options(pull)
    _cache_option(pull)
    pull.set_defaults(func=_pull)

    listing = subparsers.add_parser("ls", help="list the models in an S3 bucket or prefix, with sizes")
    listing.add_argument("location", help="s3://bucket/ or s3://bucket/prefix/")
    _storage_options(listing)
    listing.set_defaults(func=_ls)

    cache = subparsers.add_parser("cache", help="inspect or clean the local weight cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_ls = cache_commands.add_parser("ls", help="list cached models (size, last use, in use)")
    _cache_option(cache_ls)
    cache_ls.set_defaults(func=_cache_ls)
    cache_rm = cache_commands.add_parser("rm", help="remove a cached model (refused while a replica uses it)")
    cache_rm.add_argument("name", help="entry name or source, as `cache ls` shows")
    _cache_option(cache_rm)
    cache_rm.set_defaults(func=_cache_rm)

    copy = subparsers.add_parser(
        "import",
        help="copy a model between two S3 stores",
        epilog=_IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    copy.add_argument("source", help="s3://bucket/key or s3://bucket/prefix/ in the source store")
    copy.add_argument("destination", help="s3://bucket/key or s3://bucket/prefix/ in the destination store")
    _storage_options(copy)
    copy.add_argument("--dst-endpoint-url", help="destination S3 endpoint (default: the source endpoint)")
    copy.add_argument("--dst-region", help="destination region")
    copy.add_argument("--dst-addressing-style", choices=["path", "virtual", "auto"], default="path")
    _cache_option(copy)
    copy.set_defaults(func=_import)


def _storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3 endpoint, e.g. MinIO (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--region", help="S3 region (default: AWS_REGION or us-east-1)")
    parser.add_argument("--addressing-style", choices=["path", "virtual", "auto"], default="path")


def _cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="weight cache directory (default: MODELSERVE_CACHE_DIR)")


def _storage(args: argparse.Namespace) -> StorageSettings:
    return StorageSettings(endpoint_url=args.endpoint_url, region=args.region, addressing_style=args.addressing_style)


def _failures(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report expected failures as one line on stderr and exit code 1, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        from deployments.weights.s3 import StoreError

        try:
            return command(args)
        except (WeightFetchError, StoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    run.__doc__ = command.__doc__
    return run


@contextmanager
def _bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar driven by (done, total) progress callbacks."""
    with tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def push_path(client: Any, path: Path, destination: str) -> list[tuple[str, int, str]]:
    """Upload a file or a directory tree; returns (uri, size, sha256) for each object."""
    from deployments.weights import s3 as s3_store

    bucket, key = s3_store.parse_s3_uri(destination)
    if not path.exists():
        raise s3_store.StoreError(f"{path} does not exist")
    if path.is_dir():
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        files = sorted(p for p in path.rglob("*") if p.is_file())
        targets = [(p, prefix + p.relative_to(path).as_posix()) for p in files]
    else:
        targets = [(path, key + path.name if not key or key.endswith("/") else key)]
    total = sum(p.stat().st_size for p, _ in targets)
    pushed = []
    with _bar(f"push {path.name}") as progress:
        sent = 0

        def sent_bytes(size: int) -> None:
            nonlocal sent
            sent += size
            progress(sent, total)

        for local, object_key in targets:
            sha256 = _upload(client, local, bucket, object_key, sent_bytes)
            pushed.append((f"s3://{bucket}/{object_key}", local.stat().st_size, sha256))
    return pushed


def _upload(client: Any, path: Path, bucket: str, key: str, callback: Callable[[int], None]) -> str:
    """Multipart upload of one file with its sha256 in the object metadata (checked on every fetch)."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    from deployments.weights.s3 import CHUNK_BYTES, WORKERS, describe

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    part_size = max(CHUNK_BYTES, math.ceil(path.stat().st_size / 9000))  # S3 allows 10,000 parts
    config = TransferConfig(multipart_threshold=CHUNK_BYTES, multipart_chunksize=part_size, max_concurrency=WORKERS)
    extra = {"Metadata": {"sha256": digest.hexdigest()}}
    try:
        client.upload_file(str(path), bucket, key, ExtraArgs=extra, Config=config, Callback=callback)
    except (ClientError, BotoCoreError) as exc:
        raise describe(exc, client, bucket, key) from None
    except boto3.exceptions.S3UploadFailedError as exc:
        cause = exc.__context__ if isinstance(exc.__context__, (ClientError, BotoCoreError)) else exc
        raise describe(cause, client, bucket, key) from None
    return digest.hexdigest()


@_failures
def _push(args: argparse.Namespace) -> int:
    from deployments.weights import s3 as s3_store

    for uri, size, sha256 in push_path(s3_store.make_client(_storage(args)), args.path, args.destination):
        print(f"{uri}\t{size}\tsha256={sha256}")
    return 0


@_failures
def _pull(args: argparse.Namespace) -> int:
    cache = WeightCache(args.cache_dir)
    with _bar(f"pull {args.label or args.source}") as progress:
        path = cache.fetch(args.source, _storage(args), label=args.label, progress=progress)
    stats = cache.last_stats
    if stats and stats.cache_hit:
        print(f"{path}\t(already cached)")
    elif stats:
        rate = stats.bytes_downloaded / 1e6 / max(stats.seconds, 1e-9)
        print(f"{path}\t({stats.bytes_downloaded} bytes in {stats.seconds:.1f} s, {rate:.1f} MB/s)")
    return 0


@_failures
def _ls(args: argparse.Namespace) -> int:
    from deployments.weights import s3 as s3_store

    bucket, prefix = s3_store.parse_s3_uri(args.location)
    objects = s3_store.list_objects(s3_store.make_client(_storage(args)), bucket, prefix)
    for obj in objects:
        print(f"{_human(obj.size):>10}  s3://{bucket}/{obj.key}")
    print(f"{_human(sum(o.size for o in objects)):>10}  total, {len(objects)} objects")
    return 0


@_failures
def _cache_ls(args: argparse.Namespace) -> int:
    entries = WeightCache(args.cache_dir).entries()
    print(f"{'NAME':<48} {'SIZE':>10}  {'LAST USED':<19}  {'STATE':<8}  SOURCE")
    for entry in reversed(entries):
        state = "in use" if entry.leased else ("ready" if entry.complete else "partial")
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        print(f"{entry.name:<48} {_human(entry.size):>10}  {used:<19}  {state:<8}  {entry.source}")
    return 0


@_failures
def _cache_rm(args: argparse.Namespace) -> int:
    for name in WeightCache(args.cache_dir).remove(args.name):
        print(f"removed {name}")
    return 0


@_failures
def _import(args: argparse.Namespace) -> int:
    from deployments.weights import s3 as s3_store

    cache = WeightCache(args.cache_dir)
    with _bar(f"fetch {args.source}") as progress:
        local = cache.fetch(args.source, _storage(args), label=args.source, progress=progress)
    destination = StorageSettings(
        endpoint_url=args.dst_endpoint_url or args.endpoint_url,
        region=args.dst_region or args.region,
        addressing_style=args.dst_addressing_style,
    )
    credentials = {name: os.environ[var] for name, var in _DST_ENV.items() if os.environ.get(var)}
    client = s3_store.make_client(destination, credentials)
    for uri, size, sha256 in push_path(client, local, args.destination):
        print(f"{uri}\t{size}\tsha256={sha256}")
    return 0


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
