"""How a download retries transient network errors: set on the cache, used by each S3 download."""

from __future__ import annotations

from dataclasses import dataclass

CALL_RETRIES = 3  # botocore's own retries of each S3 call (its standard mode: jittered backoff up to 2^n s)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient network errors, bounded in attempts per request and in total time.

    Each attempt is one S3 call, which botocore itself retries `call_retries` times before it fails.
    """

    attempts: int = 5
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    budget_s: float = 120.0
    call_retries: int = CALL_RETRIES

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))
