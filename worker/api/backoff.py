"""Retry pacing: exponential backoff with full jitter, bounded in attempts and total time.

The policy is pure arithmetic over attempt counts and seconds, with the random source
passed in, so the HTTP client and the handler framework can share it and tests can
make it deterministic. A server's ``Retry-After`` is a floor, never a ceiling: the
server knows better than our schedule when it will be ready again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from worker.errors import ConfigError

__all__ = ["Backoff", "parse_retry_after"]


@dataclass(frozen=True)
class Backoff:
    """How long to wait between attempts and when to stop.

    ``max_attempts`` counts every attempt including the first (1 = never retry);
    ``max_total_s`` bounds the time from the start (the caller's ``elapsed_s``
    counts from it: the API client starts it when the call is made, before any
    rate-limit or token wait) to the start of the last attempt, so a retry is only
    made if its wait still fits in that budget.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 5
    max_total_s: float = 120.0

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and math.isfinite(self.base_s)):
            raise ConfigError(f"backoff base_s must be a positive number, got {self.base_s!r}")
        if not (self.cap_s >= self.base_s and math.isfinite(self.cap_s)):
            raise ConfigError(f"backoff cap_s must be at least base_s ({self.base_s}), got {self.cap_s!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"backoff max_attempts must be at least 1, got {self.max_attempts!r}")
        if not self.max_total_s >= 0:
            raise ConfigError(f"backoff max_total_s must not be negative, got {self.max_total_s!r}")

    def ceiling_s(self, retry: int) -> float:
        """Upper bound of the jittered wait before retry number ``retry`` (0 = first retry)."""
        if retry < 0:
            raise ValueError(f"retry index must not be negative, got {retry}")
        # 2**retry overflows float for large indexes; past the cap the answer is the cap anyway.
        if retry >= 64:
            return self.cap_s
        return min(self.cap_s, self.base_s * float(2**retry))

    def delay_s(self, retry: int, rng: random.Random, *, retry_after_s: float | None = None) -> float:
        """Wait before retry number ``retry`` (0 = first retry).

        Full jitter, ``uniform(0, min(cap_s, base_s * 2**retry))``, spreads clients that
        failed together. A server ``Retry-After`` raises the wait to at least that many
        seconds, even beyond ``cap_s``: retrying earlier would only be refused again.
        """
        jittered_s = rng.uniform(0.0, self.ceiling_s(retry))
        if retry_after_s is not None and retry_after_s > jittered_s:
            return retry_after_s
        return jittered_s

    def allows(self, attempts: int, elapsed_s: float, delay_s: float = 0.0) -> bool:
        """Whether one more attempt, after waiting ``delay_s``, fits both budgets.

        ``attempts`` is how many attempts were already made; ``elapsed_s`` is the time
        since the first one started.
        """
        return attempts < self.max_attempts and elapsed_s + delay_s <= self.max_total_s

    def next_delay_s(
        self,
        attempts: int,
        elapsed_s: float,
        rng: random.Random,
        *,
        retry_after_s: float | None = None,
    ) -> float | None:
        """The wait before the next attempt, or ``None`` when the budget says stop.

        ``attempts`` (>= 1) is how many attempts already failed.
        """
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if attempts >= self.max_attempts:
            return None
        delay_s = self.delay_s(attempts - 1, rng, retry_after_s=retry_after_s)
        return delay_s if self.allows(attempts, elapsed_s, delay_s) else None


def parse_retry_after(value: str | None, *, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date).

    ``now_s`` is the current Unix time, ideally taken from the answer's own ``Date``
    header so clock skew between us and the server cancels out. A date in the past
    means "now" (0); an unreadable value is ignored (``None``) rather than trusted.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        at = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        # RFC 9110 dates are always GMT; a naive parse result means "-0000" or similar.
        at = at.replace(tzinfo=UTC)
    return max(0.0, at.timestamp() - now_s)
