"""The one parser of weight sources: a path, `file://`, `package://module` or `s3://bucket/key`;
and how to reach the S3 store that `s3://` sources name.

The model spec checks a source with it before deploying and the cache fetches by what it
returns, so a source the config accepts is one the cache knows how to fetch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import Field

from deployments.strict import Strict

Scheme = Literal["file", "package", "s3"]
SCHEMES: tuple[Scheme, ...] = ("file", "package", "s3")


class SourceError(ValueError):
    """A source string no fetcher understands."""


@dataclass(frozen=True)
class Source:
    """A parsed source. `location` is the path (file), the module (package) or the bucket (s3)."""

    uri: str
    scheme: Scheme
    location: str
    key: str = ""  # s3 only: the object key, or a prefix ending in "/" (or empty: the whole bucket)

    @property
    def path(self) -> Path:
        return Path(self.location).expanduser()

    @property
    def is_directory(self) -> bool:
        """An s3 prefix (a model directory) rather than one object."""
        return self.scheme == "s3" and (not self.key or self.key.endswith("/"))


def parse_source(uri: str) -> Source:
    """Split a source into scheme and location; raise SourceError for anything else."""
    if not uri.strip():
        raise SourceError("source must not be empty")
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme == "file":
        return Source(uri, "file", unquote(urlparse(uri).path) if uri.startswith("file://") else uri)
    if scheme == "package":
        return Source(uri, "package", uri.split("://", 1)[1].strip("/"))
    if scheme == "s3":
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise SourceError(f"not an s3://bucket/key URI: {uri!r}")
        return Source(uri, "s3", parsed.netloc, parsed.path.lstrip("/"))
    raise SourceError(f"unsupported source scheme {scheme!r} (use a path, file://, s3:// or package://)")


class StorageSettings(Strict):
    """How to reach the S3 API (MinIO) holding `s3://` sources; credentials come from the environment."""

    endpoint_url: str | None = Field(None, description="S3 endpoint; None = AWS_ENDPOINT_URL or AWS default.")
    region: str | None = Field(None, description="Region; None = AWS_REGION / AWS_DEFAULT_REGION or us-east-1.")
    addressing_style: Literal["path", "virtual", "auto"] = "path"
