"""The ingress's quota check and usage bookkeeping for one request (the arithmetic is usage.py).

Before a request runs, `QuotaGate.admit` reserves its estimate against its tenant's and key's daily
and monthly token quotas (429 `quota_exceeded` with the reset time otherwise); when the response has
ended, however it ended, the account settles the reservation with the real usage, which is also what
the usage API reports. Requests without quotas make no call before they run, only the settle after.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from serve_app.access.usage import QuotaGrant, QuotaScope
from serve_app.access.usage_client import UsageBook, UsageUnavailable
from serve_app.ingress.errors import RETRY_AFTER_S
from serve_app.ingress.protocol import OpenAIError

if TYPE_CHECKING:
    from serve_app.access.gate import RequestAccount

logger = logging.getLogger("ray.serve.modelserve.policy")


def quota_headers(grant: QuotaGrant, now: datetime) -> dict[str, str]:
    """Retry-After (seconds until the quota resets) and the quota that refused, x-ratelimit style."""
    reset_at = grant.reset_at or now
    return {
        "Retry-After": str(max(1, math.ceil((reset_at - now).total_seconds()))),
        "x-quota-scope": f"{grant.scope} per {grant.period}",
        "x-quota-limit-tokens": str(grant.limit),
        "x-quota-remaining-tokens": str(grant.remaining),
        "x-quota-reset": reset_at.isoformat().replace("+00:00", "Z"),
    }


def quota_error(grant: QuotaGrant, now: datetime) -> OpenAIError:
    who = grant.scope.replace(":", " '", 1) + "'"
    reset = (grant.reset_at or now).strftime("%Y-%m-%d %H:%M UTC")
    message = (f"Token quota exceeded for {who}: {grant.limit} tokens per {grant.period}, {grant.remaining} left "
               f"(less than this request may use). It resets at {reset}.")
    return OpenAIError(429, message, type="insufficient_quota", code="quota_exceeded",
                       headers=quota_headers(grant, now))


class QuotaGate:
    """Reserves quota before a request and books its usage after, through the shared usage actor."""

    def __init__(self, book: UsageBook) -> None:
        self._book = book

    async def admit(self, account: RequestAccount, scopes: list[QuotaScope], estimate: int) -> None:
        """Reserve `estimate` tokens against `scopes` (429 if one is spent), and book the usage when it ends."""
        reservation = None
        if scopes:
            try:
                reservation, grant = await self._book.reserve(scopes, estimate)
            except UsageUnavailable as exc:
                logger.error("usage actor %s unavailable: %s", self._book.name, exc)
                raise OpenAIError(503, "Quota accounting is temporarily unavailable. Retry shortly.",
                                  type="server_error", code="quota_unavailable",
                                  headers={"Retry-After": RETRY_AFTER_S}) from None
            if not grant.admitted:
                raise quota_error(grant, datetime.now(timezone.utc))
        book = self._book
        account.settlers.append(lambda: book.settle(
            reservation, account.principal.tenant, account.principal.subject, account.model or "",
            account.prompt_tokens, account.completion_tokens,
        ))
