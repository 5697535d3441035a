"""Token buckets with the official Integration SDK's presets.

The client takes a token before every request (queries and commands have separate
buckets); the simulator uses the same buckets to answer 429 like a dev marketplace.
Refill is continuous: a bucket started no later than another with the same spec
never holds fewer tokens, so a client pacing itself with these buckets stays
inside a server enforcing them, provided the server's bucket is the older one
(the simulator starts every client's bucket when its limits take effect).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "PRESETS",
    "BucketSpec",
    "RateLimitPreset",
    "RateLimits",
    "TokenBucket",
    "preset",
]

RateLimitPreset = Literal["dev", "prod", "off"]


@dataclass(frozen=True)
class BucketSpec:
    """``initial`` tokens, ``refill_amount`` more each ``refill_interval_s``, at most ``capacity``."""

    initial: float
    refill_amount: float
    refill_interval_s: float
    capacity: float

    def scaled(self, time_factor: float) -> BucketSpec:
        """The same bucket on a faster (< 1) or slower (> 1) clock; tests use this."""
        return replace(self, refill_interval_s=self.refill_interval_s * time_factor)


@dataclass(frozen=True)
class RateLimits:
    queries: BucketSpec
    commands: BucketSpec

    def scaled(self, time_factor: float) -> RateLimits:
        return RateLimits(self.queries.scaled(time_factor), self.commands.scaled(time_factor))


PRESETS: dict[str, RateLimits] = {
    "dev": RateLimits(
        queries=BucketSpec(initial=100, refill_amount=1, refill_interval_s=1.0, capacity=200),
        commands=BucketSpec(initial=50, refill_amount=1, refill_interval_s=2.0, capacity=100),
    ),
    "prod": RateLimits(
        queries=BucketSpec(initial=500, refill_amount=2, refill_interval_s=0.25, capacity=500),
        commands=BucketSpec(initial=250, refill_amount=1, refill_interval_s=0.25, capacity=250),
    ),
}


def preset(name: RateLimitPreset) -> RateLimits | None:
    """The named preset; ``None`` for ``off``."""
    return None if name == "off" else PRESETS[name]


class TokenBucket:
    """A token bucket with continuous refill and FIFO waiting.

    :meth:`take` reserves its tokens at once, ahead of time if need be (the bucket
    then runs below zero, and later takers wait behind), so a taker knows its wait
    before it starts waiting and can decline one that would end too late.
    """

    def __init__(
        self,
        spec: BucketSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        started_at_s: float | None = None,
    ) -> None:
        """A bucket holding ``spec.initial`` tokens at ``started_at_s`` (default: now), refilling since."""
        self.spec = spec
        self._clock = clock
        self._tokens = spec.initial
        now_s = clock()
        self._updated_at_s = now_s if started_at_s is None else min(started_at_s, now_s)
        self._rate_per_s = spec.refill_amount / spec.refill_interval_s
        # Reserved waits are slept in turn, so each sleeps only what is left after the one before.
        self._turn = asyncio.Lock()

    def _refill(self) -> None:
        now_s = self._clock()
        elapsed_s = max(0.0, now_s - self._updated_at_s)
        self._tokens = min(self.spec.capacity, self._tokens + elapsed_s * self._rate_per_s)
        self._updated_at_s = now_s

    @property
    def tokens(self) -> float:
        """Tokens in the bucket now; below zero while tokens are reserved ahead."""
        self._refill()
        return self._tokens

    def try_take(self, amount: float = 1.0) -> float:
        """Take ``amount`` tokens and return 0, or take nothing and return the wait in seconds."""
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return 0.0
        return (amount - self._tokens) / self._rate_per_s

    def reserve(self, amount: float = 1.0, *, latest_s: float | None = None) -> float | None:
        """Reserve ``amount`` tokens; the time (on the bucket's clock) they are there, or None.

        Reservations are served in the order they are made. With ``latest_s``
        nothing is reserved, and None returned, if the tokens would come after it.
        """
        self._refill()
        ready_at_s = self._updated_at_s + max(0.0, (amount - self._tokens) / self._rate_per_s)
        if latest_s is not None and ready_at_s > latest_s:
            return None
        self._tokens -= amount
        return ready_at_s

    async def take(
        self,
        amount: float = 1.0,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        latest_s: float | None = None,
    ) -> bool:
        """Wait until ``amount`` tokens are available and take them; waiters are served in order.

        With ``latest_s`` (on the bucket's clock), return False at once, having taken
        nothing, if the tokens would not be there by then; True once they are taken.
        """
        ready_at_s = self.reserve(amount, latest_s=latest_s)
        if ready_at_s is None:
            return False
        try:
            async with self._turn:
                # Asked again after each sleep: a sleep may end a hair early, and a request sent
                # before its token is there is one the server may refuse.
                while (wait_s := ready_at_s - self._clock()) > 0:
                    await sleep(wait_s)
        except asyncio.CancelledError:
            # Never used: give the tokens back so the takers after us are not held up.
            self._refill()
            self._tokens = min(self.spec.capacity, self._tokens + amount)
            raise
        return True
