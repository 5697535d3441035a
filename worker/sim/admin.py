"""The ``/_sim/`` routes: ground truth and knobs for tests, never part of the API.

JSON bodies and answers only (camelCase keys, ISO 8601 times, every key optional
unless marked ``*``); never authenticated, rate limited or faulted. Refusals use the
API's error envelope: 400 bad input, 404 unknown ids, 409 illegal transitions.

* ``POST /_sim/users`` ``{email, firstName, lastName, phoneNumber, publicData,
  protectedData, privateData, metadata, profileImage (true/false; default: three
  users in four have one), at}`` → 201 ``{data: user}``
* ``POST /_sim/listings`` ``{authorId*, processName, title, price: {amount, currency},
  publicData, at}`` → 201 ``{data: listing}``
* ``POST /_sim/transactions`` ``{listingId*, customerId*, transition (default
  request-payment), at, bookingStart, bookingEnd, quantity, protectedData}`` → 201
  ``{data: transaction, meta: {sequenceId}}``
* ``POST /_sim/transactions/{id}/transitions`` ``{transition*, at, by}`` →
  ``{data: transaction, meta: {sequenceId}}``
* ``POST /_sim/transactions/{id}/messages`` ``{content, senderId, at}`` → 201 ``{data: message}``
* ``POST /_sim/users/{id}/delete``, ``POST /_sim/users/{id}/ban``,
  ``POST /_sim/listings/{id}/delete``, ``POST /_sim/transactions/{id}/delete``
  ``{at}`` → ``{data: the resource as the API now shows it (a deleted transaction:
  its reference), meta: {sequenceId, eventType}}`` — see :mod:`worker.sim.removals`
* ``GET /_sim/transitions[?transactionId=][&deleted=true|false]`` →
  ``{data: [{transactionId, transition, createdAt, by, transactionDeletedAt?}]}`` —
  every transition ever applied, in order (ground truth). Deleting a transaction
  keeps its transitions here; they gain ``transactionDeletedAt`` (absent while the
  transaction exists), and ``deleted`` keeps only those of deleted (``true``) or
  existing (``false``) transactions.
* ``GET /_sim/stats``, ``POST /_sim/stats/reset`` — answers by status, faults, 429s, grants
* ``GET|POST /_sim/faults`` ``{faults: {<FaultConfig field>: value}, rateLimit:
  dev|prod|off, rateLimitScale}``
* ``POST /_sim/tokens/expire`` → ``{expired: n}``
* ``POST /_sim/traffic/step`` ``{n}`` → ``{data: [transitions applied]}``
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from worker.api.ratelimit import PRESETS, RateLimits
from worker.api.wire import JSON_MIME, Money, encode, parse_time
from worker.errors import ConfigError
from worker.sim import query
from worker.sim.http import ApiProblem, json_body, simulator
from worker.sim.query import ParamError
from worker.sim.store import Entity, Event, Store

if TYPE_CHECKING:
    from worker.sim import Simulator

__all__ = ["add_admin_routes"]


def _opt_time(body: Mapping[str, Any], key: str) -> datetime | None:
    value = body.get(key)
    if value is None:
        return None
    try:
        return parse_time(str(value))
    except ValueError:
        raise ParamError(key, f"not an ISO 8601 time: {value!r}", source_type="body") from None


def _opt_uuid(body: Mapping[str, Any], key: str) -> Any:
    return None if body.get(key) is None else query.parse_uuid(body[key], key, source_type="body")


def _opt_object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise ParamError(key, "must be an object", code="validation-invalid-value", source_type="body")
    return value


def _opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ParamError(key, "must be true or false", code="validation-invalid-value", source_type="body")
    return value


def _data(entity: Entity, status: int = 200, **extra: Any) -> web.Response:
    body = {"data": entity.resource(with_relationships=True), **extra}
    return web.Response(status=status, body=encode(body), content_type=JSON_MIME)


def _json(tree: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode(tree), content_type=JSON_MIME)


async def admin_create_user(request: web.Request) -> web.Response:
    body = await json_body(request)
    user = simulator(request).store.create_user(
        email=body.get("email"),
        first_name=body.get("firstName"),
        last_name=body.get("lastName"),
        phone_number=body.get("phoneNumber"),
        public_data=_opt_object(body, "publicData"),
        protected_data=_opt_object(body, "protectedData"),
        private_data=_opt_object(body, "privateData"),
        metadata=_opt_object(body, "metadata"),
        profile_image=_opt_bool(body, "profileImage"),
        at=_opt_time(body, "at"),
    )
    return _data(user, 201)


async def admin_create_listing(request: web.Request) -> web.Response:
    body = await json_body(request)
    price = _opt_object(body, "price")
    try:
        money = Money(int(price["amount"]), str(price["currency"])) if price is not None else None
    except (KeyError, TypeError, ValueError):
        raise ParamError(
            "price", "needs amount and currency", code="validation-invalid-value", source_type="body"
        ) from None
    listing = simulator(request).store.create_listing(
        query.require_uuid(body, "authorId", source_type="body"),
        process_name=body.get("processName"),
        title=body.get("title"),
        price=money,
        public_data=_opt_object(body, "publicData"),
        at=_opt_time(body, "at"),
    )
    return _data(listing, 201)


async def admin_create_transaction(request: web.Request) -> web.Response:
    body = await json_body(request)
    quantity = body.get("quantity")
    if quantity is not None and not isinstance(quantity, int):
        raise ParamError(
            "quantity", "must be an integer", code="validation-invalid-value", source_type="body"
        )
    store = simulator(request).store
    tx = store.initiate_transaction(
        query.require_uuid(body, "listingId", source_type="body"),
        query.require_uuid(body, "customerId", source_type="body"),
        str(body.get("transition") or "transition/request-payment"),
        at=_opt_time(body, "at"),
        booking_start=_opt_time(body, "bookingStart"),
        booking_end=_opt_time(body, "bookingEnd"),
        quantity=quantity,
        protected_data=_opt_object(body, "protectedData"),
    )
    return _data(tx, 201, meta={"sequenceId": store.last_sequence_id})


async def admin_transition(request: web.Request) -> web.Response:
    body = await json_body(request)
    store = simulator(request).store
    tx_id = query.parse_uuid(request.match_info["id"], "id")
    name = body.get("transition")
    if not isinstance(name, str):
        raise ParamError("transition", "required", code="validation-missing-key", source_type="body")
    by = body.get("by")
    event = store.apply_transition(tx_id, name, by=by, at=_opt_time(body, "at"))
    return _data(store.transaction(tx_id), meta={"sequenceId": event.sequence_id})


async def admin_message(request: web.Request) -> web.Response:
    body = await json_body(request)
    message = simulator(request).store.add_message(
        query.parse_uuid(request.match_info["id"], "id"),
        str(body.get("content") or ""),
        sender_id=_opt_uuid(body, "senderId"),
        at=_opt_time(body, "at"),
    )
    return _data(message, 201)


async def _removal(
    request: web.Request, remove: Callable[[Store, uuid.UUID, datetime | None], Event]
) -> web.Response:
    body = await json_body(request)
    store = simulator(request).store
    id_ = query.parse_uuid(request.match_info["id"], "id")
    event = remove(store, id_, _opt_time(body, "at"))
    entity = store.get(event.resource_type, id_)
    # A deleted transaction has left the store: only its reference is left to show.
    data = (
        entity.resource(with_relationships=True)
        if entity is not None
        else {"id": id_, "type": event.resource_type}
    )
    return _json({"data": data, "meta": {"sequenceId": event.sequence_id, "eventType": event.event_type}})


async def admin_delete_user(request: web.Request) -> web.Response:
    return await _removal(request, lambda store, id_, at: store.delete_user(id_, at=at))


async def admin_ban_user(request: web.Request) -> web.Response:
    return await _removal(request, lambda store, id_, at: store.ban_user(id_, at=at))


async def admin_delete_listing(request: web.Request) -> web.Response:
    return await _removal(request, lambda store, id_, at: store.delete_listing(id_, at=at))


async def admin_delete_transaction(request: web.Request) -> web.Response:
    return await _removal(request, lambda store, id_, at: store.delete_transaction(id_, at=at))


async def admin_transitions(request: web.Request) -> web.Response:
    store = simulator(request).store
    params = request.query
    tx_id = query.parse_uuid(params["transactionId"], "transactionId") if "transactionId" in params else None
    deleted = query.parse_bool(params["deleted"], "deleted") if "deleted" in params else None
    entries = []
    for entry in store.transition_log:
        if tx_id is not None and entry.transaction_id != tx_id:
            continue
        deleted_at = store.deleted_transactions.get(entry.transaction_id)
        if deleted is not None and deleted != (deleted_at is not None):
            continue
        line = entry.to_json()
        if deleted_at is not None:
            line["transactionDeletedAt"] = deleted_at
        entries.append(line)
    return _json({"data": entries})


async def admin_stats(request: web.Request) -> web.Response:
    sim = simulator(request)
    return _json(
        {
            **sim.stats.to_json(),
            "grants": dict(sim.auth.grants),
            "lastSequenceId": sim.store.last_sequence_id,
            "transactions": len(sim.store.transactions),
            "transitions": len(sim.store.transition_log),
        }
    )


async def admin_stats_reset(request: web.Request) -> web.Response:
    sim = simulator(request)
    sim.stats.reset()
    sim.auth.grants.clear()
    return _json({"reset": True})


def _limits_json(limits: RateLimits | None) -> Any:
    if limits is None:
        return None
    return {
        kind: {
            "initial": spec.initial,
            "refillAmount": spec.refill_amount,
            "refillIntervalS": spec.refill_interval_s,
            "capacity": spec.capacity,
        }
        for kind, spec in (("queries", limits.queries), ("commands", limits.commands))
    }


def _faults_json(sim: Simulator) -> dict[str, Any]:
    return {"faults": sim.faults.to_json(), "rateLimits": _limits_json(sim.rate_limits)}


async def admin_get_faults(request: web.Request) -> web.Response:
    return _json(_faults_json(simulator(request)))


async def admin_set_faults(request: web.Request) -> web.Response:
    """Change faults and limits.

    Body: ``faults`` (FaultConfig fields to change), ``rateLimit`` (``dev``, ``prod``
    or ``off``) and ``rateLimitScale`` (time factor for the preset's refill).
    """
    sim = simulator(request)
    body = await json_body(request)
    try:
        if "faults" in body:
            sim.faults = sim.faults.updated(_opt_object(body, "faults") or {})
        if "rateLimit" in body:
            name = body["rateLimit"]
            if name not in (*PRESETS, "off", None):
                raise ConfigError(f"unknown rate limit preset {name!r}")
            limits = None if name in ("off", None) else PRESETS[name]
            scale = body.get("rateLimitScale")
            if limits is not None and scale is not None:
                limits = limits.scaled(float(scale))
            sim.rate_limits = limits
    except ConfigError as exc:
        raise ApiProblem(400, "validation-invalid-value", str(exc)) from exc
    return _json(_faults_json(sim))


async def admin_expire_tokens(request: web.Request) -> web.Response:
    return _json({"expired": simulator(request).expire_tokens()})


async def admin_traffic_step(request: web.Request) -> web.Response:
    body = await json_body(request)
    n = body.get("n", 1)
    if not isinstance(n, int) or n < 0:
        raise ParamError(
            "n", "must be a non-negative integer", code="validation-invalid-value", source_type="body"
        )
    entries = simulator(request).traffic.step(n)
    return _json({"data": [e.to_json() for e in entries]})


def add_admin_routes(app: web.Application) -> None:
    """Register every ``/_sim/`` route on ``app``."""
    app.router.add_post("/_sim/users", admin_create_user)
    app.router.add_post("/_sim/listings", admin_create_listing)
    app.router.add_post("/_sim/transactions", admin_create_transaction)
    app.router.add_post("/_sim/transactions/{id}/transitions", admin_transition)
    app.router.add_post("/_sim/transactions/{id}/messages", admin_message)
    app.router.add_post("/_sim/users/{id}/delete", admin_delete_user)
    app.router.add_post("/_sim/users/{id}/ban", admin_ban_user)
    app.router.add_post("/_sim/listings/{id}/delete", admin_delete_listing)
    app.router.add_post("/_sim/transactions/{id}/delete", admin_delete_transaction)
    app.router.add_get("/_sim/transitions", admin_transitions)
    app.router.add_get("/_sim/stats", admin_stats)
    app.router.add_post("/_sim/stats/reset", admin_stats_reset)
    app.router.add_get("/_sim/faults", admin_get_faults)
    app.router.add_post("/_sim/faults", admin_set_faults)
    app.router.add_post("/_sim/tokens/expire", admin_expire_tokens)
    app.router.add_post("/_sim/traffic/step", admin_traffic_step)
