"""pytest fixtures for flexworker's tests and for plugin authors' tests.

Enable with ``pytest_plugins = ["worker.testing"]`` in a ``conftest.py``.

- ``redis_server``: a private :class:`~worker.ops.redis_server.RedisServer` (persistent,
  so tests can kill and restart it) on a free port, removed afterwards.
- ``redis_url``: its URL.
- ``arq_redis``: an :class:`arq.connections.ArqRedis` pool on it.

- ``sim``: a fresh :class:`~worker.sim.Simulator` (seed 1, no rate limits, no
  faults, no live traffic); ``sim_url``: it served on a free localhost port.
- ``deliver``: runs a handler on an event through the real job path (claims,
  retries with shortened backoff, idempotency, ``ctx.step``, the dead-letter
  queue) and returns a :class:`~worker.trial.DeliveryOutcome`.

Factories: :func:`make_transaction`, :func:`make_event` (any transition of the
default processes, reached the shortest way unless a path is given) and
:func:`make_user`.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from arq.connections import ArqRedis, RedisSettings, create_pool

from worker.api.models import Listing, Transaction, User
from worker.events import TransitionEvent, events_from_transaction
from worker.ops.redis_server import RedisServer
from worker.processes import INITIAL_STATE, Process, get_process
from worker.sim import SimConfig, Simulator, serve
from worker.trial import Deliver, DeliveryOutcome

__all__ = [
    "Deliver",
    "DeliveryOutcome",
    "arq_redis",
    "deliver",
    "make_event",
    "make_transaction",
    "make_user",
    "redis_server",
    "redis_url",
    "sim",
    "sim_url",
]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(persist=True) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def sim() -> Simulator:
    """A fresh simulator: seed 1, no rate limits, no faults, no live traffic (call ``sim.traffic.step``)."""
    return Simulator(SimConfig(seed=1, rate_limits=None))


@pytest.fixture
async def sim_url(sim: Simulator) -> AsyncIterator[str]:
    """``sim`` served on a free localhost port; the base URL (``http://127.0.0.1:PORT``)."""
    async with serve(sim) as url:
        yield url


@pytest.fixture
def deliver(redis_url: str) -> Deliver:
    """``await deliver(event, handler, handler_settings=...)`` through the real job path."""
    return Deliver(redis_url)


@pytest_asyncio.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


# -- factories ------------------------------------------------------------------------

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _path_to(process: Process, transition: str) -> list[str]:
    """The shortest run of transitions from the start that ends with ``transition``."""
    queue: deque[tuple[str, list[str]]] = deque([(INITIAL_STATE, [])])
    visited = {INITIAL_STATE}
    while queue:
        state, path = queue.popleft()
        for tr in process.next_transitions(state):
            if tr.name == transition:
                return [*path, tr.name]
            if tr.to_state not in visited:
                visited.add(tr.to_state)
                queue.append((tr.to_state, [*path, tr.name]))
    raise ValueError(f"{process.name} has no transition {transition!r}")


def make_user(
    *, email: str = "customer@example.com", phone: str | None = "+358401234567", **profile: Any
) -> User:
    """A user resource as ``include=customer`` returns it."""
    return User.model_validate(
        {
            "id": uuid.uuid4(),
            "type": "user",
            "attributes": {
                "createdAt": T0,
                "email": email,
                "profile": {
                    "displayName": "Test U",
                    "protectedData": {"phoneNumber": phone} if phone else {},
                    **profile,
                },
            },
        }
    )


def make_transaction(
    transitions: Sequence[str] = ("transition/request-payment", "transition/confirm-payment"),
    *,
    process: str = "default-booking",
    transaction_id: uuid.UUID | None = None,
    start: datetime = T0,
    step: timedelta = timedelta(minutes=5),
    protected_data: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    payin_amount: int | None = 10_000,
    currency: str = "EUR",
) -> Transaction:
    """A transaction that took ``transitions`` in order (checked against the process)."""
    proc = get_process(process)
    state = INITIAL_STATE
    history = []
    for i, name in enumerate(transitions):
        state = proc.target(state, name)
        history.append({"transition": name, "createdAt": start + i * step, "by": proc.transition(name).actor})
    if not history:
        raise ValueError("a transaction has at least one transition")
    money = {"amount": payin_amount, "currency": currency} if payin_amount is not None else None
    return Transaction.model_validate(
        {
            "id": transaction_id or uuid.uuid4(),
            "type": "transaction",
            "attributes": {
                "createdAt": start,
                "processName": proc.name,
                "processVersion": proc.version,
                "state": state,
                "lastTransition": history[-1]["transition"],
                "lastTransitionedAt": history[-1]["createdAt"],
                "transitions": history,
                "payinTotal": money,
                "protectedData": protected_data or {},
                "metadata": metadata or {},
            },
        }
    )


def make_event(
    transition: str = "transition/confirm-payment",
    *,
    process: str = "default-booking",
    path: Sequence[str] | None = None,
    customer: User | None = None,
    provider: User | None = None,
    listing: Listing | None = None,
    **transaction: Any,
) -> TransitionEvent:
    """The event of ``transition``, reached by ``path`` (default: the shortest way there).

    ``customer`` and ``provider`` default to fresh users, as with ``FLEXWORKER_INCLUDE``.
    """
    steps = list(path) if path is not None else _path_to(get_process(process), transition)
    if steps[-1] != transition:
        steps.append(transition)
    tx = make_transaction(steps, process=process, **transaction)
    event = events_from_transaction(tx, newer_than=None, source="transactions")[-1]
    return event.model_copy(
        update={
            "customer": customer or make_user(),
            "provider": provider or make_user(email="provider@example.com"),
            "listing": listing,
        }
    )
