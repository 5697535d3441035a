"""Token buckets: the SDK's preset numbers, continuous refill, capacity, FIFO waiting."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import FakeClock
from worker.api.ratelimit import PRESETS, BucketSpec, RateLimits, TokenBucket, preset


def test_dev_preset_matches_the_sdk() -> None:
    dev = preset("dev")
    assert dev is not None
    assert dev.queries == BucketSpec(initial=100, refill_amount=1, refill_interval_s=1.0, capacity=200)
    assert dev.commands == BucketSpec(initial=50, refill_amount=1, refill_interval_s=2.0, capacity=100)


def test_prod_preset_matches_the_sdk() -> None:
    prod = preset("prod")
    assert prod is not None
    assert prod.queries == BucketSpec(initial=500, refill_amount=2, refill_interval_s=0.25, capacity=500)
    assert prod.commands == BucketSpec(initial=250, refill_amount=1, refill_interval_s=0.25, capacity=250)


def test_off_means_no_limits() -> None:
    assert preset("off") is None
    assert set(PRESETS) == {"dev", "prod"}


def test_scaled_changes_only_the_interval() -> None:
    limits = RateLimits(
        queries=BucketSpec(1, 1, 1.0, 2),
        commands=BucketSpec(1, 1, 2.0, 2),
    ).scaled(0.1)
    assert limits.queries.refill_interval_s == pytest.approx(0.1)
    assert limits.commands.refill_interval_s == pytest.approx(0.2)
    assert (limits.queries.initial, limits.queries.refill_amount, limits.queries.capacity) == (1, 1, 2)


def test_refill_is_continuous_not_stepwise() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=2, refill_amount=1, refill_interval_s=2.0, capacity=5), clock=clock
    )
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == 0.0
    # Empty: one token takes a full interval to come back.
    assert bucket.try_take() == pytest.approx(2.0)
    clock.advance(0.5)
    assert bucket.tokens == pytest.approx(0.25)  # a quarter token after a quarter interval
    assert bucket.try_take() == pytest.approx(1.5)
    clock.advance(1.5)
    assert bucket.try_take() == 0.0


def test_refill_stops_at_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=1, refill_amount=1, refill_interval_s=1.0, capacity=3), clock=clock
    )
    clock.advance(1_000)
    assert bucket.tokens == 3
    for _ in range(3):
        assert bucket.try_take() == 0.0
    assert bucket.try_take() > 0


def test_a_clock_going_backwards_does_not_drain_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=2, refill_amount=1, refill_interval_s=1.0, capacity=3), clock=clock
    )
    clock.advance(-10)
    assert bucket.tokens == 2


async def test_take_waits_exactly_as_long_as_needed() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=1, refill_amount=1, refill_interval_s=1.0, capacity=1), clock=clock
    )
    await bucket.take(sleep=clock.sleep)
    await bucket.take(sleep=clock.sleep)
    await bucket.take(sleep=clock.sleep)
    assert clock.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]


async def test_waiters_are_served_first_come_first_served() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=1, refill_amount=1, refill_interval_s=1.0, capacity=5), clock=clock
    )
    served: list[tuple[str, float]] = []

    async def taker(name: str, amount: float) -> None:
        await bucket.take(amount, sleep=clock.sleep)
        served.append((name, clock()))

    start_s = clock()
    # "small" could be served at once from the one token in the bucket, but "big" came first.
    big = asyncio.create_task(taker("big", 3))
    await asyncio.sleep(0)
    small = asyncio.create_task(taker("small", 1))
    later = asyncio.create_task(taker("later", 1))
    await asyncio.gather(big, small, later)
    assert [name for name, _ in served] == ["big", "small", "later"]
    assert [at - start_s for _, at in served] == [pytest.approx(2.0), pytest.approx(3.0), pytest.approx(4.0)]


async def test_take_declines_a_wait_that_would_end_too_late() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=1, refill_amount=1, refill_interval_s=1.0, capacity=1), clock=clock
    )
    assert await bucket.take(sleep=clock.sleep, latest_s=clock())
    # The next token comes in 1 s: not by 0.5 s from now, so nothing is taken and nobody waits.
    assert not await bucket.take(sleep=clock.sleep, latest_s=clock() + 0.5)
    assert clock.sleeps == []
    assert bucket.tokens == 0
    assert await bucket.take(sleep=clock.sleep, latest_s=clock() + 1.0)
    assert clock.sleeps == [pytest.approx(1.0)]


async def test_a_taker_that_gives_up_waiting_gives_its_tokens_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(
        BucketSpec(initial=0, refill_amount=1, refill_interval_s=1.0, capacity=5), clock=clock
    )
    never = asyncio.Event()

    async def stuck(delay_s: float) -> None:
        await never.wait()

    waiting = asyncio.create_task(bucket.take(2, sleep=stuck))
    await asyncio.sleep(0)
    assert bucket.tokens == -2  # reserved ahead
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bucket.tokens == 0
