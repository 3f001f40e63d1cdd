"""When the walletd client tries again, and how long it waits first.

Two failures are retried, for a request that is safe to send twice (a GET,
or a POST carrying an Idempotency-Key, which walletd applies at most once): no answer at
all (the connection failed or was cut, the attempt timed out), and 503 (UNAVAILABLE,
OVERLOADED), whose meaning is "not applied, or unknown". A 429 RATE_LIMITED (refused before
anything ran) is retried for any request. Any other 4xx is final; a 500 is a bug.

The wait before attempt n+1 is full-jitter exponential backoff, ``uniform(0, min(cap,
base * 2**(n-1)))``, added to the server's ``Retry-After`` when it sent one, so a burst of
clients refused together does not come back together. Attempts and total time are bounded:
the last failure is raised when either bound would be passed.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass

__all__ = ["RetryPolicy", "parse_retry_after_s"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds of the retry loop; ``attempts_max=1`` turns retries off."""

    attempts_max: int = 5
    total_s_max: float = 30.0
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0
    # A server's Retry-After is honoured up to this; past it the client gives up sooner.
    retry_after_s_max: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts_max <= 100:
            raise ValueError("attempts_max must be within 1..100")
        if self.total_s_max <= 0 or self.backoff_base_s <= 0:
            raise ValueError("total_s_max and backoff_base_s must be positive")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must be at least backoff_base_s")
        if self.retry_after_s_max < 0:
            raise ValueError("retry_after_s_max must not be negative")

    def delay_s(self, attempt: int, retry_after_s: float | None, unit_random: float) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        ``unit_random`` is a uniform draw from [0, 1): passed in so that tests are exact.
        """
        window_s = min(self.backoff_cap_s, math.ldexp(self.backoff_base_s, attempt - 1))
        jitter_s = unit_random * window_s
        if retry_after_s is None:
            return jitter_s
        return min(retry_after_s, self.retry_after_s_max) + jitter_s


def parse_retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None  # unreadable: plain backoff applies
    seconds = moment.timestamp() - (time.time() if now_s is None else now_s)
    return max(0.0, seconds) if math.isfinite(seconds) else None
