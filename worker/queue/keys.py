"""Where the service keeps its state in Redis, in one place.

Every key is under the namespace prefix ``P = flexworker:<namespace>``:

=================================  ======  ==========================================================
``P:cursor:<source>``              string  where the source left off: watermark (ms) or sequence id
                                           (:mod:`worker.poll.cursor`)
``P:cursor:<source>:floor``        string  the start floor the source fixed when it began (ms)
``P:cursor:<source>:state``        hash    the rest of a source's progress: ``generation`` (bumped
                                           by ``flexworker cursor set``), ``previous`` (the last
                                           finished cycle's threshold, ms), ``resume`` (JSON: the
                                           cycle in progress), ``at`` (ms the source has read up to)
``P:lease:poller``                 string  the polling replica's fencing token, with a TTL
                                           (:mod:`worker.poll.lease`)
``P:lease:poller:fence``           string  the fencing token counter (``INCR``)
``P:skipped``                      hash    items a source could not turn into events, by
                                           ``<source>:<type>:<id>`` -> JSON (:mod:`worker.poll.skipped`)
``P:skipped:index``                zset    the same ids scored by when they were last seen (ms)
``P:stats:poll``                   hash    poll counters: ``skipped``
``P:seen:<event key>``             string  the queue saw this event (``FLEXWORKER_SEEN_RETENTION_S``)
``P:order:<transaction id>``       zset    events queued whose event job has not settled: event job
                                           id scored by transition index (no expiry)
``P:pending:<handler>:<tx id>``    zset    a handler's deliveries of a transaction waiting in handler
                                           jobs: handler job id scored by transition index (no
                                           expiry)
``P:deferred``                     zset    handler jobs deferred for a retry, scored by the retry
                                           time (ms): never woken early
``P:handlers``                     hash    handler name -> JSON (transitions, processes, ``at_ms``):
                                           the handlers live workers run (:mod:`worker.deliver.roster`)
``P:delivery:<handler>:<event>``   hash    one handler's record of one event: ``status`` (done /
                                           dead), ``attempts``, ``first_attempt_at``, ``settled_at``,
                                           ``run`` (the claiming run's token), ``settled_by`` (the
                                           job that settled it), ``retry_at`` (ms), ``error:<n>`` per
                                           failed attempt, ``step:<name>`` per step; expires
                                           ``FLEXWORKER_IDEMPOTENCY_RETENTION_S`` after the last
                                           write, kept while dead-lettered
``P:claim:<handler>:<event>``      string  the running attempt's token; expires with its lease
``P:stats:handler:<handler>``      hash    counters: done, retried, dead_lettered, skipped
``P:dlq``                          hash    dead letter id -> JSON record
``P:dlq:index``                    zset    dead letter id scored by dead-lettered time (ms)
=================================  ======  ==========================================================

Who writes them: cursors and the lease, :mod:`worker.poll`; seen, order and pending,
:mod:`worker.queue.enqueue` and :mod:`worker.queue.ordering`; delivery records,
claims and counters, :mod:`worker.deliver.scripts`; the handler roster,
:mod:`worker.deliver.roster`; dead letters, :mod:`worker.deliver.dlq`.

arq's own keys (``arq:job:<id>``, ``arq:result:<id>``, the queue ``P:queue``) are
arq's; the delivery core only writes them in arq's format when it enqueues.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """The key names of one namespace."""

    prefix: str

    def cursor(self, source: str) -> str:
        return f"{self.prefix}:cursor:{source}"

    def cursor_floor(self, source: str) -> str:
        return f"{self.prefix}:cursor:{source}:floor"

    def cursor_state(self, source: str) -> str:
        return f"{self.prefix}:cursor:{source}:state"

    @property
    def poller_lease(self) -> str:
        return f"{self.prefix}:lease:poller"

    @property
    def skipped(self) -> str:
        return f"{self.prefix}:skipped"

    @property
    def skipped_index(self) -> str:
        return f"{self.prefix}:skipped:index"

    @property
    def poll_stats(self) -> str:
        return f"{self.prefix}:stats:poll"

    def seen(self, event_key: str) -> str:
        return f"{self.prefix}:seen:{event_key}"

    def order(self, transaction_id: object) -> str:
        return f"{self.prefix}:order:{transaction_id}"

    def pending(self, handler: str, transaction_id: object) -> str:
        return f"{self.prefix}:pending:{handler}:{transaction_id}"

    @property
    def deferred(self) -> str:
        return f"{self.prefix}:deferred"

    @property
    def handlers(self) -> str:
        return f"{self.prefix}:handlers"

    def delivery(self, handler: str, event_key: str) -> str:
        return f"{self.prefix}:delivery:{handler}:{event_key}"

    def claim(self, handler: str, event_key: str) -> str:
        return f"{self.prefix}:claim:{handler}:{event_key}"

    def stats(self, handler: str) -> str:
        return f"{self.prefix}:stats:handler:{handler}"

    @property
    def stats_pattern(self) -> str:
        return f"{self.prefix}:stats:handler:*"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def dlq_index(self) -> str:
        return f"{self.prefix}:dlq:index"
