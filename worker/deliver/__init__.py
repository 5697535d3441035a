"""Running handlers on queued events: fan-out, retries, order, idempotency, dead letters.

- :mod:`~worker.deliver.runner` — the arq job functions and :func:`build_worker`
- :mod:`~worker.deliver.delivery` — :class:`Delivery`: the fan-out, and one (event, handler) job
  from claim to settle
- :mod:`~worker.deliver.idempotency` — :class:`DeliveryRecords`: claims, done records, ``ctx.step``
- :mod:`~worker.deliver.failures` — what a handler's exception means (transient or permanent)
- :mod:`~worker.deliver.dlq` — :class:`DeadLetters`: the dead-letter queue and its reporting

It takes events from :mod:`worker.queue` and runs the handlers :mod:`worker.registry` loaded;
it never imports :mod:`worker.poll`, :mod:`worker.ops` or the entry points. The package
re-exports nothing.
"""

__all__: list[str] = []
