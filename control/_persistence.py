"""
The configuration service: the one place that changes the desired configuration.

Changes are validated against the latest accepted configuration (``pending``) on the
reactor thread, then written to the store; a change is acknowledged, and becomes visible to
readers (``committed``), only once the store made it durable. Leases run out on the
reactor's clock; after a restart every lease gets a grace period so that its holder can
renew it before it expires.

The service also keeps the store revision of ``committed`` and the store's id, so that a
reader (the agent channel, later) can ask the store what changed since then.

Deleted datasets are kept for ``retention`` seconds (``Dataset.retained_until``, stored
like every other field, so a restart loses nothing); the same clock that expires leases
lets their data go once that time passes, from an index of the retained datasets kept up
to date with every change (O(change), never a scan of the cluster).
"""

from __future__ import annotations

import secrets
from typing import Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.common._logging import log_event
from pyflock.common._model import Configuration
from pyflock.control._store import (
    HistoryGone, IConfigurationStore, StoreError, StoreSnapshot, StoreWrite,
)

#: After a restart, no lease expires sooner than this: a full renewal interval (20 s,
#: DESIGN.md) plus time for agents to reconnect.
DEFAULT_LEASE_RESTART_GRACE = 30.0

#: How long a deleted dataset's data is kept, restorable, unless told (one hour).
DEFAULT_RETENTION = 3600.0

#: Seconds between attempts to reload the store after a failed write.
RECOVERY_RETRY = 1.0

Listener = Callable[[Configuration, Optional[tuple[str, ...]]], None]

_log = Logger()


class StoreUnavailable(Exception):
    """The store failed a write; changes are refused until the state is reloaded."""


class ConfigurationService:
    """
    Holds the desired configuration and applies changes to it durably.

    ``committed`` is what readers see: every change in it is durable; ``revision`` is the
    store revision it was committed at, in the store ``store_id`` (see ``StoreSnapshot``).
    ``pending`` also holds accepted changes still being written; new changes are
    validated against it so that, say, two concurrent creates of one name cannot both
    succeed.
    """

    def __init__(self, store: IConfigurationStore, reactor: IReactorTime,
                 config: Configuration, revision: int = 0, store_id: str = "",
                 retention: float = DEFAULT_RETENTION):
        self._store = store
        self.retention = retention
        self._retained = _index_retained({}, config, config.datasets)
        self._reactor = reactor
        self.committed = config
        self.pending = config
        self.revision = revision
        self.store_id = store_id
        self._in_flight = 0
        # The Deferreds waiting for the latest write to be durable (changes that found
        # nothing left to do).
        self._latest: list[Deferred] = []
        self._broken: Optional[str] = None
        self._listeners: list[Listener] = []
        self._expiry: Optional[LoopingCall] = None
        self._retry: Optional[IDelayedCall] = None
        self._stopped = False
        self._epoch = secrets.token_hex(4)

    @classmethod
    def load(cls, store: IConfigurationStore, reactor: IReactorTime,
             lease_grace: float = DEFAULT_LEASE_RESTART_GRACE,
             retention: float = DEFAULT_RETENTION) -> Deferred:
        """Read the stored configuration; fires with a service ready to take changes,
        keeping deleted datasets for ``retention`` seconds (0: not at all)."""
        def loaded(snapshot: StoreSnapshot) -> "ConfigurationService":
            config = _extend_leases(snapshot.configuration, reactor.seconds() + lease_grace)
            return cls(store, reactor, config, snapshot.revision, snapshot.store_id,
                       retention)
        return store.load().addCallback(loaded)

    @property
    def tag(self) -> str:
        """
        The configuration tag readers see: the committed generation, prefixed with a
        value drawn at start, so that a tag from before a restart (or a restored backup,
        whose generations repeat) never matches. O(1).
        """
        return f"{self._epoch}-{self.committed.generation}"

    @property
    def pending_tag(self) -> str:
        """The tag of the latest accepted configuration, for compare-and-swap."""
        return f"{self._epoch}-{self.pending.generation}"

    def now(self) -> float:
        """The current time on the service's clock."""
        return self._reactor.seconds()

    def retain_until(self, purge: bool = False) -> Optional[float]:
        """Until when a dataset deleted now keeps its data: None if ``purge`` or if the
        retention is 0 (its data goes at once)."""
        if purge or self.retention <= 0:
            return None
        return self.now() + self.retention

    def subscribe(self, listener: Listener) -> None:
        """
        Call ``listener(config, dataset_ids)`` with every newly committed configuration
        and the ids of the datasets (or their leases) that the change touched; after a
        recovery from a store failure ``dataset_ids`` is ``None``: anything may have changed.
        ``revision`` is already the new one when it is called. A listener that raises is
        logged; the change stays committed and the other listeners are still called.
        """
        self._listeners.append(listener)

    def changes_since(self, revision: int) -> Deferred:
        """
        What the store changed after ``revision`` (a ``StoreChanges``), or a failure with
        ``HistoryGone``: then read ``committed`` instead.
        """
        return self._store.changes_since(revision)

    def _notify(self, dataset_ids: Optional[tuple[str, ...]]) -> None:
        for listener in self._listeners:
            try:
                listener(self.committed, dataset_ids)
            except Exception:
                failure = Failure()
                log_event(_log, "pyflock:control:listener-failed", LogLevel.error,
                          listener=repr(listener), reason=failure.getErrorMessage(),
                          traceback=failure.getTraceback())

    def change(self, dataset_ids: Iterable[str],
               transform: Callable[[Configuration], Configuration]) -> Deferred:
        """
        Apply ``transform`` to the pending configuration and store the rows of
        ``dataset_ids``; fires with the new configuration once durable. ``transform`` may
        raise a ``ConfigurationError``, which propagates synchronously (nothing changed).
        A change that changes nothing fires once the changes before it are durable.
        """
        if self._broken is not None:
            return fail(StoreUnavailable(self._broken))
        new = transform(self.pending)
        if new is self.pending:
            if self._in_flight == 0:
                return succeed(new)
            # What it found is not durable yet: answer when it is (a repeated DELETE
            # must not be acknowledged while the first one's write may still fail).
            waiting: Deferred = Deferred()
            self._latest.append(waiting)
            return waiting
        self.pending = new
        self._in_flight += 1
        self._latest = []
        write = StoreWrite.of(new, dataset_ids)
        _index_retained(self._retained, new, (i for i, _ in write.datasets))
        d = self._store.write(write)
        d.addBoth(self._written, new, tuple(i for i, _ in write.datasets), self._latest)
        return d

    def _written(self, result, config: Configuration, touched: tuple[str, ...],
                 waiting: list[Deferred]):
        self._in_flight -= 1
        outcome = self._settle(result, config, touched)
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        return outcome

    def _settle(self, result, config: Configuration, touched: tuple[str, ...]):
        """Commit ``config`` written at revision ``result``, or fail; the outcome."""
        # Once a write failed, the writes accepted after it were built on it: whatever
        # the store did with them, answer them as failed (their outcome is unknown to
        # the client) and let the reload from the store decide what is true.
        if isinstance(result, Failure) or self._broken is not None:
            if self._broken is None:
                self._broken = f"configuration store write failed: {result.value}"
                log_event(_log, "pyflock:control:store-write-failed", LogLevel.error,
                          reason=str(result.value))
            error = StoreUnavailable(self._broken)
            if self._in_flight == 0:
                self._recover()
            return Failure(error)
        # The store completes writes in submission order, so the latest is the newest.
        self.committed = config
        self.revision = result
        self._notify(touched)
        return config

    def _recover(self) -> None:
        """Reload from the store, the truth after a failed write, skipping a generation."""
        self._retry = None
        if self._stopped:
            return

        def reloaded(snapshot: StoreSnapshot):
            config = snapshot.configuration
            config = config.set(generation=config.generation + 1)
            d = self._store.write(StoreWrite(generation=config.generation))

            def done(revision: int):
                self.committed = self.pending = config
                self._retained = _index_retained({}, config, config.datasets)
                self.revision, self.store_id = revision, snapshot.store_id
                self._broken = None
                self._notify(None)
                log_event(_log, "pyflock:control:store-recovered",
                          generation=config.generation)
            return d.addCallback(done)

        def still_broken(failure):
            log_event(_log, "pyflock:control:store-recovery-failed", LogLevel.error,
                      reason=str(failure.value))
            if not self._stopped:
                self._retry = self._reactor.callLater(RECOVERY_RETRY, self._recover)
        self._store.load().addCallback(reloaded).addErrback(still_broken)

    def expire_leases(self) -> Deferred:
        """Drop the leases that have run out, durably."""
        now = self.now()
        expired = [k for k, lease in self.pending.leases.items() if lease.expired(now)]
        if not expired:
            return succeed(self.pending)
        for dataset_id in expired:
            lease = self.pending.leases[dataset_id]
            log_event(_log, "pyflock:control:lease-expired", dataset_id=dataset_id,
                      node_uuid=lease.node_uuid)
        return self.change(expired, lambda c: c.expire_leases(now))

    def release_retained(self) -> Deferred:
        """Let the data of the deleted datasets whose retention is over go, durably."""
        now = self.now()
        due = [i for i, until in self._retained.items() if until <= now]
        if not due:
            return succeed(self.pending)
        for dataset_id in due:
            log_event(_log, "pyflock:control:dataset-retention-over", dataset_id=dataset_id)
        return self.change(due, lambda c: c.release_retained(due, now))

    def _expire(self) -> None:
        self.expire_leases().addErrback(
            lambda f: log_event(_log, "pyflock:control:lease-expiry-failed", LogLevel.warn,
                                reason=str(f.value)))
        self.release_retained().addErrback(
            lambda f: log_event(_log, "pyflock:control:retention-expiry-failed",
                                LogLevel.warn, reason=str(f.value)))

    def start_lease_expiry(self, interval: float = 1.0) -> None:
        """Expire leases, and the retention of deleted datasets, every ``interval``
        seconds until ``stop``."""
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = self._reactor
        self._expiry.start(interval, now=False)

    def stop(self) -> Deferred:
        """Stop expiring leases and retrying a failed store, and close the store."""
        self._stopped = True
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return self._store.close()


def _index_retained(index: dict, config: Configuration, dataset_ids: Iterable[str]) -> dict:
    """``index`` (dataset id -> until when its deleted data is kept) brought up to date
    with ``config`` for ``dataset_ids``, in place."""
    for dataset_id in dataset_ids:
        dataset = config.datasets.get(dataset_id)
        if dataset is not None and dataset.retained_until is not None:
            index[dataset_id] = dataset.retained_until
        else:
            index.pop(dataset_id, None)
    return index


def _extend_leases(config: Configuration, earliest: float) -> Configuration:
    """Push every expiring lease's expiration to at least ``earliest``."""
    leases = config.leases.evolver()
    for dataset_id, lease in config.leases.items():
        if lease.expiration is not None and lease.expiration < earliest:
            leases[dataset_id] = attr.evolve(lease, expiration=earliest)
    return config.set(leases=leases.persistent())


__all__ = ["ConfigurationService", "StoreUnavailable", "StoreError", "HistoryGone",
           "DEFAULT_LEASE_RESTART_GRACE", "DEFAULT_RETENTION"]
