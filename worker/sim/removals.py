"""Deleting and banning: users, listings and transactions leaving the marketplace.

What stays reachable, and how (the reference documents only the attribute defaults;
the rest is our choice, noted here and kept by the tests):

* A deleted or banned user and a deleted listing stay in the store. ``users/show``,
  ``listings/show`` and every include still answer them, with ``deleted`` (or
  ``banned``) true and every other attribute at its default: false for booleans,
  null for everything else, nested objects such as ``profile`` included. Their
  relationships stay, except a gone user's ``profileImage``, which is null.
* Deleting a user deletes their listings first (``listing/deleted`` each), then
  logs ``user/deleted``: the user deleted their own account through the Marketplace
  API. Its ``previousValues`` keep what the user was, except the e-mail address and
  the profile, which are null ("stricter data deletion requirements").
* Banning is done in Console: ``user/updated`` with the ban in ``previousValues``,
  then the user's published listings close (``listing/updated``).
* Deleting a listing is done in Console: ``listing/deleted``, everything it was in
  ``previousValues``. Its transactions stay and go on.
* A deleted transaction leaves the store: ``transactions/show`` answers 404, it
  leaves ``transactions/query``, its booking and messages go with it (reviews stay:
  they are about users and a listing). ``transaction/deleted`` (source
  ``source/admin``: only Sharetribe's own team deletes transactions) carries
  everything it was in ``previousValues``. The ground-truth transition log keeps its
  transitions; :attr:`Store.deleted_transactions` says which were deleted and when.

Refusals (the store raises them): a gone user cannot start a transaction, write a
listing or a message; a deleted or closed listing takes no new transaction; a
transaction whose customer or provider was deleted cannot transition any more (as
Sharetribe documents for deleted users); deleting or banning twice is refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from worker.sim.changes import previous_values, removed
from worker.sim.errors import InvalidArgumentError
from worker.sim.resources import Event, JsonObject, Listing, Transaction, User

if TYPE_CHECKING:
    from worker.sim.store import Store

__all__ = ["ban_user", "delete_listing", "delete_transaction", "delete_user"]

_SELF_SERVICE = "source/marketplace-api"
_CONSOLE = "source/console"
_SHARETRIBE = "source/admin"


def delete_user(store: Store, user: User, at: datetime) -> Event:
    """Delete ``user`` and their listings; returns the ``user/deleted`` event."""
    if user.deleted:
        raise InvalidArgumentError(f"user {user.id} is already deleted")
    for listing in _listings_of(store, user):
        if not listing.deleted:
            _delete_listing(store, listing, at, source=_SELF_SERVICE, user=user)
    store.removals += 1
    before = removed(user.resource(with_relationships=True))
    attributes: JsonObject = before["attributes"]
    attributes["email"] = None
    attributes["profile"] = None
    user.deleted_at = at
    if user.profile_image_id is not None:
        store.images.pop(user.profile_image_id, None)
    return store.emit(
        "user/deleted",
        user,
        at,
        source=_SELF_SERVICE,
        previous_values=before,
        audit_data=store.audit(user.id, _SELF_SERVICE, None),
        removed=True,
    )


def ban_user(store: Store, user: User, at: datetime) -> Event:
    """Ban ``user`` and close their published listings; returns the ``user/updated`` event."""
    if user.gone:
        raise InvalidArgumentError(f"user {user.id} is already {'deleted' if user.deleted else 'banned'}")
    store.removals += 1
    before = user.resource(with_relationships=True)
    user.banned_at = at
    event = store.emit(
        "user/updated",
        user,
        at,
        source=_CONSOLE,
        previous_values=previous_values(before, user.resource(with_relationships=True)),
        audit_data=store.audit(None, _CONSOLE, None, admin_id=store.admin_id),
    )
    for listing in _listings_of(store, user):
        if not listing.deleted and listing.state == "published":
            listing_before = listing.resource(with_relationships=True)
            listing.state = "closed"
            store.emit(
                "listing/updated",
                listing,
                at,
                source=_CONSOLE,
                previous_values=previous_values(listing_before, listing.resource(with_relationships=True)),
                audit_data=store.audit(None, _CONSOLE, None, admin_id=store.admin_id),
                related_ids=frozenset({user.id}),
            )
    return event


def delete_listing(store: Store, listing: Listing, at: datetime) -> Event:
    """Delete ``listing`` (in Console); returns the ``listing/deleted`` event."""
    if listing.deleted:
        raise InvalidArgumentError(f"listing {listing.id} is already deleted")
    return _delete_listing(store, listing, at, source=_CONSOLE, user=None)


def delete_transaction(store: Store, tx: Transaction, at: datetime) -> Event:
    """Remove ``tx`` with its booking and messages; returns the ``transaction/deleted`` event."""
    store.removals += 1
    before = removed(tx.resource(with_relationships=True))
    del store.transactions[tx.id]
    store.deleted_transactions[tx.id] = at
    store.removed_transactions[tx.id] = tx
    if tx.booking is not None:
        store.bookings.pop(tx.booking.id, None)
    for message in tx.messages:
        store.messages.pop(message.id, None)
    return store.emit(
        "transaction/deleted",
        tx,
        at,
        source=_SHARETRIBE,
        previous_values=before,
        audit_data=store.audit(None, _SHARETRIBE, None),
        related_ids=frozenset({tx.customer_id, tx.provider_id, tx.listing_id}),
        removed=True,
    )


def _delete_listing(store: Store, listing: Listing, at: datetime, *, source: str, user: User | None) -> Event:
    store.removals += 1
    before = removed(listing.resource(with_relationships=True))
    listing.deleted_at = at
    admin_id = store.admin_id if source == _CONSOLE else None
    return store.emit(
        "listing/deleted",
        listing,
        at,
        source=source,
        previous_values=before,
        audit_data=store.audit(None if user is None else user.id, source, None, admin_id=admin_id),
        related_ids=frozenset({listing.author_id}),
        removed=True,
    )


def _listings_of(store: Store, user: User) -> list[Listing]:
    return [listing for listing in store.listings.values() if listing.author_id == user.id]
