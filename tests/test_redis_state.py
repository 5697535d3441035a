"""Lease, cursors and the queue's exactly-once enqueue against a real redis-server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from arq.connections import ArqRedis

from worker.api.models import Transaction
from worker.errors import CursorChangedError, LeaseLostError
from worker.events import TransitionEvent, events_from_transaction
from worker.poll.cursor import CursorStore
from worker.poll.lease import Lease
from worker.queue.enqueue import EventQueue

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def transaction(n_transitions: int) -> Transaction:
    names = ["transition/inquire", "transition/request-payment-after-inquiry", "transition/confirm-payment"]
    return Transaction.model_validate(
        {
            "id": UUID(int=7),
            "type": "transaction",
            "attributes": {
                "createdAt": T0,
                "processName": "default-booking",
                "processVersion": 1,
                "lastTransition": names[n_transitions - 1],
                "lastTransitionedAt": T0 + timedelta(seconds=n_transitions - 1),
                "transitions": [
                    {"transition": name, "createdAt": T0 + timedelta(seconds=i), "by": "customer"}
                    for i, name in enumerate(names[:n_transitions])
                ],
            },
        }
    )


def events(n: int) -> list[TransitionEvent]:
    return events_from_transaction(transaction(n), newer_than=None, source="transactions")


async def test_lease_is_exclusive_and_fenced(arq_redis: ArqRedis) -> None:
    first = Lease(arq_redis, "t:lease", ttl_s=30)
    second = Lease(arq_redis, "t:lease", ttl_s=30)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.renew()
    await first.release()
    assert await second.acquire()
    assert first.token is None
    assert second.token is not None
    assert await second.holder() == second.token
    # A stale holder can neither renew nor release the new holder's lease.
    first.token = 1
    assert not await first.renew()
    assert await second.holder() == second.token


async def test_lease_expires(arq_redis: ArqRedis) -> None:
    lease = Lease(arq_redis, "t:lease", ttl_s=30)
    assert await lease.acquire()
    await arq_redis.pexpire("t:lease", 1)
    other = Lease(arq_redis, "t:lease", ttl_s=30)
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while not await other.acquire():
        assert datetime.now(UTC) < deadline
    assert other.token is not None
    assert lease.token is not None
    assert other.token > lease.token
    assert not await lease.renew()


async def test_cursor_writes_are_guarded_by_the_lease(arq_redis: ArqRedis) -> None:
    cursors = CursorStore(arq_redis, "t")
    lease = Lease(arq_redis, "t:lease", ttl_s=30)
    assert await cursors.get("transactions") is None
    assert await lease.acquire()
    assert lease.token is not None
    await cursors.save("transactions", cursor=1000, lease_key=lease.key, token=lease.token, generation=0)
    assert await cursors.get("transactions") == 1000
    with pytest.raises(LeaseLostError):
        await cursors.save(
            "transactions", cursor=2000, lease_key=lease.key, token=lease.token + 1, generation=0
        )
    assert await cursors.get("transactions") == 1000
    await cursors.set("events", 42)
    assert await cursors.get("events") == 42


async def test_an_operator_write_wins_over_a_cycle_in_flight(arq_redis: ArqRedis) -> None:
    cursors = CursorStore(arq_redis, "t")
    lease = Lease(arq_redis, "t:lease", ttl_s=30)
    assert await lease.acquire()
    assert lease.token is not None
    state = await cursors.load("transactions")
    await cursors.save(
        "transactions",
        cursor=5000,
        floor=4000,
        fields={"resume": "{}", "previous": "4500"},
        lease_key=lease.key,
        token=lease.token,
        generation=state.generation,
    )
    await cursors.set("transactions", 1000)  # the operator rewinds mid-cycle
    with pytest.raises(CursorChangedError):
        await cursors.save(
            "transactions", cursor=9000, lease_key=lease.key, token=lease.token, generation=state.generation
        )
    rewound = await cursors.load("transactions")
    assert (rewound.cursor, rewound.floor, rewound.previous, rewound.resume) == (1000, None, None, None)
    assert rewound.generation == state.generation + 1


async def test_queue_enqueues_each_event_once(arq_redis: ArqRedis) -> None:
    queue = EventQueue(arq_redis, prefix="t", queue_name="t:queue", seen_retention_s=3600)
    assert await queue.enqueue(events(2)) == 2
    # The same transitions again, plus one more: only the new one is queued.
    assert await queue.enqueue(events(3)) == 1
    assert await arq_redis.zcard("t:queue") == 3
    queued = {job.decode().removeprefix("t:") for job in await arq_redis.zrange("t:queue", 0, -1)}
    assert queued == {e.key for e in events(3)}


async def test_queue_survives_crash_between_enqueue_and_seen(arq_redis: ArqRedis) -> None:
    queue = EventQueue(arq_redis, prefix="t", queue_name="t:queue", seen_retention_s=3600)
    (event,) = events(1)
    await queue.enqueue([event])
    # Simulate a crash after the job was enqueued but before it was marked seen.
    await arq_redis.delete(queue.seen_key(event.key))
    assert await queue.enqueue([event]) == 0
    assert await arq_redis.zcard("t:queue") == 1
    assert await arq_redis.exists(queue.seen_key(event.key))
