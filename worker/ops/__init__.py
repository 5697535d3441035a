"""Running and watching the service.

- :mod:`~worker.ops.status` — what ``flexworker status`` reports
- :mod:`~worker.ops.logs` — log set-up
- :mod:`~worker.ops.redis_server` — a private ``redis-server`` for the demo and the tests

It may read every other room's state; none of them imports it. The package re-exports nothing.
"""

__all__: list[str] = []
