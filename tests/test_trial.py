"""``worker.trial.Deliver``: a handler through the real job path, as a plugin's tests use it."""

from __future__ import annotations

from tests.delivery_kit import events
from worker.errors import PermanentError
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.trial import Deliver


async def test_outcomes(redis_url: str) -> None:
    deliver = Deliver(redis_url)
    calls: list[int] = []

    @handler(
        "flaky", transitions=["transition/*payment*"], retry=RetryPolicy(max_attempts=4, base_s=60, cap_s=600)
    )
    async def flaky(ctx: HandlerContext) -> None:
        calls.append(ctx.attempt)
        if ctx.event.index == 1 and ctx.attempt < 3:
            raise ConnectionResetError("reset")
        if ctx.event.index == 2:
            raise PermanentError("refused")

    inquire, request, confirm = events(1, 3)
    assert (await deliver(inquire, flaky)).status == "not_subscribed"
    done = await deliver(request, flaky)  # backoff of a minute, shortened
    assert (done.status, done.attempts, done.errors) == ("done", 3, ["ConnectionResetError: reset"] * 2)
    assert (await deliver(request, flaky)).status == "skipped"
    dead = await deliver(confirm, flaky)
    assert (dead.status, dead.attempts, dead.errors) == ("dead_lettered", 1, ["PermanentError: refused"])
    assert dead.dead_letter is not None and dead.dead_letter.reason == "permanent"
    assert calls == [1, 2, 3, 1]
