"""Typed views of the Integration API resources the product reads.

Resources keep the API's JSON:API shape (``id``, ``type``, ``attributes``,
``relationships``) with snake_case Python names over camelCase wire names. Unknown
fields are kept, never rejected: Sharetribe adds attributes without notice. A
resource that lacks a field we require raises :class:`~worker.errors.ResourceError`
naming the resource type, id and field.

Related resources from a response's ``included`` array are resolved onto the
resource (``transaction.customer``, ``transaction.provider``, ``transaction.listing``)
when the request asked for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError
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


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


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


class Resource(ApiModel):
    """Common shape of every resource."""

    #: relationship name -> model used to resolve it from ``included``.
    related_models: ClassVar[Mapping[str, type[Resource]]] = {}

    id: UUID
    type: str
    relationships: dict[str, Relationship] = Field(default_factory=dict)

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
    created_at: datetime
    email: str | None = None
    banned: bool = False
    deleted: bool = False
    profile: UserProfile = Field(default_factory=UserProfile)


class User(Resource):
    attributes: UserAttributes


class ListingAttributes(ApiModel):
    created_at: datetime
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

    def transaction(self) -> Transaction | None:
        """The transaction after the change, for ``transaction/*`` events."""
        res = self.attributes.resource
        if res is None or self.attributes.resource_type != "transaction":
            return None
        return parse_one(Transaction, res, Included(()))


class PageMeta(ApiModel):
    total_items: int | None = None
    total_pages: int | None = None
    page: int | None = None
    per_page: int | None = None


R = TypeVar("R", bound=Resource)


class Page(BaseModel, Generic[R]):
    """One page of a query: resolved resources plus pagination meta."""

    data: list[R]
    meta: PageMeta = Field(default_factory=PageMeta)


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


def parse_one(model: type[R], raw: Any, included: Included) -> R:
    """Validate one resource and resolve its included relationships."""
    try:
        resource = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ResourceError(f"{_describe(raw)}: field {field!r}: {first['msg'].lower()}") from exc
    for name, related_model in model.related_models.items():
        rel = resource.relationships.get(name)
        if rel is None or not isinstance(rel.data, ResourceRef):
            continue
        related_raw = included.get(rel.data)
        if related_raw is not None:
            setattr(resource, name, parse_one(related_model, related_raw, included))
    return resource


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
    """Parse a multi-resource answer (``query`` endpoints)."""
    data, included = _document(body)
    if not isinstance(data, list):
        raise DecodeError("answer's 'data' is not an array")
    try:
        meta = PageMeta.model_validate(body.get("meta") or {})
    except ValidationError as exc:
        raise DecodeError(f"answer's 'meta' is invalid: {exc.errors()[0]['msg']}") from exc
    return Page[model](data=[parse_one(model, item, included) for item in data], meta=meta)  # type: ignore[valid-type]


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
