"""The simulator's resources and their rendering in the API's JSON:API shape.

Each entity renders itself as a tree (``id``, ``type``, ``attributes``, optionally
``relationships``) whose leaves may be ``UUID``, ``datetime`` and
:class:`worker.api.wire.Money`, ready for :func:`worker.api.wire.encode` in either format.
Attribute containers are always fresh copies, so callers may trim or keep them.
The :class:`~worker.sim.store.Store` owns and mutates these objects.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from worker.api.wire import Money
from worker.processes import INITIAL_STATE, Process

__all__ = [
    "BOOKING_STATE",
    "Booking",
    "Entity",
    "Event",
    "Image",
    "JsonObject",
    "Listing",
    "LoggedTransition",
    "Marketplace",
    "Message",
    "Ref",
    "Review",
    "Transaction",
    "TransitionEntry",
    "User",
    "at_defaults",
    "copy_tree",
    "ref_tree",
]

#: A relationship target: (resource type, id).
Ref = tuple[str, uuid.UUID]
JsonObject = dict[str, Any]


def copy_tree(value: Any) -> Any:
    """Deep copy of a JSON-like tree; leaves are immutable so only containers are copied."""
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_tree(v) for v in value]
    return value


def at_defaults(attributes: JsonObject, **flags: bool) -> JsonObject:
    """Every attribute at its default (false for booleans, null for all else), then ``flags`` set.

    How the API shows a deleted listing and a deleted or banned user: the keys stay,
    the data goes.
    """
    out: JsonObject = {name: False if isinstance(value, bool) else None for name, value in attributes.items()}
    out.update(flags)
    return out


class Entity:
    """Common interface of everything the store renders as a resource."""

    TYPE: ClassVar[str]
    id: uuid.UUID

    def attributes(self) -> JsonObject:
        """The full default attribute set, as fresh containers the caller may keep."""
        raise NotImplementedError

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        """Every relationship this resource has, by name."""
        return {}

    def ref(self) -> Ref:
        return (self.TYPE, self.id)

    def resource(self, *, with_relationships: bool = False) -> JsonObject:
        """This entity as a JSON:API resource (relationships only when asked for)."""
        tree: JsonObject = {"id": self.id, "type": self.TYPE, "attributes": self.attributes()}
        if with_relationships:
            tree["relationships"] = {
                name: {"data": ref_tree(target)}
                for name, target in self.relationships().items()
                if not isinstance(target, list)
            }
        return tree


def ref_tree(target: Ref | list[Ref] | None) -> Any:
    """A relationship's ``data`` member: a reference, a list of them, or null."""
    if target is None:
        return None
    if isinstance(target, list):
        return [{"id": i, "type": t} for t, i in target]
    return {"id": target[1], "type": target[0]}


@dataclass
class Marketplace(Entity):
    TYPE: ClassVar[str] = "marketplace"
    id: uuid.UUID
    name: str
    description: str

    def attributes(self) -> JsonObject:
        return {"name": self.name, "description": self.description}


@dataclass
class Image(Entity):
    """An uploaded image; only its ``default`` variant is rendered, as the API does by default."""

    TYPE: ClassVar[str] = "image"
    id: uuid.UUID
    width_px: int = 720
    height_px: int = 720

    def attributes(self) -> JsonObject:
        # A domain reserved for examples: nothing fetches these, but clients may keep the URL.
        url = f"https://example.com/sim/images/{self.id}/default"
        return {
            "variants": {
                "default": {"name": "default", "width": self.width_px, "height": self.height_px, "url": url}
            }
        }


@dataclass
class User(Entity):
    TYPE: ClassVar[str] = "user"
    id: uuid.UUID
    marketplace_id: uuid.UUID
    created_at: datetime
    email: str
    first_name: str
    last_name: str
    phone_number: str | None = None
    bio: str | None = None
    public_data: JsonObject = field(default_factory=dict)
    protected_data: JsonObject = field(default_factory=dict)
    private_data: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)
    profile_image_id: uuid.UUID | None = None
    deleted_at: datetime | None = None
    banned_at: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def banned(self) -> bool:
        return self.banned_at is not None

    @property
    def gone(self) -> bool:
        """Deleted or banned: shown without data, unable to sign up for anything new."""
        return self.deleted or self.banned

    @property
    def display_name(self) -> str:
        return f"{self.first_name} {self.last_name[:1]}".strip()

    @property
    def abbreviated_name(self) -> str:
        return f"{self.first_name[:1]}{self.last_name[:1]}"

    def attributes(self) -> JsonObject:
        full = self._full_attributes()
        if self.deleted:
            return at_defaults(full, deleted=True)
        if self.banned:
            return at_defaults(full, banned=True)
        return full

    def _full_attributes(self) -> JsonObject:
        protected = copy_tree(self.protected_data)
        if self.phone_number is not None:
            # The web template keeps the phone number in protected data; so do we.
            protected["phoneNumber"] = self.phone_number
        return {
            "banned": False,
            "deleted": False,
            "createdAt": self.created_at,
            "email": self.email,
            "emailVerified": True,
            "profile": {
                "displayName": self.display_name,
                "abbreviatedName": self.abbreviated_name,
                "firstName": self.first_name,
                "lastName": self.last_name,
                "bio": self.bio,
                "publicData": copy_tree(self.public_data),
                "protectedData": protected,
                "privateData": copy_tree(self.private_data),
                "metadata": copy_tree(self.metadata),
            },
        }

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        image = None if self.profile_image_id is None or self.gone else ("image", self.profile_image_id)
        return {"marketplace": ("marketplace", self.marketplace_id), "profileImage": image}


@dataclass
class Listing(Entity):
    TYPE: ClassVar[str] = "listing"
    id: uuid.UUID
    marketplace_id: uuid.UUID
    author_id: uuid.UUID
    created_at: datetime
    title: str
    price: Money
    process_name: str
    description: str | None = None
    state: str = "published"
    public_data: JsonObject = field(default_factory=dict)
    private_data: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)
    deleted_at: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    def attributes(self) -> JsonObject:
        full = self._full_attributes()
        return at_defaults(full, deleted=True) if self.deleted else full

    def _full_attributes(self) -> JsonObject:
        return {
            "title": self.title,
            "description": self.description,
            "createdAt": self.created_at,
            "state": self.state,
            "deleted": False,
            "geolocation": None,
            "price": self.price,
            "publicData": copy_tree(self.public_data),
            "privateData": copy_tree(self.private_data),
            "metadata": copy_tree(self.metadata),
        }

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        return {"marketplace": ("marketplace", self.marketplace_id), "author": ("user", self.author_id)}


@dataclass
class Booking(Entity):
    TYPE: ClassVar[str] = "booking"
    id: uuid.UUID
    transaction_id: uuid.UUID
    start: datetime
    end: datetime
    state: str = "pending"

    def attributes(self) -> JsonObject:
        return {
            "start": self.start,
            "end": self.end,
            "displayStart": self.start,
            "displayEnd": self.end,
            "state": self.state,
        }

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        return {"transaction": ("transaction", self.transaction_id)}


@dataclass
class Message(Entity):
    TYPE: ClassVar[str] = "message"
    id: uuid.UUID
    transaction_id: uuid.UUID
    sender_id: uuid.UUID
    content: str
    created_at: datetime

    def attributes(self) -> JsonObject:
        return {"content": self.content, "createdAt": self.created_at}

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        return {"sender": ("user", self.sender_id), "transaction": ("transaction", self.transaction_id)}


@dataclass
class Review(Entity):
    """A review one party wrote about the other during a transaction.

    ``ofProvider`` reviews are written by the customer and are about the provider and
    the listing; ``ofCustomer`` ones by the provider about the customer. A pending
    review hides its rating and content (null) until the process publishes it.
    """

    TYPE: ClassVar[str] = "review"
    id: uuid.UUID
    transaction_id: uuid.UUID
    listing_id: uuid.UUID
    author_id: uuid.UUID
    subject_id: uuid.UUID
    review_type: str
    rating: int
    content: str
    created_at: datetime
    state: str = "pending"

    def attributes(self) -> JsonObject:
        public = self.state == "public"
        return {
            "type": self.review_type,
            "state": self.state,
            "rating": self.rating if public else None,
            "content": self.content if public else None,
            "createdAt": self.created_at,
        }

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        return {
            "author": ("user", self.author_id),
            "subject": ("user", self.subject_id),
            # Only reviews of the provider are about the listing too.
            "listing": ("listing", self.listing_id) if self.review_type == "ofProvider" else None,
        }


@dataclass(frozen=True)
class TransitionEntry:
    """One entry of a transaction's own history."""

    transition: str
    created_at: datetime
    by: str


@dataclass(frozen=True)
class LoggedTransition:
    """One line of the ground-truth log: a transition the store applied."""

    transaction_id: uuid.UUID
    transition: str
    created_at: datetime
    by: str

    def to_json(self) -> JsonObject:
        return {
            "transactionId": self.transaction_id,
            "transition": self.transition,
            "createdAt": self.created_at,
            "by": self.by,
        }


# Where a booking stands for each transaction state of a booking process.
BOOKING_STATE = {
    "state/pending-payment": "pending",
    "state/preauthorized": "pending",
    "state/payment-expired": "declined",
    "state/declined": "declined",
    "state/expired": "declined",
    "state/cancelled": "cancelled",
}


@dataclass
class Transaction(Entity):
    TYPE: ClassVar[str] = "transaction"
    id: uuid.UUID
    marketplace_id: uuid.UUID
    process: Process
    created_at: datetime
    customer_id: uuid.UUID
    provider_id: uuid.UUID
    listing_id: uuid.UUID
    unit_price: Money
    quantity: int = 1
    booking_start: datetime | None = None
    booking_end: datetime | None = None
    state: str = INITIAL_STATE
    transitions: list[TransitionEntry] = field(default_factory=list)
    line_items: list[JsonObject] = field(default_factory=list)
    payin_total: Money | None = None
    payout_total: Money | None = None
    protected_data: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)
    booking: Booking | None = None
    messages: list[Message] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    #: The PaymentIntent id ever requested, kept even after the API stops showing it.
    payment_intent_id: str | None = None

    @property
    def last_transition(self) -> str:
        return self.transitions[-1].transition

    @property
    def last_transitioned_at(self) -> datetime:
        return self.transitions[-1].created_at

    @property
    def last_message_at(self) -> datetime | None:
        return self.messages[-1].created_at if self.messages else None

    def attributes(self) -> JsonObject:
        return {
            "createdAt": self.created_at,
            "processName": self.process.name,
            "processVersion": self.process.version,
            "state": self.state,
            "lastTransition": self.last_transition,
            "lastTransitionedAt": self.last_transitioned_at,
            "transitions": [
                {"transition": t.transition, "createdAt": t.created_at, "by": t.by} for t in self.transitions
            ],
            "lineItems": copy_tree(self.line_items),
            "payinTotal": self.payin_total,
            "payoutTotal": self.payout_total,
            "protectedData": copy_tree(self.protected_data),
            "metadata": copy_tree(self.metadata),
        }

    def relationships(self) -> dict[str, Ref | list[Ref] | None]:
        return {
            "marketplace": ("marketplace", self.marketplace_id),
            "listing": ("listing", self.listing_id),
            "provider": ("user", self.provider_id),
            "customer": ("user", self.customer_id),
            "booking": self.booking.ref() if self.booking else None,
            "reviews": [r.ref() for r in self.reviews],
            "messages": [m.ref() for m in self.messages],
        }


@dataclass(frozen=True)
class Event(Entity):
    TYPE: ClassVar[str] = "event"
    id: uuid.UUID
    sequence_id: int
    marketplace_id: uuid.UUID
    created_at: datetime
    event_type: str
    source: str
    resource_id: uuid.UUID
    resource_type: str
    resource_tree: JsonObject | None
    previous_values: JsonObject | None
    audit_data: JsonObject
    #: Ids ``relatedResourceId`` matches: the parties and listing of a transaction, etc.
    related_ids: frozenset[uuid.UUID] = frozenset()

    def attributes(self) -> JsonObject:
        # Copies: the caller may trim the tree for sparse fields.
        return {
            "sequenceId": self.sequence_id,
            "marketplaceId": self.marketplace_id,
            "createdAt": self.created_at,
            "eventType": self.event_type,
            "source": self.source,
            "resourceId": self.resource_id,
            "resourceType": self.resource_type,
            "resource": copy_tree(self.resource_tree),
            "previousValues": copy_tree(self.previous_values),
            "auditData": dict(self.audit_data),
        }
