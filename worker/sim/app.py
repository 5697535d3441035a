"""The simulator's aiohttp application: authentication and the Integration API.

Routes (``{api}`` is ``/v1/integration_api``):

* ``POST /v1/auth/token`` (form-urlencoded) — ``client_credentials`` and
  ``refresh_token`` grants; ``POST /v1/auth/revoke`` — ``token=<refresh token>``.
* ``GET {api}/marketplace/show``, ``users/show``, ``listings/show``,
  ``transactions/show``, ``transactions/query``, ``events/query``.
* ``POST {api}/transactions/transition`` and ``transactions/update_metadata``
  (JSON or Transit bodies; ``?expand=true`` for the full resource).
* ``/_sim/...`` — ground truth and knobs for tests, JSON only, never
  authenticated, rate limited or faulted (listed in :mod:`worker.sim.admin`).

Choices where the API's behaviour is not documented: a refresh grant keeps the
same refresh token (no rotation); revoking an unknown token answers 200 (as OAuth
revocation does); bad client credentials answer 401 ``auth-invalid-client`` and an
unknown refresh token 401 ``auth-invalid-refresh-token``; a command on an unknown
transaction answers 404 ``not-found``; ``params`` of a transition are accepted
and ignored; an unknown transition name answers 409 like an illegal one; a
deleted or banned user and a deleted listing are still answered by the show
endpoints (see :mod:`worker.sim.removals`); a transaction of a deleted party
answers 409 to a transition.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from worker.api.wire import JSON_MIME, TRANSIT_MIME, WireFormatError, decode
from worker.processes import IllegalTransitionError, UnknownProcessError
from worker.sim import query
from worker.sim.admin import add_admin_routes
from worker.sim.envelope import answer, error_response
from worker.sim.http import SIM_KEY, ApiProblem, query_params, simulator
from worker.sim.query import ParamError, View
from worker.sim.store import Clock, Entity, InvalidArgumentError, MissingResourceError

if TYPE_CHECKING:
    from worker.sim import Simulator

__all__ = ["API", "ApiProblem", "TokenAuthority", "create_app"]

log = logging.getLogger(__name__)

API = "/v1/integration_api"
FORM_MIME = "application/x-www-form-urlencoded"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- tokens -----------------------------------------------------------------------------


@dataclass
class _AccessToken:
    expires_at: datetime
    refresh_token: str


class TokenAuthority:
    """Issues, checks, expires and revokes tokens for the one simulated client application.

    Expiry follows the simulator's clock, so a test driving a fake clock can age
    tokens; :meth:`expire_all` ends every access token at once.
    """

    def __init__(self, client_id: str, client_secret: str, lifetime_s: float, clock: Clock) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, set[str]] = {}
        #: Successful grants by ``grant_type``.
        self.grants: Counter[str] = Counter()

    def _issue(self, refresh_token: str) -> dict[str, Any]:
        token = secrets.token_urlsafe(24)
        expires_at = self._clock() + timedelta(seconds=self.lifetime_s)
        self._access[token] = _AccessToken(expires_at, refresh_token)
        self._refresh[refresh_token].add(token)
        return {
            "access_token": token,
            "token_type": "bearer",
            # OAuth counts whole seconds; a sub-second lifetime still says 1.
            "expires_in": max(1, math.ceil(self.lifetime_s)),
            "refresh_token": refresh_token,
        }

    def client_credentials(self, client_id: str, client_secret: str) -> dict[str, Any]:
        if not (
            secrets.compare_digest(client_id, self.client_id)
            and secrets.compare_digest(client_secret, self.client_secret)
        ):
            raise ApiProblem(401, "auth-invalid-client", "unknown client id or wrong secret")
        refresh_token = secrets.token_urlsafe(24)
        self._refresh[refresh_token] = set()
        self.grants["client_credentials"] += 1
        return self._issue(refresh_token)

    def refresh(self, client_id: str, refresh_token: str) -> dict[str, Any]:
        if client_id != self.client_id or refresh_token not in self._refresh:
            raise ApiProblem(401, "auth-invalid-refresh-token", "refresh token is unknown or was revoked")
        self.grants["refresh_token"] += 1
        return self._issue(refresh_token)

    def revoke(self, refresh_token: str) -> bool:
        """Forget a refresh token and every access token issued with it."""
        access = self._refresh.pop(refresh_token, None)
        if access is None:
            return False
        for token in access:
            self._access.pop(token, None)
        return True

    def valid(self, access_token: str) -> bool:
        entry = self._access.get(access_token)
        return entry is not None and self._clock() < entry.expires_at

    def expire_all(self) -> int:
        """Expire every access token now (refresh tokens stay usable); returns how many were live."""
        now = self._clock()
        live = 0
        for entry in self._access.values():
            if entry.expires_at > now:
                live += 1
                entry.expires_at = now
        return live


# -- helpers -----------------------------------------------------------------------------


def _authorize(request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiProblem(401, "auth-missing-access-token", "send Authorization: bearer <access token>")
    if scheme.lower() != "bearer" or not simulator(request).auth.valid(token.strip()):
        raise ApiProblem(401, "auth-invalid-access-token", "access token is unknown, revoked or expired")


async def _command_body(request: web.Request) -> dict[str, Any]:
    mime = request.content_type
    if mime not in (JSON_MIME, TRANSIT_MIME):
        raise ApiProblem(415, "unsupported-media-type", f"send {JSON_MIME} or {TRANSIT_MIME}, not {mime}")
    raw = await request.read()
    try:
        body = decode(raw, mime) if raw else {}
    except WireFormatError as exc:
        raise ApiProblem(400, "validation-invalid-value", f"body does not parse: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiProblem(400, "validation-invalid-value", "body must be an object")
    return body


def _strict(request: web.Request, params: Mapping[str, str], allowed: list[str]) -> None:
    if simulator(request).config.strict_params:
        query.check_allowed(params, allowed)


def _show(request: web.Request, type_: str) -> web.Response:
    _authorize(request)
    params = query_params(request)
    _strict(request, params, ["id", "include"])
    view = query.parse_view(params, type_)
    store = simulator(request).store
    id_ = query.require_uuid(params, "id")
    entity = store.get(type_, id_)
    if entity is None:
        raise ApiProblem(404, "not-found", f"no {type_} {id_}")
    return answer(request, query.render_document(store, entity, view))


# -- Integration API ---------------------------------------------------------------------


async def marketplace_show(request: web.Request) -> web.Response:
    _authorize(request)
    params = query_params(request)
    _strict(request, params, ["include"])
    view = query.parse_view(params, "marketplace")
    store = simulator(request).store
    return answer(request, query.render_document(store, store.marketplace, view))


async def users_show(request: web.Request) -> web.Response:
    return _show(request, "user")


async def listings_show(request: web.Request) -> web.Response:
    return _show(request, "listing")


async def transactions_show(request: web.Request) -> web.Response:
    return _show(request, "transaction")


async def transactions_query(request: web.Request) -> web.Response:
    _authorize(request)
    sim = simulator(request)
    params = query_params(request)
    _strict(request, params, query.TRANSACTION_QUERY_PARAMS)
    q = query.parse_transaction_query(params)
    view = query.parse_view(params, "transaction")
    page = query.query_transactions(sim.store, q, page_cap=sim.config.page_cap)
    return answer(request, query.render_document(sim.store, page.items, view, meta=page.meta))


async def events_query(request: web.Request) -> web.Response:
    _authorize(request)
    sim = simulator(request)
    params = query_params(request)
    _strict(request, params, [*query.EVENT_QUERY_PARAMS, "include"])
    q = query.parse_events_query(params)
    view = query.parse_view(params, "event")
    events = query.query_events(sim.store, q)
    return answer(request, query.render_document(sim.store, events, view, meta=query.events_meta(q)))


def _command_answer(request: web.Request, expand: bool, entity: Entity, view: View) -> web.Response:
    if expand:
        return answer(request, query.render_document(simulator(request).store, entity, view))
    return answer(request, {"data": {"id": entity.id, "type": entity.TYPE}})


def _command_params(request: web.Request) -> tuple[bool, View]:
    # Validated before the command runs, so a bad parameter never leaves a half-answered change.
    params = query_params(request)
    _strict(request, params, ["expand", "include"])
    expand = query.parse_bool(params.get("expand", "false"), "expand")
    return expand, query.parse_view(params, "transaction")


async def transactions_transition(request: web.Request) -> web.Response:
    _authorize(request)
    sim = simulator(request)
    expand, view = _command_params(request)
    body = await _command_body(request)
    tx_id = query.require_uuid(body, "id", source_type="body")
    name = body.get("transition")
    if not isinstance(name, str) or not name:
        raise ApiProblem(400, "validation-missing-key", "transition is required", source_path=["transition"])
    if not isinstance(body.get("params", {}), dict):
        raise ApiProblem(400, "validation-invalid-value", "params must be an object", source_path=["params"])
    tx = sim.store.transaction(tx_id)
    tr = tx.process.transition(name)
    if tr.actor != "operator":
        raise IllegalTransitionError(
            f"{name} is performed by {tr.actor}; this API only runs operator transitions"
        )
    sim.store.apply_transition(tx.id, name, source="source/integration-api", client_id=sim.config.client_id)
    return _command_answer(request, expand, tx, view)


async def transactions_update_metadata(request: web.Request) -> web.Response:
    _authorize(request)
    sim = simulator(request)
    expand, view = _command_params(request)
    body = await _command_body(request)
    tx_id = query.require_uuid(body, "id", source_type="body")
    if "metadata" not in body:
        raise ApiProblem(400, "validation-missing-key", "metadata is required", source_path=["metadata"])
    metadata = body["metadata"]
    if not isinstance(metadata, dict):
        raise ApiProblem(
            400, "validation-invalid-value", "metadata must be an object", source_path=["metadata"]
        )
    tx = sim.store.transaction(tx_id)
    sim.store.update_metadata(tx.id, metadata, client_id=sim.config.client_id)
    return _command_answer(request, expand, tx, view)


# -- authentication -----------------------------------------------------------------------


async def _form(request: web.Request) -> Mapping[str, str]:
    if request.content_type != FORM_MIME:
        raise ApiProblem(415, "unsupported-media-type", f"send the parameters as {FORM_MIME}")
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _form_field(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise ApiProblem(400, "validation-missing-key", f"{name} is required", source_path=[name])
    return value


async def auth_token(request: web.Request) -> web.Response:
    auth = simulator(request).auth
    form = await _form(request)
    grant = _form_field(form, "grant_type")
    if grant == "client_credentials":
        scope = _form_field(form, "scope")
        if scope != "integ":
            raise ApiProblem(400, "validation-invalid-value", "scope must be integ", source_path=["scope"])
        tokens = auth.client_credentials(_form_field(form, "client_id"), _form_field(form, "client_secret"))
    elif grant == "refresh_token":
        tokens = auth.refresh(_form_field(form, "client_id"), _form_field(form, "refresh_token"))
    else:
        raise ApiProblem(
            400, "validation-invalid-value", f"unsupported grant_type {grant!r}", source_path=["grant_type"]
        )
    return web.json_response(tokens)


async def auth_revoke(request: web.Request) -> web.Response:
    form = await _form(request)
    revoked = simulator(request).auth.revoke(_form_field(form, "token"))
    return web.json_response({"revoked": revoked})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the API's error envelope."""
    try:
        return await handler(request)
    except ApiProblem as p:
        return error_response(
            request, p.status, p.code, details=p.details, source_path=p.source_path, source_type=p.source_type
        )
    except ParamError as p:
        return error_response(
            request, 400, p.code, details=p.details, source_path=[p.param], source_type=p.source_type
        )
    except MissingResourceError as exc:
        return error_response(request, 404, "not-found", details=str(exc))
    except IllegalTransitionError as exc:
        return error_response(request, 409, "transaction-invalid-transition", details=str(exc))
    except (InvalidArgumentError, UnknownProcessError) as exc:
        return error_response(request, 400, "validation-invalid-value", details=str(exc))
    except web.HTTPNotFound:
        return error_response(request, 404, "not-found", details=f"no endpoint {request.path}")
    except web.HTTPMethodNotAllowed:
        return error_response(request, 405, "method-not-allowed", details=f"{request.method} {request.path}")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("simulator failed on %s %s", request.method, request.path)
        return error_response(request, 500, "internal-server-error")


def _date_stamper(clock: Clock) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        # aiohttp writes the host's wall clock into Date unless one is set; a client that
        # estimates the API's clock from Date must see the simulated one instead.
        response.headers[hdrs.DATE] = format_datetime(clock().astimezone(UTC), usegmt=True)

    return stamp


def create_app(sim: Simulator) -> web.Application:
    """A fresh aiohttp application serving ``sim`` (an application can only be run once).

    The ``/_sim/`` routes are listed in :mod:`worker.sim.admin`. Every answer's ``Date``
    header comes from the simulator's clock, not the host's.
    """
    app = web.Application(
        middlewares=[
            sim.stats.middleware,
            error_middleware,
            sim.rate_limiter.middleware,
            sim.fault_injector.middleware,
        ]
    )
    app[SIM_KEY] = sim
    app.on_response_prepare.append(_date_stamper(sim.config.clock))
    app.router.add_post("/v1/auth/token", auth_token)
    app.router.add_post("/v1/auth/revoke", auth_revoke)
    app.router.add_get(f"{API}/marketplace/show", marketplace_show)
    app.router.add_get(f"{API}/users/show", users_show)
    app.router.add_get(f"{API}/listings/show", listings_show)
    app.router.add_get(f"{API}/transactions/show", transactions_show)
    app.router.add_get(f"{API}/transactions/query", transactions_query)
    app.router.add_get(f"{API}/events/query", events_query)
    app.router.add_post(f"{API}/transactions/transition", transactions_transition)
    app.router.add_post(f"{API}/transactions/update_metadata", transactions_update_metadata)
    add_admin_routes(app)
    return app
