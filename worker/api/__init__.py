"""Talking to the Sharetribe Integration API: the first room data passes through.

- :mod:`~worker.api.client` — :class:`IntegrationClient`, every call the product makes, paced and retried
- :mod:`~worker.api.params` — query parameters: :class:`TransactionFilters` and their encoding
- :mod:`~worker.api.walk` — a transactions query walked to its end, past the API's page cap
- :mod:`~worker.api.auth` — :class:`TokenManager`: access tokens cached, renewed, recovered after a 401
- :mod:`~worker.api.models` — typed views of the resources the API returns (:class:`Transaction`, …)
- :mod:`~worker.api.wire` — JSON and Transit, both ways
- :mod:`~worker.api.ratelimit` — token buckets with the official SDK's presets
- :mod:`~worker.api.backoff` — exponential backoff with full jitter, shared with the handler framework

Nothing here knows about polling, queues or handlers: this folder imports only
:mod:`worker.errors` of the rest of the package (``tests/test_layout.py`` checks).
The package re-exports nothing; import from the modules.
"""

__all__: list[str] = []
