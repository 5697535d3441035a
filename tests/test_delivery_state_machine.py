"""The delivery state machine (:mod:`worker.deliver.delivery`) against a real redis-server.

A hypothesis ``RuleBasedStateMachine`` drives the real delivery path: the poller's
enqueue, ``handle_event`` / ``run_handler`` run through arq's job protocol
(:class:`tests.state_machine_kit.ArqEmulator`) on a manual clock, two handlers whose
every attempt does what hypothesis chose for it (succeed, fail, ask to retry later,
fail for good, crash the worker, hang until a stopping worker cancels it, lose the
settle's reply), dead-letter replays and purges, events offered again, and Redis
restarts. After every step it checks:

- each (event, handler) is settled at most once: the per-handler counters add up to
  the settled pairs (plus the replays), and the DLQ holds exactly the dead pairs that
  were not purged;
- nothing vanishes: an unsettled pair always has a live job in ``P:order`` or in its
  handler's ``P:pending`` set; every entry of those sets, and of the queue, has its job;
  no job function lets an exception out to arq, and none logs an internal failure;
- a side effect happens at most once per pair, and only once the earlier events of
  its transaction are settled for that handler (transition order);
- attempts are numbered one after another (a cancelled one is given back); none
  starts before the retry time its failure recorded, no ``RetryLater`` is recorded
  sooner than it asked, and a deferred job is never scored before its retry time;

and at the end that nothing waits forever: with time moved on (hours if need be) and
dead workers' leases ended, the queue drains, every subscribed pair is done (its side
effect exactly once) or dead-lettered, and no order, pending, deferred, claim or job
key is left.

``FLEXWORKER_STATE_EXAMPLES`` sets the number of examples (default 300).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import hypothesis.strategies as st
import pytest
import redis
import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from hypothesis.stateful import run_state_machine_as_test as run_machine

from tests.delivery_kit import enqueue, events, make_settings
from tests.state_machine_kit import CURRENT_JOB, ArqEmulator, Crash, ManualClock
from worker.api.client import IntegrationClient
from worker.deliver.delivery import Delivery
from worker.deliver.dlq import DeadLetter, DeadLetters, dead_letter_id
from worker.deliver.idempotency import LEASE_MARGIN_S, DeliveryRecords
from worker.deliver.runner import STORE_RETRY_S
from worker.errors import PermanentError, RetryLater
from worker.events import TransitionEvent
from worker.ops.redis_server import RedisServer
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.queue.keys import Keys
from worker.queue.ordering import event_job_id, handler_job_id
from worker.registry import LoadedHandler, activate
from worker.settings import Settings

EXAMPLES = int(os.environ.get("FLEXWORKER_STATE_EXAMPLES", "300"))

#: Every retry waits uniform(0, 10 s), at least what a RetryLater asks; three attempts in all
#: (so that a plan of three failures, or crashes, uses them up).
POLICY = RetryPolicy(max_attempts=3, base_s=10.0, cap_s=10.0, timeout_s=30.0)
LEASE_MS = int((POLICY.timeout_s + LEASE_MARGIN_S) * 1000)
#: "a" receives every transition and looks an uncertain step up; "b" a few, and cannot.
HANDLERS = ("a", "b")
B_TRANSITIONS = ("transition/inquire", "transition/confirm-payment", "transition/complete")
TRANSACTIONS = (1, 2, 3)
MAX_TRANSITIONS = 5
DRAIN_ROUNDS = 3000
#: What flexworker logs when its own code fails around a job (the job is kept, but it is a bug).
INTERNAL_FAILURES = {"event job failed; it runs again", "handler job failed; it runs again"}

Pair = tuple[str, str]  # (handler, event key)
T = TypeVar("T")


def subscribed(name: str, event: TransitionEvent) -> bool:
    return name == "a" or event.transition in B_TRANSITIONS


@dataclass(frozen=True)
class Act:
    """What one attempt does.

    ``kind``: ok, fail (OSError), later (RetryLater), permanent, crash (the worker dies),
    hang (until the worker stops and cancels it). ``where``: before the step, in the
    step before or after its side effect (``step_pre`` / ``step_post``), or after it.
    ``settle``: after the attempt's settle was applied, its reply is lost (``lost``: a
    Redis error) or the worker dies (``crash``).
    """

    kind: str = "ok"
    where: str = "before"
    after_s: float = 0.0
    settle: str = ""

    def __repr__(self) -> str:
        text = self.kind if self.kind == "ok" else f"{self.kind}@{self.where}"
        if self.kind == "later":
            text += f"({self.after_s:g})"
        return text + (f"+settle-{self.settle}" if self.settle else "")


OK = Act()
SETTLE_FAULTS = st.sampled_from(["", "", "", "lost", "crash"])
ACTS = st.one_of(
    st.just(OK),
    st.builds(Act, st.just("ok"), settle=SETTLE_FAULTS),
    st.builds(Act, st.just("fail"), st.sampled_from(["before", "step_pre", "after"]), settle=SETTLE_FAULTS),
    st.builds(
        Act,
        st.just("later"),
        st.sampled_from(["before", "after"]),
        after_s=st.sampled_from([0.5, 3.0, 30.0, 700.0]),
        settle=SETTLE_FAULTS,
    ),
    st.builds(Act, st.just("permanent"), st.sampled_from(["before", "step_pre", "after"])),
    st.builds(Act, st.just("crash"), st.sampled_from(["before", "step_pre", "step_post", "after"])),
    st.builds(Act, st.just("hang"), st.sampled_from(["before", "step_pre", "step_post", "after"])),
)
#: The attempts of one (event, handler), in order; attempts past the plan succeed.
PLANS = st.lists(ACTS, max_size=3)
#: Positions among the due jobs or the dead letters (never the items: see _pick).
PICKS = st.lists(st.integers(0, 11), min_size=1, max_size=3)


def _pick(items: list[T], picks: list[int]) -> list[T]:
    """``items`` at positions ``picks`` (modulo their number), once each.

    Draws are positions, not items, so that what hypothesis draws never depends on what
    is in Redis (concurrent jobs can make that vary from one run of an example to the next).
    """
    positions = dict.fromkeys(p % len(items) for p in picks)
    return [items[p] for p in positions]


class DeliveryMachine(RuleBasedStateMachine):
    """One namespace, two handlers, three transactions, a manual clock."""

    def __init__(self, server: RedisServer, number: int, logs: list[MutableMapping[str, Any]]) -> None:
        super().__init__()
        self.server = server
        self.logs = logs
        logs.clear()
        self.loop = asyncio.new_event_loop()
        self.broken = False
        self.clock = ManualClock()
        self.settings: Settings = make_settings(server.url, namespace=f"sm{number}")
        self.keys = Keys(self.settings.redis_prefix)
        self.delivery: Delivery | None = None
        self.arq: ArqEmulator | None = None
        self.tx_events: dict[int, list[TransitionEvent]] = {t: [] for t in TRANSACTIONS}
        self.events: dict[str, TransitionEvent] = {}
        #: what each pair's coming attempts do.
        self.plans: dict[Pair, list[Act]] = {}
        #: side effects that happened, per pair.
        self.effects: Counter[Pair] = Counter()
        #: the attempt number each pair's next attempt must have.
        self.next_attempt: dict[Pair, int] = {}
        #: the retry time (ms) a pair's next attempt must not start before.
        self.not_before: dict[Pair, int] = {}
        #: RetryLater raised in the current batch: (now ms, after_s).
        self.later: dict[Pair, tuple[int, float]] = {}
        #: job id -> the fault to inject after its next settle.
        self.settle_faults: dict[str, str] = {}
        #: claims of dead runs: key -> (token, the lease's end in ms).
        self.leases: dict[str, tuple[bytes, int]] = {}
        self.purged: set[Pair] = set()
        self.replays: Counter[str] = Counter()
        self.violations: list[str] = []
        self.trace: list[str] = []
        self.restarted = False
        self.run(self._open())

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.loop.run_until_complete(coro)
        except BaseException:
            self.broken = True
            raise

    async def _open(self) -> None:
        self.redis: ArqRedis = await create_pool(
            RedisSettings.from_dsn(self.settings.redis_url),
            default_queue_name=self.settings.queue_name,
            retry=0,
        )
        await self.redis.flushdb()
        self.http = aiohttp.ClientSession()
        self.client = IntegrationClient.from_settings(self.settings)
        self.records = DeliveryRecords(
            self.redis, self.keys, retention_s=self.settings.idempotency_retention_s, clock=self.clock
        )
        self.dead_letters = DeadLetters(self.redis, self.settings, clock=self.clock)

    async def _close(self) -> None:
        await self.client.aclose()
        await self.http.close()
        await self.redis.aclose()

    def teardown(self) -> None:
        try:
            if not self.broken and self.delivery is not None:
                self.run(self._drain())
                self.run(self._final_checks())
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self._close())
            finally:
                self.loop.close()

    def _handlers(self) -> list[LoadedHandler]:
        machine = self

        @handler("a", retry=POLICY)
        async def a(ctx: HandlerContext) -> None:
            await machine.perform("a", ctx)

        @handler("b", transitions=list(B_TRANSITIONS), retry=POLICY)
        async def b(ctx: HandlerContext) -> None:
            await machine.perform("b", ctx)

        return [activate(a, self.settings, env_file=None), activate(b, self.settings, env_file=None)]

    def _inject_settle_faults(self, delivery: Delivery) -> None:
        """After a settle Redis applied: its reply lost (a Redis error), or the worker dead."""
        real = delivery.scripts.settle

        async def settle(*args: Any, **kwargs: Any) -> list[bool]:
            applied = await real(*args, **kwargs)
            job_id = kwargs["own_job_id"]
            fault = self.settle_faults.pop(job_id, "")
            if fault == "lost":
                raise redis.ConnectionError("the settle's reply was lost (injected)")
            if fault == "crash":
                raise Crash()
            return applied

        delivery.scripts.settle = settle  # type: ignore[method-assign]

    # -- the handlers -------------------------------------------------------------------------

    async def perform(self, name: str, ctx: HandlerContext) -> None:
        """Both handlers: check the attempt, then do what its plan says around one step."""
        assert self.arq is not None
        pair = (name, ctx.event.key)
        job_id = CURRENT_JOB.get()
        now = self.clock.ms
        expected = self.next_attempt.get(pair, 1)
        if ctx.attempt != expected:
            self.violations.append(f"{pair}: attempt {ctx.attempt}, expected {expected} (job {job_id})")
        not_before = self.not_before.pop(pair, None)
        if not_before is not None and now < not_before:
            self.violations.append(
                f"{pair}: attempt {ctx.attempt} started {not_before - now} ms before its retry_at"
            )
        self.next_attempt[pair] = ctx.attempt + 1
        plan = self.plans.setdefault(pair, [])
        act = plan.pop(0) if plan else OK
        self.trace.append(f"{now}: {job_id} {name} attempt {ctx.attempt}: {act!r}")
        if act.settle:
            self.settle_faults[job_id] = act.settle
        holder = asyncio.current_task()

        async def effect() -> dict[str, str]:
            await self._act(act, "step_pre", pair, holder)
            await self._effect(name, ctx.event)
            await self._act(act, "step_post", pair, holder)
            return {"handler": name, "event": ctx.event.key}

        async def look_up() -> dict[str, str] | None:
            return {"handler": name, "event": ctx.event.key} if self.effects[pair] else None

        try:
            await self._act(act, "before", pair, holder)
            await ctx.step("effect", effect, if_uncertain=look_up if name == "a" else None)
            await self._act(act, "after", pair, holder)
        except asyncio.CancelledError:
            self.next_attempt[pair] = ctx.attempt  # a cancelled attempt is given back
            raise

    async def _act(self, act: Act, where: str, pair: Pair, holder: asyncio.Task[Any] | None) -> None:
        assert self.arq is not None
        if act.where != where:
            return
        if act.kind == "fail":
            raise OSError("scripted transient failure")
        if act.kind == "later":
            self.later[pair] = (self.clock.ms, act.after_s)
            raise RetryLater(act.after_s)
        if act.kind == "permanent":
            raise PermanentError("scripted permanent failure")
        if act.kind == "crash":
            raise Crash()
        if act.kind == "hang":
            await self.arq.hang(pair, holder if where.startswith("step") else None)

    async def _effect(self, name: str, event: TransitionEvent) -> None:
        pair = (name, event.key)
        self.effects[pair] += 1
        if self.effects[pair] > 1:
            self.violations.append(f"{pair}: side effect number {self.effects[pair]}")
        for earlier in self.tx_events[event.transaction_id.int][: event.index]:
            if subscribed(name, earlier):
                status = await self.records.status(name, earlier.key)
                if status not in ("done", "dead"):
                    self.violations.append(
                        f"{pair}: side effect while index {earlier.index} of its transaction is {status}"
                    )

    # -- rules ----------------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**32 - 1), data=st.data())
    def start(self, seed: int, data: st.DataObject) -> None:
        """The worker starts; the poller has found a first batch of transitions."""
        delivery = Delivery(
            self.redis,
            self.settings,
            self._handlers(),
            client=self.client,
            http=self.http,
            rng=random.Random(seed),
            clock=self.clock,
            queue_clock=self.clock,
        )
        self._inject_settle_faults(delivery)
        self.delivery = delivery
        self.arq = ArqEmulator(self.redis, delivery, self.clock, self.settings.queue_name)
        self.poll(data)

    @rule(data=st.data())
    def poll(self, data: st.DataObject) -> None:
        """The poller enqueues new transitions of one or two transactions."""
        picks = data.draw(
            st.lists(
                st.tuples(st.sampled_from(TRANSACTIONS), st.integers(1, 3)),
                min_size=1,
                max_size=2,
                unique_by=lambda p: p[0],
            ),
            label="transactions",
        )
        batch: list[TransitionEvent] = []
        for number, more in picks:
            have = len(self.tx_events[number])
            fresh = events(number, min(MAX_TRANSITIONS, have + more))[have:]
            for event in fresh:
                self.tx_events[number].append(event)
                self.events[event.key] = event
                for name in HANDLERS:
                    if subscribed(name, event):
                        self.plans[(name, event.key)] = data.draw(PLANS, label=f"{name} {event.key}")
            batch += fresh
        if batch:
            self.run(self._enqueue(batch))

    async def _enqueue(self, batch: list[TransitionEvent]) -> None:
        await enqueue(self.redis, self.settings, batch)
        self.clock.catch_up()

    @precondition(lambda self: self.events)
    @rule(data=st.data())
    def offer_again(self, data: st.DataObject) -> None:
        """The poller offers an event again (its seen mark was lost)."""
        key = data.draw(st.sampled_from(sorted(self.events)), label="event")
        self.run(self._offer_again(self.events[key]))

    async def _offer_again(self, event: TransitionEvent) -> None:
        await self.redis.delete(self.keys.seen(event.key))
        await self._enqueue([event])

    @precondition(lambda self: self.delivery is not None)
    @rule(picks=PICKS)
    def work(self, picks: list[int]) -> None:
        """Run one to three due jobs at once (picked by position among the due jobs, by id)."""
        assert self.arq is not None
        due = self.run(self.arq.due())
        if due:
            self.run(self._batch(_pick(due, picks)))

    @rule(seconds=st.sampled_from([0.001, 0.5, 2.0, 5.0, 11.0, 41.0, 300.0, 3600.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.run(self._end_leases())

    @precondition(lambda self: self.delivery is not None)
    @rule()
    def wait_for_next(self) -> None:
        """Move the clock to the next queued job's time (or the next lease's end)."""
        self.run(self._wait_for_next())

    @precondition(lambda self: self.delivery is not None)
    @rule(picks=PICKS, force=st.booleans(), forget=st.booleans())
    def replay(self, picks: list[int], force: bool, forget: bool) -> None:
        """Replay dead letters; ``forget`` uncertain steps (when their effect did not happen)."""
        letters = self.run(self.dead_letters.list())
        if letters:
            chosen = _pick(sorted(letters, key=lambda d: d.id), picks)
            self.run(self._replay(chosen, force=force, forget=forget))

    async def _replay(self, letters: list[DeadLetter], *, force: bool, forget: bool) -> None:
        for letter in letters:
            pair = (letter.handler, letter.event_key)
            # An operator forgets uncertain steps only after checking that they did not happen.
            forget_uncertain = forget and self.effects[pair] == 0
            replayed = await self.dead_letters.replay(
                [letter], force=force, forget_uncertain=forget_uncertain
            )
            if replayed:
                self.replays[letter.handler] += 1
                self.next_attempt[pair] = 1
                self.not_before.pop(pair, None)
        self.clock.catch_up()

    @precondition(lambda self: self.delivery is not None)
    @rule(pick=st.integers(0, 11))
    def purge(self, pick: int) -> None:
        letters = self.run(self.dead_letters.list())
        if letters:
            (letter,) = _pick(sorted(letters, key=lambda d: d.id), [pick])
            if self.run(self.dead_letters.purge([letter])):
                self.purged.add((letter.handler, letter.event_key))

    @precondition(lambda self: self.delivery is not None and not self.restarted)
    @rule(kill=st.booleans())
    def restart_redis(self, kill: bool) -> None:
        """Redis restarts between jobs (SIGKILL or SIGTERM; append-only file, fsync always)."""
        self.restarted = True
        self.run(self._compact_aof())
        if kill:
            self.server.kill()
            self.server.start()
        else:
            self.server.restart()
        self.run(self.redis.connection_pool.disconnect())

    async def _compact_aof(self) -> None:
        """Rewrite the append-only file first, so that restarts stay fast over many examples."""
        await self.redis.execute_command("BGREWRITEAOF")  # type: ignore[no-untyped-call]
        for _ in range(500):
            info = await self.redis.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            await asyncio.sleep(0.01)

    # -- running jobs -------------------------------------------------------------------------

    async def _batch(self, job_ids: list[str]) -> None:
        assert self.arq is not None
        batch_ms = self.clock.ms
        self.later.clear()
        runs = await self.arq.run(job_ids)
        for job in runs:
            self.trace.append(f"{batch_ms}: {job.job_id} try {job.job_try}: {job.outcome} {job.error!r}")
            if job.outcome == "error":
                self.violations.append(f"job {job.job_id} let an exception out to arq: {job.error!r}")
        if self.arq.expired:
            self.violations.append(f"arq found queued jobs without a job key (expired): {self.arq.expired}")
        self.arq.expired.clear()
        cancelled = {f"{job.job_id}#{job.job_try}".encode() for job in runs if job.outcome == "cancelled"}
        await self._after_batch(batch_ms, cancelled)

    async def _after_batch(self, batch_ms: int, cancelled: set[bytes]) -> None:
        # Claims still held after a batch belong to runs that died: their lease began now.
        claims = [k async for k in self.redis.scan_iter(match=f"{self.keys.prefix}:claim:*")]
        tokens = await self.redis.mget(claims) if claims else []
        held = {k.decode(): t for k, t in zip(claims, tokens, strict=True) if t is not None}
        if left := {k for k, t in held.items() if t in cancelled}:
            # A cancelled run gives its attempts back or settles them: it holds no claim after.
            self.violations.append(f"a cancelled run still holds {left}")
        for key, token in held.items():
            if key not in self.leases or self.leases[key][0] != token:
                self.leases[key] = (token, batch_ms + LEASE_MS)
        for key in set(self.leases) - set(held):
            del self.leases[key]
        # The retry times the settles recorded: no attempt may start earlier.
        pairs = self._pairs()
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, key in pairs:
                pipe.hmget(self.keys.delivery(name, key), ["retry_at", "run"])
            rows = await pipe.execute()
        for pair, (retry_at, run) in zip(pairs, rows, strict=True):
            if retry_at is None or run is not None:
                continue
            self.not_before[pair] = int(retry_at)
            if pair in self.later:
                failed_ms, after_s = self.later[pair]
                if int(retry_at) < failed_ms + int(after_s * 1000):
                    self.violations.append(
                        f"{pair}: RetryLater({after_s:g}) at {failed_ms} but retry_at {int(retry_at)}"
                    )

    async def _end_leases(self) -> None:
        """The claims of dead runs whose lease has passed (in manual time) expire."""
        for key, (token, end_ms) in list(self.leases.items()):
            if end_ms <= self.clock.ms:
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    current = await pipe.get(key)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if current == token:
                        pipe.delete(key)
                    await pipe.execute()
                del self.leases[key]

    async def _wait_for_next(self) -> None:
        assert self.arq is not None
        times = [s for s in (await self.arq.scores()).values() if s > self.clock.ms]
        times += [end for _, end in self.leases.values()]
        if times:
            self.clock.advance_to(min(times))
            await self._end_leases()

    async def _drain(self) -> None:
        """Time goes on (hours if need be) and dead workers' leases end: the queue must empty."""
        assert self.arq is not None
        waits = 0
        for _ in range(DRAIN_ROUNDS):
            await self._end_leases()
            if due := await self.arq.due():
                await self._batch(due)
                continue
            scores = await self.arq.scores()
            if not scores:
                return
            waits += 1
            if waits % 8 == 0:
                # Now and then the fleet is down for a while, so everything queued is due at
                # once (jobs parked behind a far-off retry would otherwise wake every 5 s).
                self.clock.advance_to(max(scores.values()))
            else:
                await self._wait_for_next()
        raise AssertionError(
            "\n".join([f"the queue never drained: {await self.arq.scores()}", "trace:", *self.trace[-80:]])
        )

    # -- checks ---------------------------------------------------------------------------------

    def _pairs(self) -> list[Pair]:
        return [
            (name, key) for key, event in self.events.items() for name in HANDLERS if subscribed(name, event)
        ]

    def _fail(self, problems: list[str]) -> None:
        assert not problems, "\n".join([*problems, "trace (last 80):", *self.trace[-80:]])

    @invariant()
    def consistent(self) -> None:
        if self.delivery is not None:
            self.run(self._check())

    async def _check(self) -> None:
        assert self.delivery is not None and self.arq is not None
        internal = [e for e in self.logs if e.get("event") in INTERNAL_FAILURES]
        self._fail(self.violations + [f"internal failure logged: {e}" for e in internal])
        self._fail(
            [f"finished_jobs left over: {self.delivery.finished_jobs}"] if self.delivery.finished_jobs else []
        )
        keys, prefix = self.keys, self.keys.prefix
        pairs = self._pairs()
        txs = sorted({e.transaction_id for e in self.events.values()}, key=str)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, key in pairs:
                pipe.hget(keys.delivery(name, key), "status")
            for tx in txs:
                pipe.zrange(keys.order(tx), 0, -1)
                for name in HANDLERS:
                    pipe.zrange(keys.pending(name, tx), 0, -1)
            pipe.hkeys(keys.dlq)
            pipe.zrange(keys.dlq_index, 0, -1)
            pipe.zrange(keys.deferred, 0, -1, withscores=True)
            for name in HANDLERS:
                pipe.hgetall(keys.stats(name))
            replies = list(await pipe.execute())
        statuses = {pair: (s.decode() if s else None) for pair, s in zip(pairs, replies, strict=False)}
        replies = replies[len(pairs) :]
        entries: dict[str, set[str]] = {}
        for tx in txs:
            entries[keys.order(tx)] = {m.decode() for m in replies.pop(0)}
            for name in HANDLERS:
                entries[keys.pending(name, tx)] = {m.decode() for m in replies.pop(0)}
        dlq = {i.decode() for i in replies.pop(0)}
        dlq_index = {i.decode() for i in replies.pop(0)}
        deferred = {m.decode(): int(s) for m, s in replies.pop(0)}
        counters = {name: {k.decode(): int(v) for k, v in replies.pop(0).items()} for name in HANDLERS}
        queue = await self.arq.scores()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in queue:
                pipe.exists(job_key_prefix + job_id)
            alive = {job_id for job_id, n in zip(queue, await pipe.execute(), strict=True) if n}

        problems: list[str] = []
        if dlq != dlq_index:
            problems.append(f"P:dlq {dlq} and its index {dlq_index} differ")
        if missing := set(queue) - alive:
            problems.append(f"queued without a job key: {missing}")
        for zset, members in entries.items():
            if stale := members - alive:
                problems.append(f"{zset} holds {stale}, which are not queued jobs")
        for member, until in deferred.items():
            if until <= self.clock.ms or member not in queue:
                continue
            if queue[member] < until:
                problems.append(
                    f"deferred job {member} scored {queue[member]}, before its retry time {until}"
                )
            if queue[member] > until + STORE_RETRY_S * 1000:
                problems.append(
                    f"deferred job {member} scored {queue[member]}, long after its retry time {until}"
                )
        for name in HANDLERS:
            settled = sum(1 for (h, _), s in statuses.items() if h == name and s in ("done", "dead"))
            c = counters[name]
            if c.get("done", 0) + c.get("dead_lettered", 0) != settled + self.replays[name]:
                problems.append(
                    f"{name}: counters {c} for {settled} settled pairs and {self.replays[name]} replays"
                )
        for pair, status in statuses.items():
            name, key = pair
            event = self.events[key]
            lettered = dead_letter_id(name, key) in dlq
            if status == "dead" and pair not in self.purged and not lettered:
                problems.append(f"{pair} is dead but not in the DLQ")
            if status != "dead" and lettered:
                problems.append(f"{pair} is {status} and in the DLQ")
            if status is None:
                # Nothing vanishes: its event job, or a job of its handler, still holds it.
                own = handler_job_id(key, name, prefix)
                held = event_job_id(prefix, key) in entries[keys.order(event.transaction_id)] or any(
                    m == own or m.startswith(own + ":replay:")
                    for m in entries[keys.pending(name, event.transaction_id)]
                )
                if not held:
                    problems.append(f"{pair} is unsettled and in no order or pending set")
        self._fail(problems)

    async def _final_checks(self) -> None:
        await self._check()
        problems = []
        for name, key in self._pairs():
            record = await self.records.read(name, key)
            effects = self.effects[(name, key)]
            if record.status == "done" and effects != 1:
                problems.append(f"{(name, key)} is done with {effects} side effects")
            elif record.status == "dead" and effects > 1:
                problems.append(f"{(name, key)} is dead with {effects} side effects")
            elif record.status not in ("done", "dead"):
                problems.append(f"{(name, key)} never settled: {record}")
        prefix = self.keys.prefix
        for pattern in ("order:*", "pending:*", "claim:*", "deferred"):
            if left := [k.decode() async for k in self.redis.scan_iter(match=f"{prefix}:{pattern}")]:
                problems.append(f"left behind: {left}")
        if jobs := [k.decode() async for k in self.redis.scan_iter(match=f"{job_key_prefix}{prefix}:*")]:
            problems.append(f"job keys left behind: {jobs}")
        self._fail(problems)


@pytest.mark.timeout(120 + EXAMPLES)
def test_delivery_state_machine(redis_server: RedisServer) -> None:
    numbers = iter(range(1_000_000))
    with structlog.testing.capture_logs() as logs:
        run_machine(
            lambda: DeliveryMachine(redis_server, next(numbers), logs),  # type: ignore[arg-type]
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )
