"""Browser access to the API (CORS): which web origins may call it, by Starlette's CORSMiddleware.

Off unless `ingress.cors.allow_origins` names origins. Then the middleware is the outermost layer, so a
browser's preflight (`OPTIONS` without credentials) is answered before authentication, and real
responses, errors included, carry the headers a browser needs to read them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.strict import Strict

_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")

# What a browser client reads beyond the CORS-safelisted headers: rate limits, request and trace ids.
EXPOSED_HEADERS = (
    "x-request-id", "traceresponse", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class CorsSettings(Strict):
    """The ingress's CORS policy. Credentials are bearer tokens, never cookies, so none are allowed."""

    allow_origins: list[str] = Field(
        default_factory=list, description="Origins (scheme://host[:port]) whose pages may call the API; '*' for any."
    )
    allow_headers: list[str] = Field(
        default_factory=lambda: ["*"], description="Request headers a browser may send (the SDK adds several of its own)."
    )
    max_age_s: int = Field(600, ge=0, le=86400, description="How long a browser may cache a preflight answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port] without a path, or '*'")
        return origins

    def middleware_options(self) -> dict[str, Any]:
        return {
            "allow_origins": self.allow_origins,
            "allow_methods": ["GET", "POST"],
            "allow_headers": self.allow_headers,
            "expose_headers": list(EXPOSED_HEADERS),
            "max_age": self.max_age_s,
        }


class CorsGate:
    """CORSMiddleware built from `app.state.cors` (set by the ingress replica from its args) on the first request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._handler is None:
            settings: CorsSettings | None = getattr(scope["app"].state, "cors", None)
            enabled = settings is not None and settings.allow_origins
            self._handler = CORSMiddleware(self.app, **settings.middleware_options()) if enabled else self.app
        await self._handler(scope, receive, send)
