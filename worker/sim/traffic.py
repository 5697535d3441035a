"""Synthetic marketplace traffic: transactions walking the default processes.

:class:`Traffic` drives a :class:`~worker.sim.store.Store` the way a busy
marketplace would. It keeps a pool of users and listings (created on first use),
starts new ``default-booking`` and ``default-purchase`` transactions and advances
open ones along legal transitions — customer, provider, operator and system ones
alike. A share of steps deliberately reuses the previous step's timestamp (when that
step was at most ``tie_window`` ago), so several transitions land in the same
millisecond (``createdAt`` is not a cursor: clients must cope); a share of
transactions take a second step right away, in the same millisecond.

Besides transitions, an :class:`Activity` makes traffic post messages, delete and
ban users, delete listings and delete finished transactions, each with its own odds
per step (all 0 by default; :data:`LIVELY` is what ``flexworker sim`` and the demo
use). Users are only deleted when they are in no open transaction (the Marketplace
API refuses to delete such an account); gone users and unusable listings are
replaced in the pool before the next transaction starts, so the marketplace keeps
its size. Extras happen only in :meth:`Traffic.step` and live traffic, not in
:meth:`Traffic.build_history`; with every share at 0 they draw nothing from the RNG,
so a seed's transitions stay what they were.

Three ways to use it:

* :meth:`Traffic.step` applies ``n`` transitions right now (tests).
* :meth:`Traffic.start` / :meth:`Traffic.stop` run it live at ``rate`` transitions
  per second as an asyncio task that catches up on elapsed time, so the rate holds
  even when the loop was busy.
* :meth:`Traffic.build_history` writes a large past history quickly (thousands of
  transactions spread over a time window, applied in chronological order).

All choices come from an RNG seeded with ``seed`` and never depend on the clock,
so the same seed against a fresh store gives the same transitions and ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from worker.errors import ConfigError
from worker.processes import INITIAL_STATE, PROCESSES, Process, Transition
from worker.sim.store import Listing, LoggedTransition, Store, Transaction, User, truncate_ms

__all__ = ["DEFAULT_WEIGHTS", "LIVELY", "MESSAGE_TEXTS", "Activity", "Traffic"]

log = logging.getLogger(__name__)

#: Relative odds of each transition when several are possible (1.0 when not listed):
#: mostly happy paths, with enough expiries, declines, disputes and cancels to matter.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "transition/inquire": 0.3,
    "transition/request-payment": 1.0,
    "transition/expire-payment": 0.15,
    "transition/confirm-payment": 1.0,
    "transition/operator-accept": 0.15,
    "transition/decline": 0.2,
    "transition/operator-decline": 0.05,
    "transition/expire": 0.1,
    "transition/operator-complete": 0.1,
    "transition/cancel": 0.1,
    "transition/auto-cancel": 0.05,
    "transition/operator-mark-delivered": 0.1,
    "transition/mark-received-from-purchased": 0.2,
    "transition/dispute": 0.1,
    "transition/operator-dispute": 0.05,
    "transition/cancel-from-disputed": 0.3,
    "transition/auto-cancel-from-disputed": 0.2,
    "transition/expire-review-period": 0.3,
    "transition/expire-provider-review-period": 0.3,
    "transition/expire-customer-review-period": 0.3,
}


#: What the generated messages say.
MESSAGE_TEXTS = (
    "Hi! Is this still available?",
    "Can we move the start by a day?",
    "Thanks, see you then.",
    "Running ten minutes late, sorry.",
    "All good on my side.",
)


@dataclass(frozen=True)
class Activity:
    """What traffic does besides transitions: the odds of each per step, in [0, 1] (0 = never)."""

    #: A message in an open transaction, from the customer or the provider.
    message_share: float = 0.0
    #: A user in no open transaction deletes their account (and so their listings).
    user_deletion_share: float = 0.0
    #: An operator bans a user (their listings close; their transactions go on).
    user_ban_share: float = 0.0
    #: An operator deletes a listing (its transactions go on).
    listing_deletion_share: float = 0.0
    #: A finished transaction is deleted.
    transaction_deletion_share: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"traffic {f.name} must be between 0 and 1, got {value}")


#: Low enough that nearly every transaction runs its course, high enough that a
#: minute of demo traffic meets every kind of removal: ``flexworker sim`` and the demo.
LIVELY = Activity(
    message_share=0.05,
    user_deletion_share=0.002,
    user_ban_share=0.001,
    listing_deletion_share=0.002,
    transaction_deletion_share=0.002,
)


@dataclass(frozen=True)
class _Planned:
    """One transition of :meth:`Traffic.build_history`'s plan."""

    at: datetime
    tx_index: int
    step: int
    transition: str


class Traffic:
    """Seeded traffic over a store; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        seed: int | str = 0,
        rate: float = 0.0,
        users: int = 12,
        listings: int = 8,
        new_share: float = 0.3,
        tie_share: float = 0.25,
        follow_share: float = 0.15,
        tie_window: timedelta = timedelta(milliseconds=50),
        weights: Mapping[str, float] | None = None,
        activity: Activity | None = None,
    ) -> None:
        if users < 2 or listings < 1:
            raise ValueError("traffic needs at least two users and one listing")
        self.store = store
        self.rate = rate
        self.new_share = new_share
        self.tie_share = tie_share
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.activity = activity or Activity()
        self._rng = random.Random(f"traffic:{seed}")
        self._pool_size = (users, listings)
        self.users: list[User] = []
        self.listings: list[Listing] = []
        self.follow_share = follow_share
        self.tie_window = tie_window
        #: Open transactions: a list for random picks plus each one's index.
        self._open: list[uuid.UUID] = []
        self._open_at: dict[uuid.UUID, int] = {}
        #: Transactions traffic saw finish: the ones it may delete.
        self._finished: list[uuid.UUID] = []
        self._removals_seen = 0
        self._follow: uuid.UUID | None = None
        self._last_at: datetime | None = None
        self._task: asyncio.Task[None] | None = None

    # -- setup and choices ------------------------------------------------------------

    def setup(self) -> None:
        """Create the user and listing pool (once); listings alternate between the two processes."""
        if self.users:
            return
        n_users, n_listings = self._pool_size
        self.users = [self.store.create_user() for _ in range(n_users)]
        names = sorted(PROCESSES)
        for i in range(n_listings):
            author = self.users[i % n_users]
            self.listings.append(self.store.create_listing(author.id, process_name=names[i % len(names)]))

    def _pick(self, options: Sequence[Transition]) -> Transition:
        weights = [self.weights.get(t.name, 1.0) for t in options]
        return self._rng.choices(options, weights=weights)[0]

    def _customer_for(self, listing: Listing) -> User:
        others = [u for u in self.users if u.id != listing.author_id]
        return self._rng.choice(others)

    def _heal_pool(self) -> None:
        # Someone (traffic itself or a test through /_sim/) may have deleted or banned
        # pool members: newcomers take their places, so choices stay among usable ones.
        if self.store.removals == self._removals_seen:
            return
        self._removals_seen = self.store.removals
        for index, user in enumerate(self.users):
            if user.gone:
                self.users[index] = self.store.create_user()
        for index, listing in enumerate(self.listings):
            author = self.store.user(listing.author_id)
            if listing.deleted or listing.state != "published" or author.gone:
                if author.gone:
                    author = self.users[index % len(self.users)]
                self.listings[index] = self.store.create_listing(author.id, process_name=listing.process_name)

    def _next_time(self, not_before: datetime | None, *, tie: bool = False) -> datetime:
        # Draw first so the RNG sequence never depends on the clock.
        tie = self._rng.random() < self.tie_share or tie
        now = self.store.now()
        last = self._last_at
        if last is not None and tie and now - last <= self.tie_window:
            # Same millisecond as the previous step, but only if that step was just now:
            # a tie must never stamp a transition far in the past.
            at = last
        else:
            at = now if last is None else max(now, last)
        if not_before is not None:
            at = max(at, not_before)
        self._last_at = at
        return at

    # -- live stepping ------------------------------------------------------------------

    def step(self, n: int = 1) -> list[LoggedTransition]:
        """Apply ``n`` transitions now and return them (as logged by the store)."""
        self.setup()
        done: list[LoggedTransition] = []
        for _ in range(n):
            self._step_once()
            done.append(self.store.transition_log[-1])
            self._side_activity()
        return done

    def _add_open(self, tx_id: uuid.UUID) -> None:
        self._open_at[tx_id] = len(self._open)
        self._open.append(tx_id)

    def _discard_open(self, tx_id: uuid.UUID) -> None:
        # Swap with the last entry: O(1) removal while keeping random picks by index.
        index = self._open_at.pop(tx_id, None)
        if index is None:
            return
        last = self._open.pop()
        if last != tx_id:
            self._open[index] = last
            self._open_at[last] = index

    def _finish(self, tx_id: uuid.UUID) -> None:
        self._discard_open(tx_id)
        self._finished.append(tx_id)

    def _open_transaction(self, tx_id: uuid.UUID) -> Transaction | None:
        """The open transaction ``tx_id``, or ``None`` (forgotten) when it can no longer move."""
        tx = self.store.transactions.get(tx_id)
        if tx is None or self.store.deleted_party(tx) is not None:
            # Deleted, or frozen by a deleted party: it will never move again.
            self._discard_open(tx_id)
            return None
        return tx

    def _advance(self, tx: Transaction, *, tie: bool = False) -> bool:
        options = tx.process.next_transitions(tx.state)
        if not options:
            # Someone else (an API command) finished it: forget it.
            self._finish(tx.id)
            return False
        tr = self._pick(options)
        self.store.apply_transition(tx.id, tr.name, at=self._next_time(tx.last_transitioned_at, tie=tie))
        if tx.process.is_final(tx.state):
            self._finish(tx.id)
        return True

    def _maybe_follow(self, tx: Transaction) -> None:
        # Real parties often act in bursts (request then confirm payment at once).
        if self._rng.random() < self.follow_share and not tx.process.is_final(tx.state):
            self._follow = tx.id

    def _step_once(self) -> None:
        follow, self._follow = self._follow, None
        if follow is not None:
            tx = self._open_transaction(follow)
            if tx is not None and self._advance(tx, tie=True):
                self._maybe_follow(tx)
                return
        while self._open and self._rng.random() >= self.new_share:
            tx = self._open_transaction(self._open[self._rng.randrange(len(self._open))])
            if tx is not None and self._advance(tx):
                self._maybe_follow(tx)
                return
        self._heal_pool()
        listing = self._rng.choice(self.listings)
        customer = self._customer_for(listing)
        process = PROCESSES[listing.process_name]
        first = self._pick(process.initial_transitions)
        tx = self.store.initiate_transaction(listing.id, customer.id, first.name, at=self._next_time(None))
        if not process.is_final(tx.state):
            self._add_open(tx.id)
            self._maybe_follow(tx)
        else:
            self._finished.append(tx.id)

    # -- side activity ----------------------------------------------------------------

    def _side_activity(self) -> None:
        # One draw per kind that is switched on, in a fixed order; none when it is off.
        activity = self.activity
        for share, act in (
            (activity.message_share, self._post_message),
            (activity.user_deletion_share, self._delete_user),
            (activity.user_ban_share, self._ban_user),
            (activity.listing_deletion_share, self._delete_listing),
            (activity.transaction_deletion_share, self._delete_transaction),
        ):
            if share > 0 and self._rng.random() < share:
                act()

    def _post_message(self) -> None:
        if not self._open:
            return
        tx = self._open_transaction(self._open[self._rng.randrange(len(self._open))])
        if tx is None:
            return
        sender = self._rng.choice((tx.customer_id, tx.provider_id))
        text = self._rng.choice(MESSAGE_TEXTS)
        if self.store.user(sender).gone:
            return
        self.store.add_message(tx.id, text, sender_id=sender, at=self._next_time(tx.last_message_at))

    def _delete_user(self) -> None:
        busy: set[uuid.UUID] = set()
        for tx_id in self._open:
            tx = self.store.transactions.get(tx_id)
            if tx is not None:
                busy.update((tx.customer_id, tx.provider_id))
        candidates = [u for u in self.users if not u.gone and u.id not in busy]
        if candidates:
            self.store.delete_user(self._rng.choice(candidates).id, at=self._next_time(None))

    def _ban_user(self) -> None:
        candidates = [u for u in self.users if not u.gone]
        if candidates:
            self.store.ban_user(self._rng.choice(candidates).id, at=self._next_time(None))

    def _delete_listing(self) -> None:
        candidates = [listing for listing in self.listings if not listing.deleted]
        if candidates:
            self.store.delete_listing(self._rng.choice(candidates).id, at=self._next_time(None))

    def _delete_transaction(self) -> None:
        while self._finished:
            index = self._rng.randrange(len(self._finished))
            # Swap-remove: order does not matter, picks are by index.
            self._finished[index], self._finished[-1] = self._finished[-1], self._finished[index]
            tx_id = self._finished.pop()
            if tx_id in self.store.transactions:
                self.store.delete_transaction(tx_id, at=self._next_time(None))
                return

    def start(self) -> None:
        """Run live in the current event loop (no-op if already running)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-traffic")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started, done, rate = loop.time(), 0, self.rate
        while True:
            if self.rate != rate:
                # A new rate counts from now, not from when the old one started.
                started, done, rate = loop.time(), 0, self.rate
            if rate <= 0:
                await asyncio.sleep(0.1)
                continue
            due = int((loop.time() - started) * rate) - done
            if due > 0:
                # Bounded bursts keep the server responsive while catching up.
                batch = min(due, 500)
                try:
                    self.step(batch)
                except Exception:
                    log.exception("traffic step failed")
                done += batch
            await asyncio.sleep(max(0.0, (done + 1) / rate - (loop.time() - started)))

    # -- history --------------------------------------------------------------------------

    def build_history(
        self,
        transactions: int,
        *,
        start: datetime,
        end: datetime | None = None,
        stop_share: float = 0.1,
        mean_gap: timedelta = timedelta(hours=6),
    ) -> list[uuid.UUID]:
        """Create ``transactions`` transactions with histories between ``start`` and ``end`` (default now).

        Each one starts at a random time in the window and walks its process until a
        final state, the end of the window, or (with ``stop_share`` odds per step)
        an early stop that leaves it open. All transitions are applied in
        chronological order, so sequence ids follow time; a ``tie_share`` of them
        share a millisecond with another. Returns the new transaction ids in
        creation order.
        """
        self.setup()
        self._heal_pool()
        end = truncate_ms(end) if end is not None else self.store.now()
        start = truncate_ms(start)
        if end < start:
            raise ValueError("history must end after it starts")
        span_ms = int((end - start).total_seconds() * 1000)
        plan: list[_Planned] = []
        starts: list[tuple[Listing, User]] = []
        previous_start: datetime | None = None
        for index in range(transactions):
            listing = self._rng.choice(self.listings)
            starts.append((listing, self._customer_for(listing)))
            if previous_start is not None and self._rng.random() < self.tie_share:
                at = previous_start
            else:
                at = start + timedelta(milliseconds=self._rng.randrange(span_ms + 1))
            previous_start = at
            plan.extend(self._walk(PROCESSES[listing.process_name], index, at, end, stop_share, mean_gap))
        plan.sort(key=lambda p: (p.at, p.tx_index, p.step))
        ids: list[uuid.UUID | None] = [None] * transactions
        for item in plan:
            tx_id = ids[item.tx_index]
            if tx_id is None:
                listing, customer = starts[item.tx_index]
                tx = self.store.initiate_transaction(listing.id, customer.id, item.transition, at=item.at)
                ids[item.tx_index] = tx.id
                if not tx.process.is_final(tx.state):
                    self._add_open(tx.id)
                else:
                    self._finished.append(tx.id)
            else:
                tx = self.store.transaction(tx_id)
                self.store.apply_transition(tx_id, item.transition, at=item.at)
                if tx.process.is_final(tx.state):
                    self._finish(tx_id)
        self._last_at = max(self._last_at or end, end)
        return [i for i in ids if i is not None]

    def _walk(
        self,
        process: Process,
        index: int,
        at: datetime,
        end: datetime,
        stop_share: float,
        mean_gap: timedelta,
    ) -> list[_Planned]:
        out: list[_Planned] = []
        state = INITIAL_STATE
        while True:
            tr = self._pick(process.next_transitions(state))
            out.append(_Planned(at, index, len(out), tr.name))
            state = tr.to_state
            if process.is_final(state) or self._rng.random() < stop_share:
                return out
            if self._rng.random() >= self.tie_share:
                gap_ms = int(self._rng.expovariate(1.0) * mean_gap.total_seconds() * 1000)
                at = at + timedelta(milliseconds=gap_ms)
            if at > end:
                return out
