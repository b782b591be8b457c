"""How a download retries transient network errors: set on the cache, used by each S3 download."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient network errors, bounded in attempts per request and in total time."""

    attempts: int = 5
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    budget_s: float = 120.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))
