"""Where token verification keys come from, and which of them may sign a token right now.

Keys never come from config text. The HS* secret comes from `MODELSERVE_JWT_SECRET` or the file named
by `MODELSERVE_JWT_SECRET_FILE` (a directory there holds one secret per file, the file name being its
`kid`: a mounted Kubernetes Secret with several keys is a rotation). Public keys come from PEM files or a
JWKS (file or URL, cached). Every key belongs to one algorithm family, so a token whose header says
HS256 is only ever checked against HMAC secrets: an RSA public key can never act as an HMAC secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Field, field_validator

from deployments.strict import Strict

logger = logging.getLogger("ray.serve.modelserve.auth")

SECRET_ENV = "MODELSERVE_JWT_SECRET"
SECRET_FILE_ENV = "MODELSERVE_JWT_SECRET_FILE"
MIN_HMAC_SECRET_BYTES = 32
JWKS_COOLDOWN_S = 30.0

Algorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
KeyFamily = Literal["HMAC", "RSA", "EC", "OKP"]


def algorithm_family(algorithm: str) -> KeyFamily | None:
    """The key type an algorithm verifies with (None for anything unknown, `none` included)."""
    prefixes: dict[str, KeyFamily] = {"HS": "HMAC", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
    return prefixes.get(algorithm[:2]) if algorithm in Algorithm.__args__ else None  # type: ignore[attr-defined]


class AuthSettings(Strict):
    """How tokens are checked. Paths and names only: secrets and key material live in env vars and files."""

    algorithms: list[Algorithm] = Field(default_factory=lambda: ["HS256"], min_length=1)
    issuer: str | None = Field(None, description="Required `iss` claim, if set.")
    audience: list[str] | None = Field(None, description="Accepted `aud` values, if set (a token with `aud` needs it).")
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    max_token_lifetime_s: float = Field(
        30 * 86400, gt=0, description="Longest a token may still be valid for when it arrives (`exp` - now): a "
        "leaked token with `exp` in year 9999 is refused. Service accounts use API keys.",
    )
    tenant_claim: str = Field("tenant", min_length=1, description="Claim naming the tenant; falls back to `sub`.")
    roles_claim: str = Field("roles", min_length=1, description="Claim listing roles; falls back to `role`.")
    public_key_files: dict[str, str] = Field(default_factory=dict, description="kid -> PEM public key file.")
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_cache_s: float = Field(300.0, gt=0, description="Keys older than this are refreshed in the background.")
    jwks_timeout_s: float = Field(
        3.0, gt=0, le=30, description="Longest a request waits for the JWKS endpoint (only one with an unknown kid "
        "does, or the first ever); slow, down or garbage: the cached keys stay, and a kid they lack is a 401.",
    )
    keys_reload_s: float = Field(60.0, ge=0, description="How often secret/key files are re-read (rotation).")

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("jwks_url")
    @classmethod
    def _https_or_local(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError("jwks_url must be https:// (plain http only for localhost)")
        return value


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    family: KeyFamily
    key: Any
    algorithm: str | None = None  # a JWK's declared `alg` pins it to that one algorithm


def hmac_secrets(environ: Mapping[str, str]) -> list[VerificationKey]:
    """HMAC secrets from MODELSERVE_JWT_SECRET and/or MODELSERVE_JWT_SECRET_FILE (a file, or a dir of kid files)."""
    found: list[tuple[str | None, str]] = []
    if environ.get(SECRET_ENV):
        found.append((None, environ[SECRET_ENV]))
    if environ.get(SECRET_FILE_ENV):
        path = Path(environ[SECRET_FILE_ENV])
        if path.is_dir():  # a mounted Secret: entries are symlinks; `..data` and friends are bookkeeping
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            found.extend((p.name, p.read_text(encoding="utf-8").strip()) for p in files)
        else:
            found.append((None, path.read_text(encoding="utf-8").strip()))
    for kid, secret in found:
        if len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
            where = f"{SECRET_FILE_ENV} entry {kid!r}" if kid else "the HMAC secret"
            raise ValueError(f"{where} is shorter than {MIN_HMAC_SECRET_BYTES} bytes")
    return [VerificationKey(kid, "HMAC", secret.encode()) for kid, secret in found]


def public_key_family(key: Any) -> KeyFamily:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "OKP"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def pem_public_keys(files: Mapping[str, str]) -> list[VerificationKey]:
    keys = []
    for kid, path in files.items():
        try:
            key = load_pem_public_key(Path(path).read_bytes())
        except ValueError as exc:
            raise ValueError(f"public_key_files[{kid}]: {path} is not a PEM public key ({exc})") from None
        keys.append(VerificationKey(kid, public_key_family(key), key))
    return keys


def jwks_keys(document: Mapping[str, Any]) -> list[VerificationKey]:
    """Public keys of a JWKS document; symmetric (`oct`) entries are ignored, secrets do not belong there."""
    keys = []
    for entry in document.get("keys", []):
        if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
            family = public_key_family(jwk.key)
        except (jwt.PyJWTError, ValueError) as exc:
            logger.warning("skipping unusable JWKS key %r: %s", entry.get("kid"), exc)
            continue
        keys.append(VerificationKey(jwk.key_id, family, jwk.key, entry.get("alg")))
    return keys


class KeyRing:
    """Every key that may sign a token right now. Several can be valid at once; `kid` picks among them."""

    def __init__(self, settings: AuthSettings, environ: Mapping[str, str] = os.environ) -> None:
        self._settings = settings
        self._environ = environ
        self._families = {algorithm_family(a) for a in settings.algorithms}
        self._static: list[VerificationKey] = []
        self._loaded_at = float("-inf")
        self._remote: list[VerificationKey] = []
        self._fetched_at = float("-inf")
        self._fetch: asyncio.Task[None] | None = None
        self.reload()
        if not self._static and not settings.jwks_url:
            raise ValueError(
                f"no verification keys for algorithms {settings.algorithms}: set {SECRET_ENV} or {SECRET_FILE_ENV}"
                " for HS*, or public_key_files / jwks_file / jwks_url for RS*/PS*/ES*/EdDSA"
            )

    def reload(self) -> None:
        """Re-read env secrets and key files (raises on a broken file, so bad keys never half-apply)."""
        keys: list[VerificationKey] = []
        if "HMAC" in self._families:
            keys += hmac_secrets(self._environ)
        keys += pem_public_keys(self._settings.public_key_files)
        if self._settings.jwks_file:
            keys += jwks_keys(json.loads(Path(self._settings.jwks_file).read_text(encoding="utf-8")))
        self._static = [k for k in keys if k.family in self._families]
        self._loaded_at = time.monotonic()

    async def candidates(self, algorithm: str, kid: str | None) -> list[VerificationKey]:
        """Keys of the algorithm's family (and the token's kid, if any), refreshing stale sources first."""
        now = time.monotonic()
        if now - self._loaded_at > self._settings.keys_reload_s:
            try:
                self.reload()
            except (OSError, ValueError) as exc:
                self._loaded_at = now  # keep serving with the keys we have; retry after the next interval
                logger.error("key reload failed, keeping the previous keys: %s", exc)
        if self._settings.jwks_url:
            known = any(k.kid == kid for k in self._remote) if kid else bool(self._remote)
            age = now - self._fetched_at
            if not known and age > JWKS_COOLDOWN_S:  # a new kid (rotation) or nothing fetched yet: wait, bounded
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._refresh()), self._settings.jwks_timeout_s)
            elif age > self._settings.jwks_cache_s:
                self._refresh()  # the cached keys serve meanwhile
        family = algorithm_family(algorithm)
        return [
            key
            for key in (*self._static, *self._remote)
            if key.family == family and (kid is None or key.kid == kid) and key.algorithm in (None, algorithm)
        ]

    def _refresh(self) -> asyncio.Task[None]:
        """One JWKS fetch at a time, shared by the requests waiting for it, outside any request's context."""
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._fetch_jwks(), context=contextvars.Context())
        return self._fetch

    async def _fetch_jwks(self) -> None:
        settings = self._settings
        client = jwt.PyJWKClient(settings.jwks_url or "", cache_jwk_set=False, timeout=settings.jwks_timeout_s)
        try:
            document = await asyncio.to_thread(client.fetch_data)
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                raise TypeError("the answer is not a JWKS document (an object with a 'keys' list)")
            keys = jwks_keys(document)
            if document["keys"] and not keys:
                raise ValueError("no usable key in the JWKS document")  # garbage; `{"keys": []}` revokes them all
            self._remote = keys
        except Exception as exc:  # noqa: BLE001 - down, slow, or garbage of any kind: keep the keys we have
            logger.warning("JWKS fetch from %s failed, keeping cached keys: %s", self._settings.jwks_url, exc)
        self._fetched_at = time.monotonic()
