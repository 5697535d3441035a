"""Running handlers on queued events: inline delivery, retries, order, idempotency, dead letters.

- :mod:`~worker.deliver.runner` — the arq job functions, :class:`FlexWorker`, the heartbeat
- :mod:`~worker.deliver.delivery` — :class:`Delivery`: the event job and the handler job, and the
  delivery's state machine (in its docstring)
- :mod:`~worker.deliver.scripts` — the claim and settle scripts every state change goes through
- :mod:`~worker.deliver.roster` — which handlers the live workers run (rolling deploys)
- :mod:`~worker.deliver.idempotency` — :class:`DeliveryRecords`: records, replay resets, ``ctx.step``
- :mod:`~worker.deliver.failures` — what a handler's exception means (transient or permanent)
- :mod:`~worker.deliver.dlq` — :class:`DeadLetters`: the dead-letter queue and its reporting

It takes events from :mod:`worker.queue` and runs the handlers :mod:`worker.registry` loaded;
it never imports :mod:`worker.poll`, :mod:`worker.ops` or the entry points. The package
re-exports nothing.
"""

__all__: list[str] = []
