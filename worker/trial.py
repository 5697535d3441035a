"""Run a handler on one event through the real job path, for a plugin's own tests.

:class:`Deliver` starts an in-process worker with just that handler on a Redis
(``worker.testing``'s private ``redis_url``), queues the handler's own job exactly
as a retry or a hand-over does, waits until the delivery settles and reports how: done, a no-op
(already done), dead-lettered, or not subscribed at all. Everything is real —
claims, attempts, backoff, ``ctx.step`` records, the dead-letter queue — except
that the backoff waits are shortened to ``backoff_s`` (``RetryLater`` still waits
as long as it asks). ``ctx.client`` talks to ``sharetribe_api_base_url``, so a test
whose handler calls the API points it at a simulator or a local server with
:meth:`Deliver.with_settings`. Calls share the Redis, so delivering the same event
twice shows the idempotency::

    async def test_posts_once(deliver: Deliver) -> None:
        event = make_event("transition/confirm-payment")
        assert (await deliver(event, webhook, handler_settings=WebhookSettings(url=URL))).status == "done"
        assert (await deliver(event, webhook, handler_settings=WebhookSettings(url=URL))).status == "skipped"
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from arq.connections import RedisSettings, create_pool

from worker.deliver.dlq import DeadLetter, DeadLetters, dead_letter_id
from worker.deliver.idempotency import DeliveryRecords
from worker.events import TransitionEvent
from worker.plugin import HandlerSpec
from worker.queue.keys import Keys
from worker.queue.ordering import HANDLER_JOB_FUNCTION, Ordering, QueuedJob, handler_job_id
from worker.registry import LoadedHandler, activate
from worker.service import run_worker
from worker.settings import Settings

__all__ = ["Deliver", "DeliveryOutcome"]

Status = Literal["done", "skipped", "dead_lettered", "not_subscribed"]


@dataclass(frozen=True)
class DeliveryOutcome:
    """How one delivery ended."""

    status: Status
    #: attempts made (as the delivery record counts them).
    attempts: int = 0
    #: each failed attempt's error, ``"Type: message"``.
    errors: list[str] = field(default_factory=list)
    #: the dead-letter entry, when dead-lettered.
    dead_letter: DeadLetter | None = None


class Deliver:
    """Deliver events to a handler through an in-process worker (see the module doc)."""

    def __init__(
        self,
        redis_url: str,
        *,
        namespace: str = "plugin-test",
        backoff_s: float = 0.01,
        timeout_s: float = 60.0,
        **settings: Any,
    ) -> None:
        """``settings`` are flexworker settings by field name (``sharetribe_api_base_url=...``)."""
        values: dict[str, Any] = {
            "sharetribe_client_id": "plugin-test",
            "sharetribe_client_secret": "plugin-test",  # no API is called with it unless a test says so
            "handlers": [],
            **settings,
            "redis_url": redis_url,
            "namespace": namespace,
        }
        self.settings = Settings(_env_file=None, _secrets_dir=None, **values)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._given = settings
        self._runs = itertools.count(1)

    def with_settings(self, **settings: Any) -> Deliver:
        """The same deliverer (same Redis, same namespace) with some settings changed.

        For a handler that uses ``ctx.client``: point it at a simulator or a local
        server with ``sharetribe_api_base_url``, and turn ``rate_limit`` off.
        """
        other = Deliver(
            self.settings.redis_url,
            namespace=self.settings.namespace,
            backoff_s=self.backoff_s,
            timeout_s=self.timeout_s,
            **{**self._given, **settings},
        )
        other._runs = self._runs  # job ids stay unique across both
        return other

    def _loaded(self, handler: Any, handler_settings: Any) -> LoadedHandler:
        if isinstance(handler, HandlerSpec) and handler_settings is not None:
            loaded = LoadedHandler(handler, handler.create(self.settings, handler_settings), handler_settings)
        else:
            loaded = activate(handler, self.settings, env_file=None)
        policy = loaded.spec.retry
        base_s = min(policy.base_s, self.backoff_s)
        fast = dataclasses.replace(
            policy, base_s=base_s, cap_s=max(base_s, min(policy.cap_s, self.backoff_s))
        )
        return LoadedHandler(
            dataclasses.replace(loaded.spec, retry=fast), loaded.handler, loaded.handler_settings
        )

    async def __call__(
        self, event: TransitionEvent, handler: Any, *, handler_settings: Any = None
    ) -> DeliveryOutcome:
        """Deliver ``event`` to ``handler`` (a ``HandlerSpec``, ``Handler`` class or instance)."""
        loaded = self._loaded(handler, handler_settings)
        if not loaded.spec.subscription.matches(event):
            return DeliveryOutcome("not_subscribed")
        name = loaded.name
        keys = Keys(self.settings.redis_prefix)
        run = next(self._runs)
        pool = await create_pool(RedisSettings.from_dsn(self.settings.redis_url))
        try:
            before = await _counters(pool, keys, name)
            stop = asyncio.Event()
            worker = asyncio.create_task(run_worker(self.settings, stop, handlers=[loaded]))
            try:
                await Ordering(pool, keys, queue_name=self.settings.queue_name).enqueue(
                    [
                        QueuedJob(
                            job_id=f"{handler_job_id(event.key, name, keys.prefix)}:trial-{run}",
                            function=HANDLER_JOB_FUNCTION,
                            args=(name, event.model_dump(mode="json")),
                            pending_key=keys.pending(name, event.transaction_id),
                            index=event.index,
                        )
                    ],
                )
                status = await self._settled(pool, keys, name, before, worker)
            finally:
                stop.set()
                await worker
            record = await DeliveryRecords(
                pool, keys, retention_s=self.settings.idempotency_retention_s
            ).read(name, event.key)
            letter = None
            if status == "dead_lettered":
                letter = await DeadLetters(pool, self.settings).show(dead_letter_id(name, event.key))
            return DeliveryOutcome(
                status,
                attempts=record.attempts,
                errors=[f"{e.type}: {e.message}" for e in record.errors],
                dead_letter=letter,
            )
        finally:
            await pool.aclose()

    async def _settled(
        self, pool: Any, keys: Keys, name: str, before: dict[str, int], worker: asyncio.Task[None]
    ) -> Status:
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = await _counters(pool, keys, name)
            for counter, status in (
                ("done", "done"),
                ("dead_lettered", "dead_lettered"),
                ("skipped", "skipped"),
            ):
                if now.get(counter, 0) > before.get(counter, 0):
                    return status  # type: ignore[return-value]
            if worker.done():
                worker.result()  # a worker that died says why
                raise RuntimeError("the worker stopped before the delivery settled")
            if time.monotonic() > deadline:
                raise TimeoutError(f"handler {name!r} did not settle within {self.timeout_s:g} s")
            await asyncio.sleep(0.02)


async def _counters(pool: Any, keys: Keys, name: str) -> dict[str, int]:
    raw = await pool.hgetall(keys.stats(name))
    return {k.decode(): int(v) for k, v in raw.items()}
