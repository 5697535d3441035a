"""Finding transitions and moving the cursor: the poll side of the service.

- :mod:`~worker.poll.poller` — :class:`Poller`: runs a source's cycles under the lease, moves the cursor
- :mod:`~worker.poll.sources` — the :class:`Source` protocol and its two kinds, ``transactions`` and
  ``events``
- :mod:`~worker.poll.cursor` — :class:`CursorStore`: where each source left off
- :mod:`~worker.poll.lease` — :class:`Lease`: one poller per namespace, with fencing tokens

It reads through :mod:`worker.api` and hands events to :mod:`worker.queue`; it never imports
:mod:`worker.deliver`, :mod:`worker.ops` or the entry points. The package re-exports nothing.
"""

__all__: list[str] = []
