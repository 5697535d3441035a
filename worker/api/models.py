"""Typed views of the Integration API resources the product reads.

Resources keep the API's JSON:API shape (``id``, ``type``, ``attributes``,
``relationships``) with snake_case Python names over camelCase wire names. Unknown
fields are kept, never rejected: Sharetribe adds attributes without notice. A
resource that lacks a field we require raises :class:`~worker.errors.ResourceError`
naming the resource type, id and field.

The API sends null for every attribute of a deleted resource but its flags (and a
banned user's data is as bare), and null for any requested attribute that has no
data. So a null where a field has a default means that default (``{}`` for
extended data, an empty profile, ``False``, ``[]``), and only what the product
cannot do without is required: a transaction's process, transitions and times; a
user's or listing's ``createdAt`` may be missing.

Related resources from a response's ``included`` array are resolved onto the
resource (``transaction.customer``, ``transaction.provider``, ``transaction.listing``)
when the request asked for them. A related resource that is gone (not included, a
null relationship) or that cannot be read is absent (``None``), never a reason to
fail the resource that points at it; an unreadable one is logged by type and id.

:func:`parse_page` reads a page item by item: an item of ``data`` that cannot be
read is set aside in :attr:`Page.rejected` (its position, id, type and a one-line
reason, no personal data) and the rest of the page is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from worker.errors import ApiErrorDetail, DecodeError, ResourceError

__all__ = [
    "ApiModel",
    "Event",
    "EventAttributes",
    "Included",
    "LineItem",
    "Listing",
    "ListingAttributes",
    "Marketplace",
    "MarketplaceAttributes",
    "Money",
    "Page",
    "PageMeta",
    "RejectedItem",
    "Relationship",
    "Resource",
    "ResourceRef",
    "Transaction",
    "TransactionAttributes",
    "TransitionRecord",
    "User",
    "UserAttributes",
    "UserProfile",
    "parse_document",
    "parse_error_details",
    "parse_one",
    "parse_page",
]

JsonObject = dict[str, Any]

logger = logging.getLogger(__name__)


@cache
def _defaulted_keys(model: type[BaseModel]) -> frozenset[str]:
    """Wire and Python names of the fields whose default is not None (so None is not a value)."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        if info.is_required() or (info.default_factory is None and info.default is None):
            continue
        keys.add(name)
        if info.alias:
            keys.add(info.alias)
    return frozenset(keys)


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields kept, null as the default."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Deleted and banned resources come with null for everything (see the module doc).
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted_keys(cls)
        for key, value in data.items():  # a plain loop: this runs for every model of every event
            if value is None and key in defaulted:
                return {k: v for k, v in data.items() if not (v is None and k in defaulted)}
        return data


class Money(ApiModel):
    amount: int
    currency: str


class TransitionRecord(ApiModel):
    """One entry of a transaction's transition history."""

    transition: str
    created_at: datetime
    by: str


class LineItem(ApiModel):
    code: str
    unit_price: Money
    line_total: Money
    quantity: Decimal | None = None
    percentage: Decimal | None = None
    reversal: bool = False
    include_for: list[str] = Field(default_factory=list)


class ResourceRef(ApiModel):
    id: UUID
    type: str


class Relationship(ApiModel):
    data: ResourceRef | list[ResourceRef] | None = None

    @field_validator("data", mode="wrap")
    @classmethod
    def _unreadable_is_absent(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # A broken reference must not fail the resource holding it: it is simply not there.
        try:
            return handler(value)
        except ValidationError:
            return None


class Resource(ApiModel):
    """Common shape of every resource."""

    #: relationship name -> model used to resolve it from ``included``.
    related_models: ClassVar[Mapping[str, type[Resource]]] = {}

    id: UUID
    type: str
    relationships: dict[str, Relationship] = Field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`~worker.errors.ResourceError` if an embedded part is unusable (a hook)."""

    def related_id(self, name: str) -> UUID | None:
        """Id of a to-one relationship, when the response carried it."""
        rel = self.relationships.get(name)
        if rel is None or not isinstance(rel.data, ResourceRef):
            return None
        return rel.data.id


class MarketplaceAttributes(ApiModel):
    name: str | None = None


class Marketplace(Resource):
    attributes: MarketplaceAttributes = Field(default_factory=MarketplaceAttributes)


class UserProfile(ApiModel):
    display_name: str | None = None
    abbreviated_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    bio: str | None = None
    public_data: JsonObject = Field(default_factory=dict)
    protected_data: JsonObject = Field(default_factory=dict)
    private_data: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)


class UserAttributes(ApiModel):
    created_at: datetime | None = None
    email: str | None = None
    banned: bool = False
    deleted: bool = False
    profile: UserProfile = Field(default_factory=UserProfile)


class User(Resource):
    attributes: UserAttributes


class ListingAttributes(ApiModel):
    created_at: datetime | None = None
    title: str | None = None
    description: str | None = None
    state: str | None = None
    deleted: bool = False
    price: Money | None = None
    public_data: JsonObject = Field(default_factory=dict)
    private_data: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)


class Listing(Resource):
    related_models: ClassVar[Mapping[str, type[Resource]]] = {"author": User}

    attributes: ListingAttributes
    author: User | None = Field(default=None, exclude=True)


class TransactionAttributes(ApiModel):
    created_at: datetime
    process_name: str
    process_version: int
    last_transition: str
    last_transitioned_at: datetime
    transitions: list[TransitionRecord]
    state: str | None = None
    line_items: list[LineItem] = Field(default_factory=list)
    payin_total: Money | None = None
    payout_total: Money | None = None
    protected_data: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)


class Transaction(Resource):
    related_models: ClassVar[Mapping[str, type[Resource]]] = {
        "customer": User,
        "provider": User,
        "listing": Listing,
    }

    attributes: TransactionAttributes
    customer: User | None = Field(default=None, exclude=True)
    provider: User | None = Field(default=None, exclude=True)
    listing: Listing | None = Field(default=None, exclude=True)


class EventAttributes(ApiModel):
    sequence_id: int
    created_at: datetime
    event_type: str
    resource_id: UUID
    resource_type: str
    source: str | None = None
    resource: JsonObject | None = None
    previous_values: JsonObject | None = None
    audit_data: JsonObject | None = None


class Event(Resource):
    attributes: EventAttributes
    _snapshot: Transaction | None = PrivateAttr(default=None)

    def transaction(self) -> Transaction | None:
        """The transaction after the change, for ``transaction/*`` events.

        Raises :class:`~worker.errors.ResourceError` if the snapshot cannot be read;
        events read through :func:`parse_page` were checked already (see :meth:`check`).
        """
        res = self.attributes.resource
        if res is None or self.attributes.resource_type != "transaction":
            return None
        if self._snapshot is None:
            self._snapshot = parse_one(Transaction, res, Included(()))
        return self._snapshot

    def check(self) -> None:
        """Read the transaction snapshot now: an event whose snapshot is unusable is unusable."""
        try:
            self.transaction()
        except ResourceError as exc:
            raise ResourceError(f"{self.type} {self.id}: its resource: {exc.message}") from exc


class PageMeta(ApiModel):
    total_items: int | None = None
    total_pages: int | None = None
    page: int | None = None
    per_page: int | None = None


R = TypeVar("R", bound=Resource)


class RejectedItem(BaseModel):
    """An item of a page's ``data`` that could not be read; safe to log and store.

    ``index`` is its position in ``data``; ``id`` and ``type`` are what the item
    said, when it said it; ``reason`` is one line naming the field at fault, never
    its value. ``sequence_id`` is an event's place in the event stream, when it
    can be read, so a cursor can step past the item.
    """

    model_config = ConfigDict(frozen=True)

    index: int
    id: str | None = None
    type: str | None = None
    reason: str
    sequence_id: int | None = None


class Page(BaseModel, Generic[R]):
    """One page of a query: resolved resources plus pagination meta.

    ``data`` holds the items that could be read, in the server's order;
    ``rejected`` the ones that could not (:class:`RejectedItem`). ``served_at``
    is the server's time from the answer's ``Date`` header (aware UTC), or None
    when it sent none that parses.
    """

    data: list[R]
    meta: PageMeta = Field(default_factory=PageMeta)
    rejected: list[RejectedItem] = Field(default_factory=list)
    served_at: datetime | None = None

    @property
    def received(self) -> int:
        """How many items the server sent, read or not: a "full page" is judged on this."""
        return len(self.data) + len(self.rejected)


class Included:
    """Index of a response's ``included`` array by (type, id)."""

    def __init__(self, raw: Iterable[JsonObject]) -> None:
        self._by_key: dict[tuple[str, str], JsonObject] = {}
        for item in raw:
            if isinstance(item, dict) and "id" in item and "type" in item:
                self._by_key[(str(item["type"]), str(item["id"]))] = item

    def get(self, ref: ResourceRef) -> JsonObject | None:
        return self._by_key.get((ref.type, str(ref.id)))


def _describe(raw: Any) -> str:
    if isinstance(raw, dict):
        return f"{raw.get('type', 'resource')} {raw.get('id', '(no id)')}"
    return "resource"


def _reason(exc: ValidationError) -> str:
    # The field and what is wrong with it; never the input, which may be personal data.
    first = exc.errors(include_input=False, include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    return f"field {field!r}: {first['msg'].lower()}" if field else first["msg"].lower()


def parse_one(model: type[R], raw: Any, included: Included) -> R:
    """Validate one resource and resolve its included relationships.

    Raises :class:`~worker.errors.ResourceError` when the resource itself cannot be
    read; a related resource that cannot be read is left absent (and logged).
    """
    try:
        resource = model.model_validate(raw)
    except ValidationError as exc:
        raise ResourceError(f"{_describe(raw)}: {_reason(exc)}") from exc
    resource.check()
    for name, related_model in model.related_models.items():
        rel = resource.relationships.get(name)
        if rel is None or not isinstance(rel.data, ResourceRef):
            continue
        related_raw = included.get(rel.data)
        if related_raw is None:
            continue
        try:
            setattr(resource, name, parse_one(related_model, related_raw, included))
        except ResourceError as exc:
            logger.warning("%s %s: related %s left out: %s", resource.type, resource.id, name, exc.message)
    return resource


def _rejected(index: int, raw: Any, exc: ResourceError) -> RejectedItem:
    item = raw if isinstance(raw, dict) else {}
    attributes = item.get("attributes")
    sequence_id = attributes.get("sequenceId") if isinstance(attributes, dict) else None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int):
        sequence_id = None
    return RejectedItem(
        index=index,
        id=str(item["id"])[:64] if isinstance(item.get("id"), str) else None,
        type=str(item["type"])[:64] if isinstance(item.get("type"), str) else None,
        reason=exc.message,
        sequence_id=sequence_id
        if isinstance(sequence_id, int) and not isinstance(sequence_id, bool)
        else None,
    )


def _document(body: Any) -> tuple[Any, Included]:
    if not isinstance(body, dict) or "data" not in body:
        raise DecodeError("answer has no 'data' member")
    included = body.get("included")
    if included is None:
        included = []
    if not isinstance(included, list):
        raise DecodeError("answer's 'included' is not an array")
    return body["data"], Included(included)


def parse_document(model: type[R], body: Any) -> R:
    """Parse a single-resource answer (``show`` queries, expanded commands)."""
    data, included = _document(body)
    return parse_one(model, data, included)


def parse_page(model: type[R], body: Any) -> Page[R]:
    """Parse a multi-resource answer (``query`` endpoints), item by item.

    A malformed document (no ``data`` array, a broken ``meta``) raises
    :class:`~worker.errors.DecodeError`; an item that cannot be read goes to
    :attr:`Page.rejected` and the page goes on.
    """
    data, included = _document(body)
    if not isinstance(data, list):
        raise DecodeError("answer's 'data' is not an array")
    try:
        meta = PageMeta.model_validate(body.get("meta") or {})
    except ValidationError as exc:
        raise DecodeError(f"answer's 'meta' is invalid: {exc.errors()[0]['msg']}") from exc
    items: list[R] = []
    rejected: list[RejectedItem] = []
    for index, raw in enumerate(data):
        try:
            items.append(parse_one(model, raw, included))
        except ResourceError as exc:
            rejected.append(_rejected(index, raw, exc))
    return Page[model](data=items, meta=meta, rejected=rejected)  # type: ignore[valid-type]


def parse_error_details(body: Any) -> list[ApiErrorDetail]:
    """Read the ``errors`` envelope; tolerate anything (5xx bodies may be junk)."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    details = []
    for item in body["errors"]:
        if not isinstance(item, dict):
            continue
        source = item.get("source")
        path = source.get("path") if isinstance(source, dict) else None
        status = item.get("status")
        details.append(
            ApiErrorDetail(
                status=status if isinstance(status, int) else 0,
                code=str(item.get("code") or "unknown"),
                title=str(item.get("title") or ""),
                details=str(item["details"]) if item.get("details") is not None else None,
                source_path=tuple(str(p) for p in path) if isinstance(path, list) else (),
            )
        )
    return details
