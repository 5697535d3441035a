"""Walking ``transactions/query`` to the end of its result, past the API's page cap.

Paging reaches only ``page_cap`` items of a result (the API caps deep paging). A
walk sorted by ``createdAt`` first (the default, newest first, or ``-createdAt``)
goes on past the cap in windows: the next window ends (or, oldest first, starts)
at the ``createdAt`` read last, so a result of any size comes whole and in order.

Why nothing is lost or read twice:

* ``createdAtStart`` is inclusive, ``createdAtEnd`` exclusive, and times have
  millisecond precision. The next window takes in the boundary's millisecond
  again, and the ids already read there are skipped: every transaction of that
  millisecond is read once, however the cap cut through it.
* ``createdAt`` never changes. Under a newest-first sort a transaction created
  during the walk enters at the head and pushes the rest back, so an item may
  show up again on the next page: it is older than nothing read yet, so anything
  newer than the boundary, or read at it, is skipped. Oldest first, new ones come
  at the end and push nothing. (A deletion in pages already read would pull one
  forward past us; offset paging cannot see that.)
* A window in which nothing new is reachable holds only the boundary's
  millisecond. It is counted: read whole, the walk goes on past it; bigger than
  paging reaches, it raises :class:`~worker.errors.PagingLimitError`.
* Under any other sort windows would break the order, so a result that runs into
  the cap raises :class:`~worker.errors.PagingLimitError` (before anything is
  yielded when ``totalItems`` tells): never a silent stop.

Memory stays flat: one page, and the ids read at the current boundary.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Literal, Protocol, Unpack
from uuid import UUID

from worker.api import wire
from worker.api.models import Page, RejectedItem, Transaction
from worker.api.params import Names, TransactionFilters
from worker.errors import PagingLimitError

__all__ = ["TransactionPages", "walk_transactions"]

logger = logging.getLogger(__name__)

_ONE_MS = timedelta(milliseconds=1)


class TransactionPages(Protocol):
    """The part of :class:`~worker.api.client.IntegrationClient` a walk uses."""

    async def transactions_query(
        self,
        *,
        page: int | None = None,
        per_page: int | None = None,
        **filters: Unpack[TransactionFilters],
    ) -> Page[Transaction]: ...


async def walk_transactions(
    api: TransactionPages,
    filters: TransactionFilters,
    *,
    per_page: int,
    page_cap: int,
    on_rejected: Callable[[RejectedItem], None] | None = None,
) -> AsyncIterator[Transaction]:
    """Every transaction matching ``filters``, each once, in the order asked (see the module doc).

    ``page_cap`` is how far this client pages before it turns to windows; a server
    that cuts earlier (a short page while ``totalItems`` counts more) is followed
    too. Items that cannot be read go to ``on_rejected`` (default: logged), each once.
    """
    direction = _created_at_direction(filters.get("sort"))
    user_start, user_end = filters.get("created_at_start"), filters.get("created_at_end")
    window = filters.copy()
    # Past the first window: the createdAt read last, and the ids read at that millisecond.
    boundary: datetime | None = None
    at_boundary: set[UUID] = set()
    reported: set[str] = set()
    while True:
        page, reached, fresh = 1, 0, False
        while True:
            result = await api.transactions_query(page=page, per_page=per_page, **window)
            if page == 1 and boundary is None and direction is None:
                total = result.meta.total_items
                if total is not None and total > page_cap:
                    raise _too_deep(filters, total, page_cap)
            for item in result.rejected:
                if item.id is None or item.id not in reported:
                    reported.add(item.id or "")
                    (on_rejected or _log_rejected)(item)
            for tx in result.data:
                created_at = tx.attributes.created_at
                if direction is not None and boundary is not None:
                    behind = created_at > boundary if direction == "desc" else created_at < boundary
                    if behind or tx.id in at_boundary:
                        continue  # read already (in an earlier window, or before a shift)
                if created_at != boundary:
                    boundary, at_boundary = created_at, set()
                at_boundary.add(tx.id)
                fresh = True
                yield tx
            reached += result.received
            # The server's page size wins: a server that caps perPage must not end the walk early.
            page_size = result.meta.per_page or per_page
            total = result.meta.total_items
            short = result.received < page_size
            if short or (result.meta.total_pages is not None and page >= result.meta.total_pages):
                # Short because the results ended, or cut at the server's own cap.
                capped = total is not None and reached < total
                break
            if page * page_size >= page_cap:
                capped = total is None or reached < total
                break
            page += 1
        if not capped:
            return
        if direction is None or boundary is None:
            raise _too_deep(filters, total, page_cap)
        # The next window starts at the boundary's millisecond again, its ids skipped:
        # createdAtStart is inclusive, createdAtEnd exclusive, times are milliseconds.
        # A window with nothing new in reach is all that one millisecond: if all of it
        # was read, the walk goes on past it, else it cannot.
        beyond = False
        if not fresh:
            group = filters.copy()
            group["created_at_start"], group["created_at_end"] = boundary, boundary + _ONE_MS
            count = (await api.transactions_query(page=1, per_page=1, **group)).meta.total_items
            if count is None or count > len(at_boundary):
                raise PagingLimitError(
                    f"more transactions were created at {wire.format_time(boundary)} than paging reaches"
                )
            beyond = True
        if direction == "desc":
            end = boundary if beyond else boundary + _ONE_MS
            window["created_at_end"] = end if user_end is None else min(user_end, end)
        else:
            start = boundary + _ONE_MS if beyond else boundary
            window["created_at_start"] = start if user_start is None else max(user_start, start)


def _too_deep(filters: TransactionFilters, total: int | None, page_cap: int) -> PagingLimitError:
    matched = f"{total} transactions" if total is not None else "more transactions than that"
    return PagingLimitError(
        f"the query matches {matched}, but paging reaches only {page_cap}, and only a "
        f"walk sorted by createdAt can go on past that (sort={filters.get('sort')!r}): "
        "sort by createdAt or narrow it with created_at_start/created_at_end"
    )


def _created_at_direction(sort: Names | None) -> Literal["desc", "asc"] | None:
    """Which way a sort runs over ``createdAt`` if that is its first key; None if it is not."""
    parts = [sort] if isinstance(sort, str) else list(sort or [])
    keys = [key.strip() for part in parts for key in part.split(",") if key.strip()]
    if not keys or keys[0] == "createdAt":
        return "desc"  # the API's default; a bare key sorts newest first
    if keys[0] == "-createdAt":
        return "asc"
    return None


def _log_rejected(item: RejectedItem) -> None:
    logger.warning("transaction walk: item %s set aside: %s", item.id or "(no id)", item.reason)
