"""Reviews, written and published by the default processes' review transitions.

``transition/review-1-by-*`` posts a pending review by the transition's actor;
``transition/review-2-by-*`` posts the second one and publishes both; the
``expire-*-review-period`` transitions that end in ``state/reviewed`` publish
whatever is pending. Each action logs its own event (``review/created``,
``review/updated``) before the transaction's own event, as Sharetribe emits action
events ahead of the transition's.

Only a store made with ``reviews=True`` writes reviews: they draw ids from the
store's RNG, so turning them on changes a seed's later ids and sequence ids.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from worker.processes import Transition
from worker.sim.changes import previous_values
from worker.sim.resources import Review, Transaction

if TYPE_CHECKING:
    from worker.sim.store import Store

__all__ = ["REVIEW_TEXTS", "posts_review", "review_on_transition"]

#: What the generated reviews say, by rating.
REVIEW_TEXTS = {
    1: "Did not go as agreed.",
    2: "Some trouble along the way.",
    3: "Fine, nothing special.",
    4: "Smooth and friendly.",
    5: "Excellent, would do it again!",
}

_REVIEWED = "state/reviewed"


def posts_review(tr: Transition) -> bool:
    """Whether ``tr`` is one of the transitions a party reviews with."""
    return tr.name.startswith("transition/review-") and tr.actor in ("customer", "provider")


def review_on_transition(store: Store, tx: Transaction, tr: Transition, at: datetime) -> None:
    """Post and publish ``tx``'s reviews as ``tr`` does; call before the transition's own event."""
    if posts_review(tr):
        _post(store, tx, tr.actor, at)
    if tr.to_state == _REVIEWED:
        for review in tx.reviews:
            if review.state == "pending":
                _publish(store, tx, review, at)


def _post(store: Store, tx: Transaction, author: str, at: datetime) -> None:
    by_customer = author == "customer"
    # Mostly good reviews, as on real marketplaces.
    rating = store.rng.choices((1, 2, 3, 4, 5), weights=(1, 1, 2, 5, 8))[0]
    review = Review(
        id=store.new_id(),
        transaction_id=tx.id,
        listing_id=tx.listing_id,
        author_id=tx.customer_id if by_customer else tx.provider_id,
        subject_id=tx.provider_id if by_customer else tx.customer_id,
        review_type="ofProvider" if by_customer else "ofCustomer",
        rating=rating,
        content=REVIEW_TEXTS[rating],
        created_at=at,
    )
    tx.reviews.append(review)
    store.reviews[review.id] = review
    source = "source/transaction"
    store.emit(
        "review/created",
        review,
        at,
        source=source,
        previous_values={},
        audit_data=store.audit(review.author_id, source, None),
        related_ids=_related(tx, review),
    )


def _publish(store: Store, tx: Transaction, review: Review, at: datetime) -> None:
    before = review.resource(with_relationships=True)
    review.state = "public"
    source = "source/transaction"
    store.emit(
        "review/updated",
        review,
        at,
        source=source,
        previous_values=previous_values(before, review.resource(with_relationships=True)),
        audit_data=store.audit(None, source, None),
        related_ids=_related(tx, review),
    )


def _related(tx: Transaction, review: Review) -> frozenset[uuid.UUID]:
    return frozenset({tx.id, review.author_id, review.subject_id, tx.listing_id})
