"""Backoff policy: full jitter within the exponential ceiling, Retry-After as a floor, budgets."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.api.backoff import Backoff, parse_retry_after
from worker.errors import ConfigError


def test_ceiling_doubles_from_base_and_stops_at_cap() -> None:
    policy = Backoff(base_s=0.5, cap_s=5.0, max_attempts=10, max_total_s=100)
    assert [policy.ceiling_s(i) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.ceiling_s(10_000) == 5.0  # no overflow for absurd indexes


def test_delays_are_full_jitter_over_the_whole_range() -> None:
    policy = Backoff(base_s=1.0, cap_s=8.0)
    rng = random.Random(7)
    delays = [policy.delay_s(3, rng) for _ in range(2_000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter, not "equal jitter": waits near zero and near the ceiling both occur.
    assert min(delays) < 0.1
    assert max(delays) > 7.9


def test_same_seed_same_delays() -> None:
    policy = Backoff()
    first = [policy.delay_s(i, random.Random(42)) for i in range(5)]
    again = [policy.delay_s(i, random.Random(42)) for i in range(5)]
    assert first == again


@given(retry=st.integers(min_value=0, max_value=200), seed=st.integers(min_value=0, max_value=2**32))
def test_delay_never_exceeds_the_ceiling(retry: int, seed: int) -> None:
    policy = Backoff(base_s=0.25, cap_s=20.0)
    assert 0.0 <= policy.delay_s(retry, random.Random(seed)) <= policy.ceiling_s(retry)


def test_retry_after_is_a_floor_even_beyond_the_cap() -> None:
    policy = Backoff(base_s=0.5, cap_s=2.0)
    rng = random.Random(1)
    assert policy.delay_s(0, rng, retry_after_s=7.0) == 7.0
    # A Retry-After smaller than the jittered wait does not shorten it.
    delays = [policy.delay_s(5, rng, retry_after_s=0.0) for _ in range(200)]
    assert max(delays) > 1.0


def test_allows_counts_attempts_and_total_time() -> None:
    policy = Backoff(max_attempts=3, max_total_s=10.0)
    assert policy.allows(1, 0.0)
    assert policy.allows(2, 9.0, 1.0)
    assert not policy.allows(3, 0.0)  # the third attempt was the last
    assert not policy.allows(2, 9.0, 1.5)  # the wait would overrun the budget


def test_next_delay_stops_at_the_attempt_cap() -> None:
    policy = Backoff(base_s=1.0, cap_s=4.0, max_attempts=3, max_total_s=100)
    rng = random.Random(3)
    first = policy.next_delay_s(1, 0.0, rng)
    second = policy.next_delay_s(2, 0.0, rng)
    assert first is not None and 0 <= first <= 1.0
    assert second is not None and 0 <= second <= 2.0
    assert policy.next_delay_s(3, 0.0, rng) is None


def test_next_delay_stops_when_retry_after_overruns_the_budget() -> None:
    policy = Backoff(max_attempts=10, max_total_s=30.0)
    rng = random.Random(3)
    assert policy.next_delay_s(1, 5.0, rng, retry_after_s=20.0) == 20.0
    assert policy.next_delay_s(1, 5.0, rng, retry_after_s=26.0) is None


def test_max_attempts_one_never_retries() -> None:
    assert Backoff(max_attempts=1).next_delay_s(1, 0.0, random.Random()) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"base_s": 0}, {"base_s": -1}, {"cap_s": 0.1, "base_s": 1.0}, {"max_attempts": 0}, {"max_total_s": -1}],
)
def test_invalid_policies_are_config_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_retry_after_seconds() -> None:
    assert parse_retry_after("120", now_s=0) == 120.0
    assert parse_retry_after(" 1.5 ", now_s=0) == 1.5
    assert parse_retry_after("0", now_s=0) == 0.0


def test_retry_after_http_date_is_relative_to_now() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    later = datetime(2024, 5, 1, 12, 0, 45, tzinfo=UTC)
    header = format_datetime(later, usegmt=True)
    assert header == "Wed, 01 May 2024 12:00:45 GMT"
    assert parse_retry_after(header, now_s=now.timestamp()) == pytest.approx(45.0)
    # A date already past means "retry now", not a negative wait.
    assert parse_retry_after(header, now_s=now.timestamp() + 3600) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "nan", "inf", "Wed, 99 Foo 2024"])
def test_unreadable_retry_after_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, now_s=0) is None
