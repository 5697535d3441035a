"""Query parameters and query evaluation for the simulator's read endpoints.

Parsing turns a request's query string into typed values or a :class:`ParamError`
that the HTTP layer writes into the API's error envelope (400, with the offending
parameter in ``source.path``). Evaluation always reads the store's *current*
state: nothing is snapshotted between pages, so a transaction that transitions
while a client pages can move between pages exactly as it would on the real API.

Choices where Sharetribe documents nothing (all deliberate, all tested):

* ``createdAtStart`` is inclusive, ``createdAtEnd`` exclusive.
* ``bookingStart``/``bookingEnd`` select transactions whose booking overlaps the
  range (either bound may be left out); transactions without a booking never match.
* Sorting ties are broken by transaction id (ascending), so paging is deterministic.
  Transactions without messages sort after those with messages for
  ``lastMessageAt`` in either direction.
* Paging reaches at most ``page_cap`` items of the sorted result. ``totalItems``
  still reports every match; ``totalPages`` counts only reachable pages. A page
  that would start at or beyond the cap answers 400 ``validation-invalid-params``
  on ``page``; a page that straddles the cap is cut at it.
* An empty ``include=`` includes nothing; an empty filter list (``states=``) is a 400.
* Parameters an endpoint does not know answer 400 ``validation-disallowed-key``
  when strict checking is on (the default), to catch client typos early.
* ``events/query`` answers ``meta: {perPage}`` and nothing else (Sharetribe's own
  examples read ``meta.perPage`` to tell a full page; sequence ids, not page
  numbers, move its cursor, so a page number or a total would mean nothing).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.api.wire import parse_time
from worker.sim.store import Entity, Event, Store, Transaction, ref_tree

__all__ = [
    "DEFAULT_PAGE_CAP",
    "INCLUDES",
    "MAX_PER_PAGE",
    "EventQuery",
    "Page",
    "ParamError",
    "TransactionQuery",
    "View",
    "check_allowed",
    "events_meta",
    "parse_bool",
    "parse_events_query",
    "parse_transaction_query",
    "parse_uuid",
    "parse_view",
    "query_events",
    "query_transactions",
    "render_document",
    "require_uuid",
]

MAX_PER_PAGE = 100
DEFAULT_PAGE_CAP = 10_000
SORT_KEYS = ("createdAt", "lastTransitionedAt", "lastMessageAt")
MAX_SORT_KEYS = 3

#: Relationship paths each resource type accepts in ``include``.
INCLUDES: Mapping[str, frozenset[str]] = {
    "transaction": frozenset(
        {
            "customer",
            "provider",
            "listing",
            "marketplace",
            "booking",
            "messages",
            "listing.author",
            "provider.profileImage",
            "customer.profileImage",
            "messages.sender",
            "messages.sender.profileImage",
            "reviews",
            "reviews.author",
            "reviews.author.profileImage",
            "reviews.subject",
            "reviews.subject.profileImage",
        }
    ),
    "user": frozenset({"marketplace", "profileImage"}),
    "listing": frozenset({"author", "marketplace", "author.profileImage"}),
    "marketplace": frozenset(),
    "event": frozenset(),
}

# Parameters every read endpoint understands besides its own.
_COMMON_PREFIXES = ("fields.", "limit.")

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class ParamError(Exception):
    """A request parameter is missing, malformed or not allowed."""

    def __init__(
        self,
        param: str,
        details: str,
        *,
        code: str = "validation-invalid-params",
        source_type: str = "query",
    ) -> None:
        super().__init__(f"{param}: {details}")
        self.param = param
        self.details = details
        self.code = code
        self.source_type = source_type


def check_allowed(params: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Refuse any parameter outside ``allowed`` (``fields.*``/``limit.*`` always pass)."""
    known = set(allowed)
    for name in params:
        if name not in known and not name.startswith(_COMMON_PREFIXES):
            raise ParamError(
                name, "this endpoint does not accept that parameter", code="validation-disallowed-key"
            )


def parse_uuid(value: Any, param: str, *, source_type: str = "query") -> uuid.UUID:
    """A canonical hyphenated UUID (a ``UUID`` object passes through)."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not _UUID_RE.match(value):
        raise ParamError(param, f"not a UUID: {value!r}", source_type=source_type)
    return uuid.UUID(value)


def require_uuid(params: Mapping[str, Any], param: str, *, source_type: str = "query") -> uuid.UUID:
    """A required UUID parameter; missing answers ``validation-missing-key``."""
    if param not in params or params[param] in (None, ""):
        raise ParamError(param, "required", code="validation-missing-key", source_type=source_type)
    return parse_uuid(params[param], param, source_type=source_type)


def _opt_uuid(params: Mapping[str, str], param: str) -> uuid.UUID | None:
    return parse_uuid(params[param], param) if param in params else None


def _opt_time(params: Mapping[str, str], param: str) -> datetime | None:
    if param not in params:
        return None
    text = params[param]
    try:
        return parse_time(text)
    except ValueError:
        raise ParamError(param, f"not an ISO 8601 time: {text!r}") from None


def _opt_int(params: Mapping[str, str], param: str, default: int, lo: int, hi: int | None = None) -> int:
    if param not in params:
        return default
    text = params[param]
    if not re.fullmatch(r"-?\d+", text):
        raise ParamError(param, f"not an integer: {text!r}")
    value = int(text)
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ParamError(param, f"must be {bounds}, got {value}")
    return value


def parse_bool(value: Any, param: str, *, source_type: str = "query") -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise ParamError(param, f"must be true or false, got {value!r}", source_type=source_type)


def _opt_bool(params: Mapping[str, str], param: str) -> bool | None:
    return parse_bool(params[param], param) if param in params else None


def _opt_list(params: Mapping[str, str], param: str) -> tuple[str, ...] | None:
    if param not in params:
        return None
    items = tuple(part.strip() for part in params[param].split(",") if part.strip())
    if not items:
        raise ParamError(param, "must list at least one value")
    return items


# -- views: include and sparse fields -------------------------------------------------


@dataclass(frozen=True)
class View:
    """How to render resources: which relationships to include and which attributes to keep."""

    include: tuple[str, ...] = ()
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)


def parse_view(params: Mapping[str, str], resource_type: str) -> View:
    """``include``, ``fields.<type>`` and ``limit.<relationship>`` for a ``resource_type`` answer."""
    # An empty ``include`` (what SDKs send for an empty list) means "nothing".
    include = tuple(p.strip() for p in params.get("include", "").split(",") if p.strip())
    allowed = INCLUDES[resource_type]
    for path in include:
        if path not in allowed:
            raise ParamError("include", f"{resource_type} cannot include {path!r}")
    fields: dict[str, tuple[str, ...]] = {}
    limits: dict[str, int] = {}
    for name, value in params.items():
        if name.startswith("fields."):
            fields[name[len("fields.") :]] = tuple(p.strip() for p in value.split(",") if p.strip())
        elif name.startswith("limit."):
            limits[name[len("limit.") :]] = _opt_int(params, name, MAX_PER_PAGE, 1, MAX_PER_PAGE)
    return View(include=include, fields=fields, limits=limits)


def _sparse(attributes: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Only the attributes at ``paths`` (dot-separated); every requested path is present, null if absent."""
    out: dict[str, Any] = {}
    for path in paths:
        parts = path.split(".")
        value: Any = attributes
        for part in parts:
            value = value.get(part) if isinstance(value, Mapping) else None
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


class _Renderer:
    """Builds a document: primary data, relationships for included paths, de-duplicated ``included``."""

    def __init__(self, store: Store, view: View) -> None:
        self.store = store
        self.view = view
        self.included: dict[tuple[str, uuid.UUID], dict[str, Any]] = {}

    def tree(self, entity: Entity) -> dict[str, Any]:
        attrs = entity.attributes()
        wanted = self.view.fields.get(entity.TYPE)
        return {
            "id": entity.id,
            "type": entity.TYPE,
            "attributes": attrs if wanted is None else _sparse(attrs, wanted),
        }

    def _targets(self, entity: Entity, name: str) -> tuple[Any, list[Entity]]:
        """A relationship's ``data`` member and the entities it points at."""
        target = entity.relationships().get(name)
        if isinstance(target, list):
            refs = target[: self.view.limits.get(name, MAX_PER_PAGE)]
            data: Any = ref_tree(refs)
        else:
            refs = [] if target is None else [target]
            data = ref_tree(target)
        return data, [e for t, i in refs if (e := self.store.get(t, i)) is not None]

    def _include(self, entity: Entity, tree: dict[str, Any], path: Sequence[str]) -> None:
        name, rest = path[0], path[1:]
        data, related = self._targets(entity, name)
        tree.setdefault("relationships", {})[name] = {"data": data}
        for child in related:
            key = (child.TYPE, child.id)
            child_tree = self.included.get(key)
            if child_tree is None:
                child_tree = self.included[key] = self.tree(child)
            if rest:
                self._include(child, child_tree, rest)

    def resource(self, entity: Entity) -> dict[str, Any]:
        tree = self.tree(entity)
        for path in self.view.include:
            self._include(entity, tree, path.split("."))
        return tree


def render_document(
    store: Store,
    data: Entity | Sequence[Entity],
    view: View = View(),
    *,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The answer document for one resource (``show``) or a list (``query``)."""
    renderer = _Renderer(store, view)
    body: dict[str, Any] = {
        "data": renderer.resource(data) if isinstance(data, Entity) else [renderer.resource(e) for e in data]
    }
    if meta is not None:
        body["meta"] = dict(meta)
    if view.include:
        body["included"] = list(renderer.included.values())
    return body


# -- transactions/query ----------------------------------------------------------------


@dataclass(frozen=True)
class TransactionQuery:
    created_at_start: datetime | None = None
    created_at_end: datetime | None = None
    customer_id: uuid.UUID | None = None
    provider_id: uuid.UUID | None = None
    listing_id: uuid.UUID | None = None
    last_transitions: tuple[str, ...] | None = None
    process_names: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None
    booking_start: datetime | None = None
    booking_end: datetime | None = None
    has_booking: bool | None = None
    has_payin: bool | None = None
    has_message: bool | None = None
    #: (key, descending) pairs, most significant first.
    sort: tuple[tuple[str, bool], ...] = (("createdAt", True),)
    page: int = 1
    per_page: int = MAX_PER_PAGE


TRANSACTION_QUERY_PARAMS = [
    "createdAtStart",
    "createdAtEnd",
    "customerId",
    "providerId",
    "listingId",
    "lastTransitions",
    "processNames",
    "states",
    "bookingStart",
    "bookingEnd",
    "hasBooking",
    "hasPayin",
    "hasMessage",
    "sort",
    "page",
    "perPage",
    "include",
]


def _parse_sort(params: Mapping[str, str]) -> tuple[tuple[str, bool], ...]:
    keys = _opt_list(params, "sort")
    if keys is None:
        return (("createdAt", True),)
    if len(keys) > MAX_SORT_KEYS:
        raise ParamError("sort", f"at most {MAX_SORT_KEYS} sort keys, got {len(keys)}")
    out = []
    for key in keys:
        # Sharetribe's convention: a bare key is newest first, a "-" prefix oldest first.
        descending = not key.startswith("-")
        name = key.lstrip("-")
        if name not in SORT_KEYS:
            raise ParamError("sort", f"unknown sort key {name!r}; use one of {', '.join(SORT_KEYS)}")
        out.append((name, descending))
    return tuple(out)


def parse_transaction_query(params: Mapping[str, str]) -> TransactionQuery:
    """Validate the filters, sort and paging of a ``transactions/query`` request."""
    return TransactionQuery(
        created_at_start=_opt_time(params, "createdAtStart"),
        created_at_end=_opt_time(params, "createdAtEnd"),
        customer_id=_opt_uuid(params, "customerId"),
        provider_id=_opt_uuid(params, "providerId"),
        listing_id=_opt_uuid(params, "listingId"),
        last_transitions=_opt_list(params, "lastTransitions"),
        process_names=_opt_list(params, "processNames"),
        states=_opt_list(params, "states"),
        booking_start=_opt_time(params, "bookingStart"),
        booking_end=_opt_time(params, "bookingEnd"),
        has_booking=_opt_bool(params, "hasBooking"),
        has_payin=_opt_bool(params, "hasPayin"),
        has_message=_opt_bool(params, "hasMessage"),
        sort=_parse_sort(params),
        page=_opt_int(params, "page", 1, 1),
        per_page=_opt_int(params, "perPage", MAX_PER_PAGE, 1, MAX_PER_PAGE),
    )


def _matcher(q: TransactionQuery) -> Callable[[Transaction], bool]:
    checks: list[Callable[[Transaction], bool]] = []
    if q.created_at_start is not None:
        start = q.created_at_start
        checks.append(lambda t: t.created_at >= start)
    if q.created_at_end is not None:
        end = q.created_at_end
        checks.append(lambda t: t.created_at < end)
    if q.customer_id is not None:
        checks.append(lambda t: t.customer_id == q.customer_id)
    if q.provider_id is not None:
        checks.append(lambda t: t.provider_id == q.provider_id)
    if q.listing_id is not None:
        checks.append(lambda t: t.listing_id == q.listing_id)
    if q.last_transitions is not None:
        wanted = frozenset(q.last_transitions)
        checks.append(lambda t: t.last_transition in wanted)
    if q.process_names is not None:
        names = frozenset(q.process_names)
        checks.append(lambda t: t.process.name in names or t.process.alias in names)
    if q.states is not None:
        states = frozenset(q.states)
        checks.append(lambda t: t.state in states)
    if q.booking_start is not None or q.booking_end is not None:
        lo, hi = q.booking_start, q.booking_end
        checks.append(
            lambda t: (
                t.booking is not None
                and (hi is None or t.booking.start < hi)
                and (lo is None or t.booking.end > lo)
            )
        )
    if q.has_booking is not None:
        checks.append(lambda t: (t.booking is not None) == q.has_booking)
    if q.has_payin is not None:
        checks.append(lambda t: (t.payin_total is not None) == q.has_payin)
    if q.has_message is not None:
        checks.append(lambda t: bool(t.messages) == q.has_message)
    return lambda t: all(check(t) for check in checks)


_SORT_VALUE: Mapping[str, Callable[[Transaction], datetime | None]] = {
    "createdAt": lambda t: t.created_at,
    "lastTransitionedAt": lambda t: t.last_transitioned_at,
    "lastMessageAt": lambda t: t.last_message_at,
}


def _sorted(items: list[Transaction], sort: Sequence[tuple[str, bool]]) -> list[Transaction]:
    # Python's sort is stable: sort by the tie-breaker first, then by each key from
    # least to most significant. Missing values are set aside so they stay last.
    items = sorted(items, key=lambda t: t.id.int)
    for key, descending in reversed(sort):
        value = _SORT_VALUE[key]
        present = [t for t in items if value(t) is not None]
        missing = [t for t in items if value(t) is None]
        present.sort(key=lambda t: value(t), reverse=descending)  # type: ignore[arg-type,return-value]
        items = present + missing
    return items


@dataclass(frozen=True)
class Page:
    items: list[Transaction]
    meta: dict[str, int]


def query_transactions(store: Store, q: TransactionQuery, *, page_cap: int = DEFAULT_PAGE_CAP) -> Page:
    """Evaluate a transaction query against the store as it is right now."""
    start = (q.page - 1) * q.per_page
    if start >= page_cap:
        raise ParamError("page", f"paging reaches at most {page_cap} items; page {q.page} starts beyond them")
    match = _matcher(q)
    found = _sorted([t for t in store.transactions.values() if match(t)], q.sort)
    reachable = min(len(found), page_cap)
    return Page(
        items=found[start : min(start + q.per_page, reachable)],
        meta={
            "totalItems": len(found),
            "totalPages": math.ceil(reachable / q.per_page),
            "page": q.page,
            "perPage": q.per_page,
        },
    )


# -- events/query ----------------------------------------------------------------------


@dataclass(frozen=True)
class EventQuery:
    start_after_sequence_id: int = 0
    created_at_start: datetime | None = None
    event_types: tuple[str, ...] | None = None
    resource_id: uuid.UUID | None = None
    related_resource_id: uuid.UUID | None = None
    per_page: int = MAX_PER_PAGE


EVENT_QUERY_PARAMS = [
    "startAfterSequenceId",
    "createdAtStart",
    "eventTypes",
    "resourceId",
    "relatedResourceId",
    "perPage",
]


def parse_events_query(params: Mapping[str, str]) -> EventQuery:
    """Validate the filters of an ``events/query`` request."""
    return EventQuery(
        start_after_sequence_id=_opt_int(params, "startAfterSequenceId", 0, 0),
        created_at_start=_opt_time(params, "createdAtStart"),
        event_types=_opt_list(params, "eventTypes"),
        resource_id=_opt_uuid(params, "resourceId"),
        related_resource_id=_opt_uuid(params, "relatedResourceId"),
        per_page=_opt_int(params, "perPage", MAX_PER_PAGE, 1, MAX_PER_PAGE),
    )


def events_meta(q: EventQuery) -> dict[str, int]:
    """The ``meta`` of an ``events/query`` answer: only the page size.

    Events page by ``startAfterSequenceId``, not by page number, so there is no
    page or total to report; a page as long as ``perPage`` means "ask again".
    """
    return {"perPage": q.per_page}


def query_events(store: Store, q: EventQuery) -> list[Event]:
    """Matching events in ascending sequence order, at most ``per_page`` of them."""
    types = frozenset(q.event_types) if q.event_types is not None else None
    out: list[Event] = []
    for event in store.events_after(q.start_after_sequence_id):
        if q.created_at_start is not None and event.created_at < q.created_at_start:
            continue
        if types is not None and event.event_type not in types:
            continue
        if q.resource_id is not None and event.resource_id != q.resource_id:
            continue
        if q.related_resource_id is not None and q.related_resource_id not in event.related_ids:
            continue
        out.append(event)
        if len(out) >= q.per_page:
            break
    return out
