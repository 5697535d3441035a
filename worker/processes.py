"""The two default Sharetribe transaction processes, as plain data.

Sharetribe marketplaces start from two processes, ``default-booking`` and
``default-purchase`` (both at version 1, alias ``<name>/release-1``). This module
describes their state graphs: every transition's source state(s), target state and
actor, which transitions start a transaction and which states are final. It knows
nothing about HTTP or the simulator so handlers can use it too::

    from worker.processes import PROCESSES, get_process

    booking = PROCESSES["default-booking"]
    booking.next_transitions("state/preauthorized")   # accept, decline, expire, ...
    booking.target("state/preauthorized", "transition/accept")  # "state/accepted"

The graphs follow the published transition lists; where those lists leave the
wiring open (which state a transition starts from), the choices mirror the process
files that ship with Sharetribe's web template. States keep the API's ``state/``
prefix and transitions their ``transition/`` prefix, exactly as the API returns them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

from worker.errors import FlexworkerError

__all__ = [
    "ACTORS",
    "DEFAULT_BOOKING",
    "DEFAULT_PURCHASE",
    "INITIAL_STATE",
    "PROCESSES",
    "Actor",
    "IllegalTransitionError",
    "Process",
    "Transition",
    "UnknownProcessError",
    "get_process",
]

Actor = Literal["customer", "provider", "operator", "system"]
ACTORS: tuple[Actor, ...] = get_args(Actor)

#: The state a transaction is in before its first transition.
INITIAL_STATE = "state/initial"


class IllegalTransitionError(FlexworkerError, ValueError):
    """A transition is unknown to the process or not allowed from the current state."""


class UnknownProcessError(FlexworkerError, KeyError):
    """No process has that name or alias."""

    def __str__(self) -> str:
        # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else "unknown process"


@dataclass(frozen=True)
class Transition:
    """One edge of a process graph.

    The payment flags say which transitions move money, so the simulator and the
    built-in handlers agree on where a PaymentIntent appears, is confirmed or is
    refunded without matching transition names themselves.
    """

    name: str
    from_states: tuple[str, ...]
    to_state: str
    actor: Actor
    requests_payment: bool = False
    confirms_payment: bool = False
    refunds: bool = False

    @property
    def is_initial(self) -> bool:
        return INITIAL_STATE in self.from_states


@dataclass(frozen=True)
class Process:
    """A transaction process: its transitions indexed by name, and derived facts."""

    name: str
    version: int
    transitions: Mapping[str, Transition]
    cancelled_state: str
    #: Whether transactions of this process carry a booking (start/end).
    has_booking: bool
    _by_state: Mapping[str, tuple[Transition, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_state: dict[str, list[Transition]] = {}
        for tr in self.transitions.values():
            for state in tr.from_states:
                by_state.setdefault(state, []).append(tr)
        object.__setattr__(self, "_by_state", MappingProxyType({s: tuple(ts) for s, ts in by_state.items()}))

    @property
    def alias(self) -> str:
        return f"{self.name}/release-1"

    @property
    def states(self) -> frozenset[str]:
        """Every state a transaction of this process can be in, the initial one included."""
        found = {INITIAL_STATE}
        for tr in self.transitions.values():
            found.update(tr.from_states)
            found.add(tr.to_state)
        return frozenset(found)

    @property
    def final_states(self) -> frozenset[str]:
        """States with no way out."""
        return frozenset(s for s in self.states if s not in self._by_state)

    @property
    def initial_transitions(self) -> tuple[Transition, ...]:
        return self._by_state.get(INITIAL_STATE, ())

    def is_final(self, state: str) -> bool:
        return state not in self._by_state

    def next_transitions(self, state: str) -> tuple[Transition, ...]:
        """Transitions allowed from ``state`` (empty for final or unknown states)."""
        return self._by_state.get(state, ())

    def transition(self, name: str) -> Transition:
        """The named transition; :class:`IllegalTransitionError` if the process has none."""
        try:
            return self.transitions[name]
        except KeyError:
            raise IllegalTransitionError(f"{self.name} has no transition {name!r}") from None

    def target(self, state: str, name: str) -> str:
        """The state ``name`` leads to from ``state``, or :class:`IllegalTransitionError`."""
        tr = self.transition(name)
        if state not in tr.from_states:
            raise IllegalTransitionError(f"{name} is not allowed from {state} in {self.name}")
        return tr.to_state


def _process(name: str, cancelled_state: str, has_booking: bool, transitions: list[Transition]) -> Process:
    return Process(
        name=name,
        version=1,
        transitions=MappingProxyType({t.name: t for t in transitions}),
        cancelled_state=cancelled_state,
        has_booking=has_booking,
    )


def _t(
    name: str,
    from_states: str | tuple[str, ...],
    to_state: str,
    actor: Actor,
    **flags: bool,
) -> Transition:
    states = (from_states,) if isinstance(from_states, str) else from_states
    return Transition(
        f"transition/{name}", tuple(f"state/{s}" for s in states), f"state/{to_state}", actor, **flags
    )


# Review transitions are identical in both processes; only the state they start from differs.
def _reviews(after: str) -> list[Transition]:
    return [
        _t("review-1-by-provider", after, "reviewed-by-provider", "provider"),
        _t("review-1-by-customer", after, "reviewed-by-customer", "customer"),
        _t("review-2-by-provider", "reviewed-by-customer", "reviewed", "provider"),
        _t("review-2-by-customer", "reviewed-by-provider", "reviewed", "customer"),
        _t("expire-review-period", after, "reviewed", "system"),
        _t("expire-provider-review-period", "reviewed-by-customer", "reviewed", "system"),
        _t("expire-customer-review-period", "reviewed-by-provider", "reviewed", "system"),
    ]


# Both processes start the same way: an optional inquiry, then a payment request that
# expires after 15 minutes unless the customer confirms it.
def _payment_start(confirmed_state: str) -> list[Transition]:
    return [
        _t("inquire", "initial", "inquiry", "customer"),
        _t("request-payment", "initial", "pending-payment", "customer", requests_payment=True),
        _t("request-payment-after-inquiry", "inquiry", "pending-payment", "customer", requests_payment=True),
        _t("expire-payment", "pending-payment", "payment-expired", "system"),
        _t("confirm-payment", "pending-payment", confirmed_state, "customer", confirms_payment=True),
    ]


DEFAULT_BOOKING = _process(
    "default-booking",
    cancelled_state="state/cancelled",
    has_booking=True,
    transitions=[
        *_payment_start("preauthorized"),
        _t("accept", "preauthorized", "accepted", "provider"),
        _t("operator-accept", "preauthorized", "accepted", "operator"),
        _t("decline", "preauthorized", "declined", "provider"),
        _t("operator-decline", "preauthorized", "declined", "operator"),
        _t("expire", "preauthorized", "expired", "system"),
        _t("complete", "accepted", "delivered", "system"),
        _t("operator-complete", "accepted", "delivered", "operator"),
        _t("cancel", "accepted", "cancelled", "operator", refunds=True),
        *_reviews("delivered"),
    ],
)

DEFAULT_PURCHASE = _process(
    "default-purchase",
    cancelled_state="state/canceled",
    has_booking=False,
    transitions=[
        *_payment_start("purchased"),
        _t("mark-delivered", "purchased", "delivered", "provider"),
        _t("operator-mark-delivered", "purchased", "delivered", "operator"),
        _t("mark-received-from-purchased", "purchased", "received", "customer"),
        _t("cancel", "purchased", "canceled", "operator", refunds=True),
        _t("auto-cancel", "purchased", "canceled", "system", refunds=True),
        _t("mark-received", "delivered", "received", "customer"),
        _t("auto-mark-received", "delivered", "received", "system"),
        _t("dispute", "delivered", "disputed", "customer"),
        _t("operator-dispute", "delivered", "disputed", "operator"),
        _t("mark-received-from-disputed", "disputed", "received", "operator"),
        _t("cancel-from-disputed", "disputed", "canceled", "operator", refunds=True),
        _t("auto-cancel-from-disputed", "disputed", "canceled", "system", refunds=True),
        _t("auto-complete", "received", "completed", "system"),
        *_reviews("completed"),
    ],
)

#: The default processes by name.
PROCESSES: Mapping[str, Process] = MappingProxyType({p.name: p for p in (DEFAULT_BOOKING, DEFAULT_PURCHASE)})


def get_process(name_or_alias: str) -> Process:
    """Look a process up by name (``default-booking``) or alias (``default-booking/release-1``)."""
    for process in PROCESSES.values():
        if name_or_alias in (process.name, process.alias):
            return process
    raise UnknownProcessError(f"unknown transaction process {name_or_alias!r}")
