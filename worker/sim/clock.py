"""The simulator's sense of "now": the wall clock by default, a hand-set one in tests.

Everything time-dependent in the simulator (resource timestamps, token expiry, the
``Date`` header of its answers) reads one :data:`Clock`, so a test can put the
simulated API ahead of or behind the host and move it at will.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from worker.errors import ConfigError

__all__ = ["Clock", "ManualClock", "utc_now"]

#: A source of aware UTC datetimes.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock: the wall clock in UTC."""
    return datetime.now(UTC)


class ManualClock:
    """A clock that stands still until told to move; pass it as ``SimConfig(clock=...)``."""

    def __init__(self, at: datetime) -> None:
        self._at = _aware(at)

    def __call__(self) -> datetime:
        return self._at

    def set(self, at: datetime) -> None:
        """Jump to ``at`` (backwards too: a clock that is corrected)."""
        self._at = _aware(at)

    def advance(self, seconds: float) -> datetime:
        """Move ``seconds`` ahead and return the new time."""
        self._at += timedelta(seconds=seconds)
        return self._at


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ConfigError("naive datetime: the simulator's clock deals in aware UTC instants")
    return at.astimezone(UTC)
