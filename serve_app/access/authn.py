"""Bearer-token authentication: JWTs and hashed static API keys, turned into a `Principal`.

A JWT is checked against the keys `serve_app.access.keys` holds for its algorithm (and kid), then
its time, issuer and audience claims and its lifetime; its claims name the tenant and roles.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from serve_app.access.keys import AuthSettings, KeyRing

ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose policy applies, their roles, and the token subject (for audit)."""

    tenant: str
    roles: frozenset[str]
    subject: str

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


class AuthError(Exception):
    """A request without a usable credential; the message says why without echoing the credential."""


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Missing bearer token: send 'Authorization: Bearer <token>'.")
    return token.strip()


def api_key_hash(key: str) -> str:
    """What the policy stores for a static API key: its SHA-256, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Turns a bearer credential (JWT or static API key) into a Principal, or raises AuthError."""

    def __init__(
        self, settings: AuthSettings, api_keys: Mapping[str, Principal], environ: Mapping[str, str] = os.environ
    ) -> None:
        self._settings = settings
        self._api_keys = dict(api_keys)
        self._keys = KeyRing(settings, environ)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token.count(".") != 2:
            principal = self._api_keys.get(api_key_hash(token))
            if principal is None:
                raise AuthError("Incorrect API key provided.")
            return principal
        return self.principal(await self.verify(token))

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once its algorithm, signature and time/issuer/audience claims all check out."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("Malformed token.") from None
        algorithm = header.get("alg")
        if algorithm not in self._settings.algorithms:
            raise AuthError(f"Token algorithm {algorithm!r} is not accepted.")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        keys = await self._keys.candidates(algorithm, kid)
        if not keys:
            raise AuthError("No key matches the token's key id (kid).")
        required = ["exp", *(["iss"] if self._settings.issuer else [])]
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],
                    issuer=self._settings.issuer,
                    audience=self._settings.audience,
                    leeway=self._settings.leeway_s,
                    options={"require": required},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError("Token has expired.") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("Token is not yet valid.") from None
            except jwt.PyJWTError as exc:
                raise AuthError(f"Invalid token: {exc}.") from None
            self._check_lifetime(claims)
            return claims
        raise AuthError("Token signature is invalid.")

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """`exp` must be a number (PyJWT also takes numeric strings) no further ahead than the configured maximum."""
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise AuthError("Token claim 'exp' must be a number (seconds since the epoch).")
        limit = self._settings.max_token_lifetime_s + self._settings.leeway_s
        if exp - time.time() > limit:
            raise AuthError(f"Token lifetime exceeds this server's maximum of {self._settings.max_token_lifetime_s:g} s.")

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        tenant = claims.get(self._settings.tenant_claim) or claims.get("sub")
        if not isinstance(tenant, str) or not tenant:
            raise AuthError(f"Token names no tenant (claim {self._settings.tenant_claim!r} or 'sub').")
        raw = claims.get(self._settings.roles_claim, claims.get("role", []))
        roles = raw.replace(",", " ").split() if isinstance(raw, str) else raw
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError(f"Token claim {self._settings.roles_claim!r} must be a string or a list of strings.")
        subject = claims.get("sub") if isinstance(claims.get("sub"), str) else tenant
        return Principal(tenant=tenant, roles=frozenset(roles), subject=subject)
