"""The S3 side of the weight cache: clients, object metadata and listings, errors worth reading.

Every boto3 failure becomes a StoreError whose message says what to fix (bucket, key, endpoint,
credentials) without leaking secrets; `is_transient` tells a retryable network error from the
rest. The resumable, verified object download is `deployments.weights.download`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from deployments.weights.retry import CALL_RETRIES
from deployments.weights.source import SourceError, StorageSettings, parse_source

CHUNK_BYTES = 16 * 1024 * 1024
WORKERS = 8


class StoreError(Exception):
    """An S3 failure described without secrets; `keep_partial` when a resumable partial file remains,
    `transient` when the store was unreachable or failing (worth waiting for, unlike a wrong key)."""

    def __init__(self, reason: str, keep_partial: bool = False, transient: bool = False):
        super().__init__(reason)
        self.keep_partial = keep_partial
        self.transient = transient or keep_partial


class ObjectChanged(StoreError):
    """The object was replaced while we downloaded it (If-Match failed)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without quotes
    sha256: str | None = None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key (or prefix) of an `s3://` URI; StoreError for any other source."""
    try:
        source = parse_source(uri)
    except SourceError as exc:
        raise StoreError(str(exc)) from None
    if source.scheme != "s3":
        raise StoreError(f"not an s3://bucket/key URI: {uri!r}")
    return source.location, source.key


def public_endpoint(url: str | None) -> str:
    """The endpoint as it may appear in messages: any user:password part removed."""
    if not url:
        return "the default AWS endpoint"
    parsed = urlparse(url)
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


_SESSION = boto3.session.Session()  # one per process: loading the service model costs ~0.15 s per session
_SESSION_LOCK = threading.Lock()  # sessions are not thread-safe


def make_client(storage: StorageSettings, credentials: dict[str, str] | None = None,
                retries: int = CALL_RETRIES) -> Any:
    """An S3 client for `storage`, retrying each failed call `retries` times; endpoint, region and credentials fall
    back to the AWS env vars.

    Keys in the environment are read at every call (not cached with the session), so a
    rotated secret takes effect on the next fetch.
    """
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        s3={"addressing_style": storage.addressing_style},
        retries={"mode": "standard", "max_attempts": retries},  # botocore's max_attempts counts the retries
        max_pool_connections=WORKERS + 2,
        connect_timeout=10,
        read_timeout=60,
    )
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    if credentials is None and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        credentials = {
            "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "aws_session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
    try:
        with _SESSION_LOCK:
            return _SESSION.client(
                "s3", endpoint_url=endpoint, region_name=region, config=config, **(credentials or {})
            )
    except (boto_errors.BotoCoreError, ValueError) as exc:
        raise StoreError(f"cannot create an S3 client for {public_endpoint(endpoint)} ({type(exc).__name__})") from None


_NETWORK_ERRORS = (
    boto_errors.HTTPClientError,  # connection reset/closed, read timeouts
    boto_errors.ConnectionError,  # connection refused, connect timeouts: the endpoint is down
    boto_errors.ResponseStreamingError,
    boto_errors.IncompleteReadError,
    ConnectionError,
    TimeoutError,
)


def describe(exc: Exception, client: Any, bucket: str, key: str = "") -> StoreError:
    """Turn a boto3 failure into a StoreError whose message says what to fix."""
    error = _explain(exc, client, bucket, key)
    error.transient = is_transient(exc)
    return error


def _explain(exc: Exception, client: Any, bucket: str, key: str) -> StoreError:
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, boto_errors.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        http = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
        if code == "NoSuchBucket" or (status == 404 and not _bucket_exists(client, bucket)):
            return StoreError(f"bucket {bucket!r} does not exist at {public_endpoint(client.meta.endpoint_url)}")
        if status == 404 or code in {"NoSuchKey", "404"}:
            return StoreError(f"{where} does not exist")
        if status == 403 or code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}:
            return StoreError(
                f"access denied to {where} ({http}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        if status == 412:
            return ObjectChanged(f"{where} changed during the download")
        return StoreError(f"S3 request for {where} failed ({http})")
    if isinstance(exc, boto_errors.FlexibleChecksumError):
        return StoreError(f"{where}: received bytes do not match the object's checksum (corrupt transfer)")
    if isinstance(exc, boto_errors.NoCredentialsError):
        return StoreError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, (boto_errors.EndpointConnectionError, boto_errors.ConnectTimeoutError)):
        return StoreError(f"S3 endpoint {public_endpoint(client.meta.endpoint_url)} is unreachable")
    if isinstance(exc, _NETWORK_ERRORS):
        return StoreError(
            f"network error talking to {public_endpoint(client.meta.endpoint_url)} ({type(exc).__name__})"
        )
    return StoreError(f"S3 request for {where} failed ({type(exc).__name__})")


def _bucket_exists(client: Any, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
    except boto_errors.ClientError as exc:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404
    except boto_errors.BotoCoreError:
        pass
    return True


def head(client: Any, bucket: str, key: str) -> ObjectInfo:
    try:
        response = client.head_object(Bucket=bucket, Key=key)
    except (boto_errors.ClientError, boto_errors.BotoCoreError) as exc:
        raise describe(exc, client, bucket, key) from None
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    return ObjectInfo(key, response["ContentLength"], response["ETag"].strip('"'), metadata.get("sha256"))


def list_objects(client: Any, bucket: str, prefix: str) -> list[ObjectInfo]:
    """Every object under `prefix`, directory markers excluded."""
    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    found.append(ObjectInfo(item["Key"], item["Size"], item["ETag"].strip('"')))
    except (boto_errors.ClientError, boto_errors.BotoCoreError) as exc:
        raise describe(exc, client, bucket, prefix) from None
    return found


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a server-side 5xx or throttling response, or a dropped or timed-out connection."""
    if isinstance(exc, boto_errors.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in {"SlowDown", "RequestTimeout"}
    return isinstance(exc, _NETWORK_ERRORS)
