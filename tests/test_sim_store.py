"""The simulator's store: transitions, events, payment data, metadata, reproducibility."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from worker.api import models, wire
from worker.api.wire import Money
from worker.processes import IllegalTransitionError
from worker.sim.store import InvalidArgumentError, MissingResourceError, Store

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def tick(self, **delta: float) -> None:
        self.at += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Store:
    return Store(seed=5, clock=clock)


def _json(tree: object) -> object:
    """A tree as a client would receive it over the wire."""
    return wire.decode(wire.encode(tree))


def _parties(store: Store, process: str = "default-booking") -> tuple[uuid.UUID, uuid.UUID]:
    provider = store.create_user(first_name="Pia", last_name="Provider")
    customer = store.create_user(first_name="Cai", last_name="Customer")
    listing = store.create_listing(provider.id, process_name=process, price=Money(5000, "EUR"))
    return listing.id, customer.id


def test_times_are_truncated_to_milliseconds(store: Store) -> None:
    listing_id, customer_id = _parties(store)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/inquire")
    assert tx.created_at == T0.replace(microsecond=123000)
    assert tx.last_transitioned_at == tx.created_at


def test_walk_emits_initiated_then_transitioned_with_previous_values(store: Store, clock: Clock) -> None:
    listing_id, customer_id = _parties(store)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/inquire")
    clock.tick(seconds=5)
    store.apply_transition(tx.id, "transition/request-payment-after-inquiry")
    clock.tick(seconds=1)
    store.apply_transition(tx.id, "transition/confirm-payment")
    clock.tick(hours=1)
    event = store.apply_transition(tx.id, "transition/accept")

    tx_events = [e for e in store.events if e.resource_type == "transaction"]
    assert [e.event_type for e in tx_events] == ["transaction/initiated"] + ["transaction/transitioned"] * 3
    seqs = [e.sequence_id for e in store.events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    assert tx_events[0].previous_values == {}
    prev = event.previous_values
    assert prev is not None
    assert prev["attributes"]["state"] == "state/preauthorized"
    assert prev["attributes"]["lastTransition"] == "transition/confirm-payment"
    assert len(prev["attributes"]["transitions"]) == 3
    assert "createdAt" not in prev["attributes"]  # unchanged attributes are left out
    assert event.resource_tree is not None
    assert event.resource_tree["attributes"]["state"] == "state/accepted"
    assert tx.booking is not None and tx.booking.state == "accepted"
    # The event's resource parses with our client models.
    parsed = models.parse_one(models.Transaction, _json(event.resource_tree), models.Included(()))
    assert parsed.attributes.last_transition == "transition/accept"
    assert [t.by for t in parsed.attributes.transitions] == ["customer", "customer", "customer", "provider"]
    assert parsed.related_id("customer") == customer_id
    assert [(e.transaction_id, e.transition) for e in store.transition_log] == [
        (tx.id, "transition/inquire"),
        (tx.id, "transition/request-payment-after-inquiry"),
        (tx.id, "transition/confirm-payment"),
        (tx.id, "transition/accept"),
    ]


def test_payment_intent_appears_then_survives_only_in_previous_values(store: Store) -> None:
    listing_id, customer_id = _parties(store, "default-purchase")
    tx = store.initiate_transaction(listing_id, customer_id, "transition/request-payment", quantity=2)
    pi = tx.protected_data["stripePaymentIntents"]["default"]["stripePaymentIntentId"]
    assert pi.startswith("pi_") and pi == tx.payment_intent_id
    assert tx.payin_total == Money(10000, "EUR")
    assert tx.payout_total == Money(9000, "EUR")
    codes = [li["code"] for li in tx.line_items]
    assert codes == ["line-item/item", "line-item/provider-commission"]

    event = store.apply_transition(tx.id, "transition/confirm-payment")
    assert tx.state == "state/purchased"
    assert "stripePaymentIntents" not in tx.protected_data
    assert event.resource_tree is not None
    assert event.resource_tree["attributes"]["protectedData"] == {}
    assert event.previous_values is not None
    old = event.previous_values["attributes"]["protectedData"]
    assert old["stripePaymentIntents"]["default"]["stripePaymentIntentId"] == pi
    # Later events no longer carry it anywhere.
    later = store.apply_transition(tx.id, "transition/mark-delivered")
    assert pi not in repr(later.resource_tree) and pi not in repr(later.previous_values)


def test_booking_created_with_payment_request_and_refund_reverses_totals(store: Store) -> None:
    listing_id, customer_id = _parties(store)
    start = datetime(2024, 6, 1, tzinfo=UTC)
    tx = store.initiate_transaction(
        listing_id,
        customer_id,
        "transition/request-payment",
        booking_start=start,
        booking_end=start + timedelta(days=3),
    )
    assert tx.booking is not None and (tx.booking.start, tx.booking.state) == (start, "pending")
    assert tx.line_items[0]["quantity"] == 3 and tx.payin_total == Money(15000, "EUR")
    for name in ("transition/confirm-payment", "transition/accept", "transition/cancel"):
        store.apply_transition(tx.id, name)
    assert tx.state == "state/cancelled" and tx.booking.state == "cancelled"
    assert tx.payin_total == Money(0, "EUR") and tx.payout_total == Money(0, "EUR")
    assert [li["reversal"] for li in tx.line_items] == [False, False, True, True]


def test_illegal_transitions_are_refused_and_change_nothing(store: Store, clock: Clock) -> None:
    listing_id, customer_id = _parties(store)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/request-payment")
    events = len(store.events)
    with pytest.raises(IllegalTransitionError):
        store.apply_transition(tx.id, "transition/accept")  # needs preauthorized
    with pytest.raises(IllegalTransitionError):
        store.apply_transition(tx.id, "transition/mark-delivered")  # other process
    with pytest.raises(IllegalTransitionError):
        store.apply_transition(tx.id, "transition/confirm-payment", by="operator")
    with pytest.raises(IllegalTransitionError):
        store.initiate_transaction(listing_id, customer_id, "transition/accept")
    with pytest.raises(MissingResourceError):
        store.apply_transition(store.new_id(), "transition/confirm-payment")
    with pytest.raises(InvalidArgumentError):
        store.apply_transition(tx.id, "transition/confirm-payment", at=T0 - timedelta(seconds=1))
    assert len(store.events) == events and tx.state == "state/pending-payment"


def test_explicit_past_times_build_history(store: Store) -> None:
    listing_id, customer_id = _parties(store)
    past = (T0 - timedelta(days=10)).replace(microsecond=0)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/request-payment", at=past)
    event = store.apply_transition(tx.id, "transition/expire-payment", at=past + timedelta(minutes=15))
    assert tx.created_at == past and tx.last_transitioned_at == past + timedelta(minutes=15)
    assert event.created_at == past + timedelta(minutes=15)
    assert event.source == "source/transaction" and event.audit_data["userId"] is None
    # The same millisecond as the previous transition is allowed.
    other = store.initiate_transaction(listing_id, customer_id, "transition/request-payment", at=past)
    store.apply_transition(other.id, "transition/confirm-payment", at=past)
    assert [t.created_at for t in other.transitions] == [past, past]


def test_update_metadata_merges_deletes_and_skips_no_ops(store: Store) -> None:
    listing_id, customer_id = _parties(store)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/inquire")
    first = store.update_metadata(tx.id, {"a": 1, "b": {"c": 2}})
    assert first is not None and first.event_type == "transaction/updated"
    assert first.previous_values == {"attributes": {"metadata": {"a": None, "b": None}}}
    second = store.update_metadata(tx.id, {"a": None, "d": "x"})
    assert tx.metadata == {"b": {"c": 2}, "d": "x"}
    # "b" did not change, so it is left out.
    assert second is not None and second.previous_values == {"attributes": {"metadata": {"a": 1, "d": None}}}
    assert store.update_metadata(tx.id, {"d": "x"}) is None
    assert store.update_metadata(tx.id, {"missing": None}) is None


def test_users_and_listings_emit_created_events_and_parse(store: Store) -> None:
    user = store.create_user(email="a@example.com", first_name="Ada", last_name="Lovelace")
    listing = store.create_listing(user.id, process_name="default-booking")
    assert [e.event_type for e in store.events] == ["user/created", "listing/created"]
    parsed = models.parse_one(models.User, _json(user.resource()), models.Included(()))
    assert parsed.attributes.email == "a@example.com"
    assert parsed.attributes.profile.display_name == "Ada L"
    assert parsed.attributes.profile.abbreviated_name == "AL"
    phone = parsed.attributes.profile.protected_data["phoneNumber"]
    assert phone.startswith("+") and phone[1:].isdigit() and 8 <= len(phone) <= 16
    lparsed = models.parse_one(
        models.Listing, _json(listing.resource(with_relationships=True)), models.Included(())
    )
    assert lparsed.related_id("author") == user.id
    assert lparsed.attributes.public_data["transactionProcessAlias"] == "default-booking/release-1"


def test_messages_only_from_parties(store: Store) -> None:
    listing_id, customer_id = _parties(store)
    tx = store.initiate_transaction(listing_id, customer_id, "transition/inquire")
    store.add_message(tx.id, "hello")
    assert tx.last_message_at == tx.created_at
    assert store.events[-1].event_type == "message/created"
    stranger = store.create_user()
    with pytest.raises(InvalidArgumentError):
        store.add_message(tx.id, "hi", sender_id=stranger.id)


def test_same_seed_same_ids_other_seed_other_ids(clock: Clock) -> None:
    def run(seed: int) -> list[str]:
        s = Store(seed=seed, clock=clock)
        listing_id, customer_id = _parties(s)
        tx = s.initiate_transaction(listing_id, customer_id, "transition/request-payment")
        return [str(e.id) for e in s.events] + [str(tx.id), str(tx.payment_intent_id), str(s.marketplace.id)]

    assert run(1) == run(1)
    assert set(run(1)).isdisjoint(run(2))
