"""In-memory marketplace state for the Integration API simulator.

The :class:`Store` holds one marketplace with its users, listings, transactions,
bookings, messages, reviews and profile images, the event log the API's
``events/query`` serves, and the ground-truth log of every transition ever applied
(in apply order, kept when a transaction is deleted). Deleting and banning live in
:mod:`worker.sim.removals`, reviews in :mod:`worker.sim.reviews`, ``previousValues``
in :mod:`worker.sim.changes`. Nothing here
speaks HTTP: the aiohttp layer and the traffic generator both drive the store
through its methods, and tests may do the same directly.

Everything the store creates is reproducible: ids, names and PaymentIntent ids come
from a ``random.Random`` seeded by the caller, and times come from an injected clock
(an aware UTC ``datetime`` source), truncated to milliseconds as the API truncates
them. The resources themselves (and their JSON:API rendering) live in
:mod:`worker.sim.resources`; they are re-exported here.
"""

from __future__ import annotations

import hashlib
import random
import string
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.api.wire import Money
from worker.processes import IllegalTransitionError, Transition, get_process
from worker.sim import removals
from worker.sim.changes import extended_data_changes, previous_values
from worker.sim.clock import Clock, utc_now
from worker.sim.errors import InvalidArgumentError, MissingResourceError, SimStoreError
from worker.sim.resources import (
    BOOKING_STATE,
    Booking,
    Entity,
    Event,
    Image,
    JsonObject,
    Listing,
    LoggedTransition,
    Marketplace,
    Message,
    Ref,
    Review,
    Transaction,
    TransitionEntry,
    User,
    copy_tree,
    ref_tree,
)
from worker.sim.reviews import review_on_transition

__all__ = [
    "COMMISSION_PERCENT",
    "Booking",
    "Clock",
    "Entity",
    "Event",
    "Image",
    "InvalidArgumentError",
    "Listing",
    "LoggedTransition",
    "Marketplace",
    "Message",
    "MissingResourceError",
    "Ref",
    "Review",
    "SimStoreError",
    "Store",
    "Transaction",
    "TransitionEntry",
    "User",
    "ref_tree",
    "truncate_ms",
    "utc_now",
]

#: The provider's commission on every priced transaction.
COMMISSION_PERCENT = 10

_FIRST_NAMES = ("Aino", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas")
_LAST_NAMES = ("Virtanen", "Moreau", "Rossi", "Novak", "Yilmaz", "Haddad", "Berg", "Silva", "Okafor", "Lund")
_BOOKING_TITLES = ("Sauna by the lake", "City bike", "Kayak for two", "Studio loft", "Camping van")
_PURCHASE_TITLES = ("Vintage lamp", "Road bike frame", "Wool blanket", "Record player", "Oak stool")


def truncate_ms(at: datetime) -> datetime:
    """``at`` in UTC, cut to whole milliseconds (the API's precision)."""
    if at.tzinfo is None:
        raise InvalidArgumentError("naive datetime: the simulator only deals in aware UTC instants")
    at = at.astimezone(UTC)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


_DEFAULT_SOURCE = {
    "customer": "source/marketplace-api",
    "provider": "source/marketplace-api",
    "operator": "source/integration-api",
    "system": "source/transaction",
}


class Store:
    """The simulated marketplace. Single-threaded: call it from one event loop."""

    def __init__(
        self,
        *,
        seed: int | str = 0,
        clock: Clock = utc_now,
        marketplace_name: str = "Sim Market",
        reviews: bool = False,
    ):
        self._rng = random.Random(f"store:{seed}")
        #: Whether review transitions write review resources (see :mod:`worker.sim.reviews`).
        self.writes_reviews = reviews
        self._clock = clock
        self.marketplace = Marketplace(self.new_id(), marketplace_name, "A simulated Sharetribe marketplace")
        self.users: dict[uuid.UUID, User] = {}
        self.listings: dict[uuid.UUID, Listing] = {}
        self.transactions: dict[uuid.UUID, Transaction] = {}
        self.bookings: dict[uuid.UUID, Booking] = {}
        self.messages: dict[uuid.UUID, Message] = {}
        self.images: dict[uuid.UUID, Image] = {}
        self.reviews: dict[uuid.UUID, Review] = {}
        #: Event ``k`` (0-based) has sequence id ``k + 1``.
        self.events: list[Event] = []
        #: Every transition ever applied, in apply order; deleting a transaction keeps its lines.
        self.transition_log: list[LoggedTransition] = []
        #: When each deleted transaction was deleted (ground truth: the API has forgotten them).
        self.deleted_transactions: dict[uuid.UUID, datetime] = {}
        #: The deleted transactions themselves, as they were when deleted.
        self.removed_transactions: dict[uuid.UUID, Transaction] = {}
        #: How many deletions and bans happened: a cheap "did anything go?" for the traffic.
        self.removals = 0

    # -- basics ---------------------------------------------------------------------

    @property
    def admin_id(self) -> uuid.UUID:
        """The Console admin the simulator's operator actions are audited as."""
        return _derived_id(b"console-admin", self.marketplace.id)

    @property
    def rng(self) -> random.Random:
        """The store's seeded RNG, for the modules that make content on its behalf."""
        return self._rng

    def new_id(self) -> uuid.UUID:
        """The next id from the store's seeded RNG."""
        return uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def now(self) -> datetime:
        """The clock's time, cut to milliseconds."""
        return truncate_ms(self._clock())

    def at_or_now(self, at: datetime | None) -> datetime:
        """``at`` cut to milliseconds, or now when it is ``None``."""
        return self.now() if at is None else truncate_ms(at)

    def get(self, type_: str, id_: uuid.UUID) -> Entity | None:
        """Any resource by type and id (``None`` when unknown)."""
        if type_ == "marketplace":
            return self.marketplace if id_ == self.marketplace.id else None
        tables: dict[str, Mapping[uuid.UUID, Entity]] = {
            "user": self.users,
            "listing": self.listings,
            "transaction": self.transactions,
            "booking": self.bookings,
            "message": self.messages,
            "image": self.images,
            "review": self.reviews,
        }
        table = tables.get(type_)
        return None if table is None else table.get(id_)

    def _lookup(self, table: Mapping[uuid.UUID, Any], kind: str, id_: uuid.UUID) -> Any:
        try:
            return table[id_]
        except KeyError:
            raise MissingResourceError(f"no {kind} {id_}") from None

    def user(self, id_: uuid.UUID) -> User:
        result: User = self._lookup(self.users, "user", id_)
        return result

    def listing(self, id_: uuid.UUID) -> Listing:
        result: Listing = self._lookup(self.listings, "listing", id_)
        return result

    def transaction(self, id_: uuid.UUID) -> Transaction:
        result: Transaction = self._lookup(self.transactions, "transaction", id_)
        return result

    @property
    def last_sequence_id(self) -> int:
        return len(self.events)

    def events_after(self, sequence_id: int) -> Iterator[Event]:
        """Events with a sequence id above ``sequence_id``, ascending."""
        return iter(self.events[max(0, sequence_id) :])

    def emit(
        self,
        event_type: str,
        entity: Entity,
        at: datetime,
        *,
        source: str,
        previous_values: JsonObject | None,
        audit_data: JsonObject,
        related_ids: frozenset[uuid.UUID] = frozenset(),
        tree: JsonObject | None = None,
        removed: bool = False,
    ) -> Event:
        """Log an event about ``entity``; its resource is ``tree`` or the entity as it is now.

        ``removed`` events (``*/deleted``) carry no resource at all.
        """
        if removed:
            tree = None
        elif tree is None:
            tree = entity.resource(with_relationships=True)
        event = Event(
            id=self.new_id(),
            sequence_id=len(self.events) + 1,
            marketplace_id=self.marketplace.id,
            created_at=at,
            event_type=event_type,
            source=source,
            resource_id=entity.id,
            resource_type=entity.TYPE,
            resource_tree=tree,
            previous_values=previous_values,
            audit_data=audit_data,
            related_ids=related_ids,
        )
        self.events.append(event)
        return event

    def audit(
        self,
        user_id: uuid.UUID | None,
        source: str,
        client_id: str | None,
        *,
        admin_id: uuid.UUID | None = None,
    ) -> JsonObject:
        """An event's ``auditData``: API calls get a request id, Console actions an admin."""
        api_call = source in ("source/marketplace-api", "source/integration-api")
        return {
            "userId": user_id,
            "adminId": admin_id,
            "requestId": self.new_id() if api_call else None,
            "clientId": client_id,
        }

    # -- users and listings ---------------------------------------------------------

    def create_user(
        self,
        *,
        email: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        phone_number: str | None = None,
        public_data: Mapping[str, Any] | None = None,
        protected_data: Mapping[str, Any] | None = None,
        private_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        profile_image: bool | None = None,
        at: datetime | None = None,
    ) -> User:
        """Sign a user up; emits ``user/created``.

        Name, e-mail and an E.164 phone number are made up unless given. Three users
        in four have a profile image unless ``profile_image`` says otherwise.
        """
        first = first_name if first_name is not None else self._rng.choice(_FIRST_NAMES)
        last = last_name if last_name is not None else self._rng.choice(_LAST_NAMES)
        if phone_number is None:
            phone_number = "+1555" + "".join(self._rng.choices(string.digits, k=7))
        user = User(
            id=self.new_id(),
            marketplace_id=self.marketplace.id,
            created_at=self.at_or_now(at),
            email=email or f"{first}.{last}.{len(self.users) + 1}@example.com".lower(),
            first_name=first,
            last_name=last,
            phone_number=phone_number,
            public_data=copy_tree(dict(public_data or {})),
            protected_data=copy_tree(dict(protected_data or {})),
            private_data=copy_tree(dict(private_data or {})),
            metadata=copy_tree(dict(metadata or {})),
        )
        if profile_image is None:
            # Decided by the id, not the RNG, so the ids of a seed stay what they were.
            profile_image = user.id.int % 4 != 0
        if profile_image:
            image = Image(_derived_id(b"profile-image", user.id))
            self.images[image.id] = image
            user.profile_image_id = image.id
        self.users[user.id] = user
        self.emit(
            "user/created",
            user,
            user.created_at,
            source="source/marketplace-api",
            previous_values={},
            audit_data=self.audit(user.id, "source/marketplace-api", None),
        )
        return user

    def create_listing(
        self,
        author_id: uuid.UUID,
        *,
        process_name: str | None = None,
        title: str | None = None,
        price: Money | None = None,
        public_data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> Listing:
        """Publish a listing using ``process_name`` (a random default process if not given).

        Emits ``listing/created``.
        """
        author = self.user(author_id)
        if author.gone:
            raise InvalidArgumentError(f"user {author.id} is deleted or banned and cannot list")
        process = get_process(process_name or self._rng.choice(("default-booking", "default-purchase")))
        titles = _BOOKING_TITLES if process.has_booking else _PURCHASE_TITLES
        data: JsonObject = {
            "transactionProcessAlias": process.alias,
            "unitType": "day" if process.has_booking else "item",
        }
        data.update(copy_tree(dict(public_data or {})))
        listing = Listing(
            id=self.new_id(),
            marketplace_id=self.marketplace.id,
            author_id=author.id,
            created_at=self.at_or_now(at),
            title=title or self._rng.choice(titles),
            price=price or Money(self._rng.randrange(10, 500) * 100, "USD"),
            process_name=process.name,
            public_data=data,
        )
        self.listings[listing.id] = listing
        self.emit(
            "listing/created",
            listing,
            listing.created_at,
            source="source/marketplace-api",
            previous_values={},
            audit_data=self.audit(author.id, "source/marketplace-api", None),
            related_ids=frozenset({author.id}),
        )
        return listing

    # -- transactions ---------------------------------------------------------------

    def initiate_transaction(
        self,
        listing_id: uuid.UUID,
        customer_id: uuid.UUID,
        transition: str,
        *,
        at: datetime | None = None,
        booking_start: datetime | None = None,
        booking_end: datetime | None = None,
        quantity: int | None = None,
        protected_data: Mapping[str, Any] | None = None,
        source: str | None = None,
        client_id: str | None = None,
    ) -> Transaction:
        """Start a transaction on a listing with one of its process's initial transitions.

        Booking transactions get a booking range (whole UTC days; a random one unless
        given); the booking resource itself appears when payment is requested.
        Emits ``transaction/initiated``.
        """
        listing = self.listing(listing_id)
        customer = self.user(customer_id)
        process = get_process(listing.process_name)
        first = process.transition(transition)
        if not first.is_initial:
            raise IllegalTransitionError(f"{transition} cannot start a {process.name} transaction")
        if customer.id == listing.author_id:
            raise InvalidArgumentError("a provider cannot buy from their own listing")
        if listing.deleted or listing.state != "published":
            raise InvalidArgumentError(
                f"listing {listing.id} is {'deleted' if listing.deleted else listing.state}"
            )
        for party in (customer, self.user(listing.author_id)):
            if party.gone:
                raise InvalidArgumentError(f"user {party.id} is deleted or banned")
        created_at = self.at_or_now(at)
        if process.has_booking:
            if booking_start is None:
                day = created_at.replace(hour=0, minute=0, second=0, microsecond=0)
                booking_start = day + timedelta(days=self._rng.randrange(1, 60))
            if booking_end is None:
                booking_end = booking_start + timedelta(days=self._rng.randrange(1, 6))
            booking_start, booking_end = truncate_ms(booking_start), truncate_ms(booking_end)
            if booking_end <= booking_start:
                raise InvalidArgumentError("a booking must end after it starts")
        elif booking_start is not None or booking_end is not None:
            raise InvalidArgumentError(f"{process.name} transactions have no booking")
        if quantity is not None and quantity < 1:
            raise InvalidArgumentError("quantity must be at least 1")
        tx = Transaction(
            id=self.new_id(),
            marketplace_id=self.marketplace.id,
            process=process,
            created_at=created_at,
            customer_id=customer.id,
            provider_id=listing.author_id,
            listing_id=listing.id,
            unit_price=listing.price,
            quantity=quantity or (1 if process.has_booking else self._rng.randrange(1, 4)),
            booking_start=booking_start,
            booking_end=booking_end,
            protected_data=copy_tree(dict(protected_data or {})),
        )
        self.transactions[tx.id] = tx
        self._apply(tx, first, created_at, source=source, client_id=client_id)
        return tx

    def apply_transition(
        self,
        transaction_id: uuid.UUID,
        transition: str,
        *,
        by: str | None = None,
        at: datetime | None = None,
        source: str | None = None,
        client_id: str | None = None,
    ) -> Event:
        """Move a transaction along ``transition`` and return the event that records it.

        ``by`` defaults to the transition's actor and, when given, must match it.
        ``at`` (default: now) lets tests write history in the past, but never before
        the transaction's last transition. Raises :class:`IllegalTransitionError` when
        the process does not allow the transition from the current state.
        """
        tx = self.transaction(transaction_id)
        tr = tx.process.transition(transition)
        if tr.is_initial:
            raise IllegalTransitionError(f"{transition} only starts transactions")
        tx.process.target(tx.state, transition)
        if by is not None and by != tr.actor:
            raise IllegalTransitionError(f"{transition} is performed by {tr.actor}, not {by}")
        deleted = self.deleted_party(tx)
        if deleted is not None:
            raise IllegalTransitionError(f"transaction {tx.id} cannot move on: its {deleted} was deleted")
        when = self.at_or_now(at)
        if when < tx.last_transitioned_at:
            raise InvalidArgumentError(
                f"{when.isoformat()} is before the transaction's last transition at "
                f"{tx.last_transitioned_at.isoformat()}"
            )
        return self._apply(tx, tr, when, source=source, client_id=client_id)

    def _apply(
        self, tx: Transaction, tr: Transition, at: datetime, *, source: str | None, client_id: str | None
    ) -> Event:
        first = not tx.transitions
        before = None if first else tx.resource(with_relationships=True)
        tx.state = tr.to_state
        tx.transitions.append(TransitionEntry(tr.name, at, tr.actor))
        if tr.requests_payment:
            self._request_payment(tx, at)
        if tr.confirms_payment:
            _drop_payment_intent_id(tx.protected_data)
        if tr.refunds:
            _refund(tx)
        if tx.booking is not None:
            tx.booking.state = BOOKING_STATE.get(tx.state, "accepted")
        if self.writes_reviews:
            review_on_transition(self, tx, tr, at)
        source = source or _DEFAULT_SOURCE[tr.actor]
        user_id = {"customer": tx.customer_id, "provider": tx.provider_id}.get(tr.actor)
        after = tx.resource(with_relationships=True)
        event = self.emit(
            "transaction/initiated" if first else "transaction/transitioned",
            tx,
            at,
            source=source,
            previous_values={} if before is None else previous_values(before, after),
            audit_data=self.audit(user_id, source, client_id),
            related_ids=frozenset({tx.customer_id, tx.provider_id, tx.listing_id}),
            tree=after,
        )
        self.transition_log.append(LoggedTransition(tx.id, tr.name, at, tr.actor))
        return event

    def _request_payment(self, tx: Transaction, at: datetime) -> None:
        if tx.process.has_booking and tx.booking is None:
            assert tx.booking_start is not None and tx.booking_end is not None
            tx.booking = Booking(self.new_id(), tx.id, tx.booking_start, tx.booking_end)
            self.bookings[tx.booking.id] = tx.booking
            tx.quantity = max(1, (tx.booking_end - tx.booking_start).days)
        price = tx.unit_price
        base = price.amount * tx.quantity
        commission = (base * COMMISSION_PERCENT + 50) // 100
        tx.line_items = [
            {
                "code": "line-item/day" if tx.process.has_booking else "line-item/item",
                "unitPrice": price,
                "quantity": tx.quantity,
                "lineTotal": Money(base, price.currency),
                "reversal": False,
                "includeFor": ["customer", "provider"],
            },
            {
                "code": "line-item/provider-commission",
                "unitPrice": Money(base, price.currency),
                "percentage": -float(COMMISSION_PERCENT),
                "lineTotal": Money(-commission, price.currency),
                "reversal": False,
                "includeFor": ["provider"],
            },
        ]
        _set_totals(tx)
        tx.payment_intent_id = "pi_" + "".join(self._rng.choices(string.ascii_letters + string.digits, k=24))
        intents = tx.protected_data.setdefault("stripePaymentIntents", {})
        intents["default"] = {"stripePaymentIntentId": tx.payment_intent_id}

    def update_metadata(
        self,
        transaction_id: uuid.UUID,
        metadata: Mapping[str, Any],
        *,
        at: datetime | None = None,
        source: str = "source/integration-api",
        client_id: str | None = None,
    ) -> Event | None:
        """Merge top-level metadata keys (``None`` deletes one); emits ``transaction/updated``.

        A merge that changes nothing emits no event, so an integration writing the
        same metadata again does not wake up every poller once more.
        """
        tx = self.transaction(transaction_id)
        old = copy_tree(tx.metadata)
        for key, value in metadata.items():
            if value is None:
                tx.metadata.pop(key, None)
            else:
                tx.metadata[key] = copy_tree(value)
        if tx.metadata == old:
            return None
        return self.emit(
            "transaction/updated",
            tx,
            self.at_or_now(at),
            source=source,
            previous_values={"attributes": {"metadata": extended_data_changes(old, tx.metadata)}},
            audit_data=self.audit(None, source, client_id),
            related_ids=frozenset({tx.customer_id, tx.provider_id, tx.listing_id}),
        )

    def add_message(
        self,
        transaction_id: uuid.UUID,
        content: str,
        *,
        sender_id: uuid.UUID | None = None,
        at: datetime | None = None,
    ) -> Message:
        """Post a message from the customer (default) or the provider; emits ``message/created``."""
        tx = self.transaction(transaction_id)
        sender = sender_id or tx.customer_id
        if sender not in (tx.customer_id, tx.provider_id):
            raise InvalidArgumentError("only the customer or the provider can message in a transaction")
        if self.user(sender).gone:
            raise InvalidArgumentError(f"user {sender} is deleted or banned and cannot message")
        when = self.at_or_now(at)
        if tx.messages and when < tx.messages[-1].created_at:
            raise InvalidArgumentError("messages must be added in chronological order")
        message = Message(self.new_id(), tx.id, sender, content, when)
        tx.messages.append(message)
        self.messages[message.id] = message
        self.emit(
            "message/created",
            message,
            when,
            source="source/marketplace-api",
            previous_values={},
            audit_data=self.audit(sender, "source/marketplace-api", None),
            related_ids=frozenset({tx.id, sender}),
        )
        return message

    # -- deleting and banning (see worker.sim.removals) -------------------------------

    def deleted_party(self, tx: Transaction) -> str | None:
        """``"customer"`` or ``"provider"`` when that party of ``tx`` was deleted, else ``None``."""
        for role, user_id in (("customer", tx.customer_id), ("provider", tx.provider_id)):
            if self.user(user_id).deleted:
                return role
        return None

    def delete_user(self, user_id: uuid.UUID, *, at: datetime | None = None) -> Event:
        """Delete a user and their listings; emits ``listing/deleted`` for each, then ``user/deleted``."""
        return removals.delete_user(self, self.user(user_id), self.at_or_now(at))

    def ban_user(self, user_id: uuid.UUID, *, at: datetime | None = None) -> Event:
        """Ban a user and close their listings; emits ``user/updated``, then ``listing/updated`` for each."""
        return removals.ban_user(self, self.user(user_id), self.at_or_now(at))

    def delete_listing(self, listing_id: uuid.UUID, *, at: datetime | None = None) -> Event:
        """Delete a listing; emits ``listing/deleted``."""
        return removals.delete_listing(self, self.listing(listing_id), self.at_or_now(at))

    def delete_transaction(self, transaction_id: uuid.UUID, *, at: datetime | None = None) -> Event:
        """Delete a transaction (its transitions stay in the ground truth); emits ``transaction/deleted``."""
        return removals.delete_transaction(self, self.transaction(transaction_id), self.at_or_now(at))


def _derived_id(kind: bytes, of: uuid.UUID) -> uuid.UUID:
    """A stable id for something that belongs to ``of`` (drawn from no RNG)."""
    return uuid.UUID(bytes=hashlib.sha256(kind + of.bytes).digest()[:16], version=4)


def _drop_payment_intent_id(protected: JsonObject) -> None:
    # Remove the id and prune the containers it leaves empty, as confirm-payment does.
    intents = protected.get("stripePaymentIntents")
    if not isinstance(intents, dict):
        return
    default = intents.get("default")
    if isinstance(default, dict):
        default.pop("stripePaymentIntentId", None)
        if not default:
            intents.pop("default")
    if not intents:
        protected.pop("stripePaymentIntents")


def _set_totals(tx: Transaction) -> None:
    currency = tx.unit_price.currency
    tx.payin_total = Money(
        sum(li["lineTotal"].amount for li in tx.line_items if "customer" in li["includeFor"]), currency
    )
    tx.payout_total = Money(
        sum(li["lineTotal"].amount for li in tx.line_items if "provider" in li["includeFor"]), currency
    )


def _refund(tx: Transaction) -> None:
    # A refund reverses every line item so both totals drop to zero.
    reversals = []
    for item in tx.line_items:
        if item["reversal"]:
            continue
        rev = dict(
            item, reversal=True, lineTotal=Money(-item["lineTotal"].amount, item["lineTotal"].currency)
        )
        if "quantity" in item:
            rev["quantity"] = -item["quantity"]
        if "percentage" in item:
            rev["percentage"] = -item["percentage"]
        rev["includeFor"] = list(item["includeFor"])
        reversals.append(rev)
    tx.line_items.extend(reversals)
    if tx.line_items:
        _set_totals(tx)
