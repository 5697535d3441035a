"""The Redis data model between the poller and the worker.

- :mod:`~worker.queue.enqueue` — :class:`EventQueue`: each event on the arq queue once
- :mod:`~worker.queue.ordering` — :class:`Ordering`: per-transaction order, the job ids and Lua scripts
  both sides share
- :mod:`~worker.queue.keys` — :class:`Keys`: every key the service keeps in Redis, in one table
  (the poller's cursors and lease included, so the whole layout reads in one place)

Both sides import this folder and it imports neither: it knows events and keys, not how events
were found or what handlers do with them. The package re-exports nothing.
"""

__all__: list[str] = []
