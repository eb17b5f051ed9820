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

Timed work (lease expiry, the end of retention) runs only once ``leader`` has led for the
lease grace (``_election``; on SQLite, ``SOLE_LEADER``: always, from the start), and its
writes carry the leader's fence: a write the store refuses for
it (``Fenced``) wrote nothing; the service steps down and reloads.

On a store that other replicas write too (etcd, ``catch_up``), the service follows it
(``_Following``; the watch in ``_etcd_watch`` calls ``notice``): between its own writes it
applies what the others wrote and tells its listeners as after its own changes; a write
the store refuses because another replica wrote first (``StoreConflict``) is applied
again, transform and tag check included, on the configuration that replica left.
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
from pyflock.control._election import SOLE_LEADER
from pyflock.control._store import (
    Fenced, HistoryGone, IConfigurationStore, StoreConflict, StoreError, StoreSnapshot,
    StoreWrite, apply_write,
)

#: After a restart, no lease expires sooner than this: a full renewal interval (20 s,
#: DESIGN.md) plus time for agents to reconnect.
DEFAULT_LEASE_RESTART_GRACE = 30.0

#: How long a deleted dataset's data is kept, restorable, unless told (one hour).
DEFAULT_RETENTION = 3600.0

#: Seconds between attempts to reload the store after a failed write.
RECOVERY_RETRY = 1.0

#: Seconds during which a change that other writers beat is applied again on a shared
#: store (under steady writes through two replicas a change may lose many rounds in a
#: row: each of them is one transaction of the other replica's).
REBASE_TIMEOUT = 10.0

Listener = Callable[[Configuration, Optional[tuple[str, ...]]], None]

_log = Logger()


class StoreUnavailable(Exception):
    """The store failed a write; changes are refused until the state is reloaded."""


class TagMismatch(Exception):
    """The configuration changed since the tag a change was made on."""

    def __init__(self, expected: str):
        super().__init__(f"the configuration tag is no longer {expected!r}")
        self.expected = expected


@attr.s(auto_attribs=True, eq=False)
class _Change:
    """One requested change: what it touches, its transform, the tag it needs, and who
    waits for it (``done``, and no-op changes that found it in flight)."""

    dataset_ids: tuple[str, ...]
    transform: Callable[[Configuration], Configuration]
    expected_tag: Optional[str] = None
    done: Deferred = attr.Factory(Deferred)
    waiters: list = attr.Factory(list)
    attempts: int = 0
    started: float = 0.0
    fence: object = None

    def finish(self, outcome) -> None:
        """Fire ``done`` and the waiters with ``outcome`` (a configuration or a Failure)."""
        for change in [self] + self.waiters:
            if isinstance(outcome, Failure):
                change.done.errback(outcome)
            else:
                change.done.callback(outcome)


class _Following:
    """
    The part of ``ConfigurationService`` that follows a store other replicas write (etcd):
    it catches up with their writes (``notice``, ``reload``), between its own, and refuses
    changes while the store may not see the latest writes (``unhealthy``).
    """

    def tag_may_match(self, expected: str) -> bool:
        """Whether a change made on tag ``expected`` may be accepted (then ``change``
        decides); False when it is surely outdated."""
        return expected == self.pending_tag or self._newer_tag(expected)

    def _newer_tag(self, expected: str) -> bool:
        """Whether ``expected`` is a tag of this shared store newer than ours."""
        store_id, _, revision = expected.rpartition("-")
        return (self._follows and store_id == self.store_id and revision.isdigit()
                and int(revision) > self._tag_revision)

    def follow_with(self, follower) -> None:
        """Keep the configuration current with ``follower`` (stopped with the service)."""
        self._follower = follower

    def notice(self, revision: int) -> None:
        """Another writer may have written up to store ``revision``: catch up with it."""
        if revision > self._seen:
            self._seen = revision
        self._maybe_sync()

    def reload(self) -> None:
        """Read the whole configuration again (the change feed cannot tell what changed)."""
        self._reload_wanted = True
        self._maybe_sync()

    def healthy(self) -> None:
        """The store answers: take changes again (after catching up)."""
        if self._unhealthy is not None:
            log_event(_log, "pyflock:control:store-healthy")
            self._unhealthy = None
            self._reload_wanted = True
            self._maybe_sync()

    def unhealthy(self, reason: str) -> None:
        """The store may not see the latest writes: refuse changes until ``healthy``."""
        if self._unhealthy is None:
            log_event(_log, "pyflock:control:store-unhealthy", LogLevel.warn, reason=reason)
        self._unhealthy = reason

    def _maybe_sync(self) -> None:
        """Catch up with other writers once no write of ours is in flight."""
        if (self._syncing or self._in_flight or self._broken is not None or self._stopped
                or not self._follows):
            return
        if not (self._reload_wanted or self._catch_up_wanted or self._rebasing
                or self._seen > self.revision):
            return
        self._syncing = True
        full, self._reload_wanted, self._catch_up_wanted = self._reload_wanted, False, False
        d = self._store.load() if full else self._store.catch_up(self.revision)
        d.addCallbacks(self._caught_up, self._sync_failed)

    def _caught_up(self, result) -> None:
        if isinstance(result, StoreSnapshot):
            config, touched = result.configuration, None
        else:
            change = result.change
            config = apply_write(self.committed, change)
            touched = tuple(dict.fromkeys([i for i, _ in change.datasets]
                                          + [i for i, _ in change.leases]))
        changed = result.revision != self.revision or touched is None
        self.committed = self.pending = config
        if touched is None:
            self._retained = _index_retained({}, config, config.datasets)
        else:
            _index_retained(self._retained, config, touched)
        self.revision, self.store_id = result.revision, result.store_id
        self._learn_tag()
        self._syncing = False
        if changed:
            self._notify(touched)
        self._rebasing = False
        waiting, self._retrying, self._held = self._retrying + self._held, [], []
        for request in waiting:
            if self._syncing or self._rebasing:
                self._held.append(request)
                continue
            try:
                self._submit(request)
            except Exception:
                request.finish(Failure())
        self._maybe_sync()

    def _sync_failed(self, failure: Failure) -> None:
        self._syncing = False
        if failure.check(HistoryGone):
            self._reload_wanted = True
            return self._maybe_sync()
        if self._broken is None:
            self._broken = f"configuration store read failed: {failure.value}"
            log_event(_log, "pyflock:control:store-read-failed", LogLevel.error,
                      reason=str(failure.value))
        self._rebasing = False
        self._fail_waiting(StoreUnavailable(self._broken))
        self._recover()

    def _fail_waiting(self, error: Exception) -> None:
        """Fail every change held for a catch-up."""
        waiting, self._retrying, self._held = self._retrying + self._held, [], []
        self._rebasing = False
        for request in waiting:
            request.finish(Failure(error))

    def _learn_tag(self) -> None:
        self._tag_revision = getattr(self._store, "tag_revision", 0)


class ConfigurationService(_Following):
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
                 retention: float = DEFAULT_RETENTION,
                 lease_grace: float = DEFAULT_LEASE_RESTART_GRACE):
        self._store = store
        self.retention = retention
        self.lease_grace = lease_grace
        # Who runs the timed work (``lead_with``); alone, this service always leads.
        self.leader = SOLE_LEADER
        self._retained = _index_retained({}, config, config.datasets)
        self._reactor = reactor
        self.committed = config
        self.pending = config
        self.revision = revision
        self.store_id = store_id
        self._in_flight = 0
        # The Deferreds waiting for the latest write to be durable (changes that found
        # nothing left to do).
        self._latest: list[_Change] = []
        self._broken: Optional[str] = None
        self._listeners: list[Listener] = []
        self._expiry: Optional[LoopingCall] = None
        self._retry: Optional[IDelayedCall] = None
        self._stopped = False
        self._epoch = secrets.token_hex(4)
        # Following a store other replicas write (etcd): see ``notice``.
        self._follows = hasattr(store, "catch_up")
        self._follower = None
        self._seen = revision
        self._syncing = False
        self._rebasing = False
        self._reload_wanted = False
        self._catch_up_wanted = False
        self._unhealthy: Optional[str] = None
        self._retrying: list[_Change] = []
        self._held: list[_Change] = []
        self._tag_revision = getattr(store, "tag_revision", 0)

    @classmethod
    def load(cls, store: IConfigurationStore, reactor: IReactorTime,
             lease_grace: float = DEFAULT_LEASE_RESTART_GRACE,
             retention: float = DEFAULT_RETENTION) -> Deferred:
        """Read the stored configuration; fires with a service ready to take changes,
        keeping deleted datasets for ``retention`` seconds (0: not at all)."""
        def loaded(snapshot: StoreSnapshot) -> "ConfigurationService":
            config = _extend_leases(snapshot.configuration, reactor.seconds() + lease_grace)
            return cls(store, reactor, config, snapshot.revision, snapshot.store_id,
                       retention, lease_grace)
        return store.load().addCallback(loaded)

    @property
    def tag(self) -> str:
        """
        The configuration tag readers see: the committed generation, prefixed with a
        value drawn at start, so that a tag from before a restart (or a restored backup,
        whose generations repeat) never matches. On a shared store (etcd) it is the store
        id and the etcd revision of the last dataset change, the same on every replica
        and across restarts. O(1).
        """
        if self._follows:
            return f"{self.store_id}-{self._tag_revision}"
        return f"{self._epoch}-{self.committed.generation}"

    @property
    def pending_tag(self) -> str:
        """The tag of the latest accepted configuration, for compare-and-swap."""
        if self._follows:
            if self.pending.generation == self.committed.generation:
                return self.tag
            return f"{self.store_id}-pending-{self.pending.generation}"
        return f"{self._epoch}-{self.pending.generation}"

    def lead_with(self, leader) -> None:
        """Run the timed work only while ``leader`` (an ``EtcdLeadership``) leads, with
        its fence; the store prunes only then too."""
        self.leader = leader
        if hasattr(self._store, "leadership"):
            self._store.leadership = leader

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
               transform: Callable[[Configuration], Configuration],
               expected_tag: Optional[str] = None, fence: object = None) -> Deferred:
        """
        Apply ``transform`` to the pending configuration and store the rows of
        ``dataset_ids``; fires with the new configuration once durable. ``transform`` may
        raise a ``ConfigurationError``, which propagates synchronously (nothing changed).
        With ``expected_tag``, a pending configuration of another tag raises
        ``TagMismatch``. A change that changes nothing fires once the changes before it
        are durable. On a shared store, a change that another writer beat is applied
        again on the configuration that writer left (for ``REBASE_TIMEOUT`` at most), so
        its Deferred may also fail with those errors. A leader-only change carries the
        leader's ``fence``; it fails with ``Fenced`` when the store refuses it for that.
        """
        if self._broken is not None:
            return fail(StoreUnavailable(self._broken))
        if self._unhealthy is not None:
            return fail(StoreUnavailable(self._unhealthy))
        request = _Change(tuple(dataset_ids), transform, expected_tag, started=self.now(),
                          fence=fence)
        if self._syncing or self._rebasing:
            self._held.append(request)
        elif expected_tag is not None and expected_tag != self.pending_tag and (
                self._newer_tag(expected_tag)):
            # A tag from a replica that is ahead of this one: catch up, then check it.
            self._held.append(request)
            self._catch_up_wanted = True
            self._maybe_sync()
        else:
            self._submit(request)
        return request.done

    def _submit(self, request: "_Change") -> None:
        """Validate ``request`` against ``pending`` and write it; may raise synchronously."""
        if request.expected_tag is not None and request.expected_tag != self.pending_tag:
            raise TagMismatch(request.expected_tag)
        new = request.transform(self.pending)
        if new is self.pending:
            if self._in_flight == 0:
                request.done.callback(new)
            else:
                # What it found is not durable yet: answer when it is (a repeated DELETE
                # must not be acknowledged while the first one's write may still fail).
                self._latest.append(request)
            return
        self.pending = new
        self._in_flight += 1
        self._latest = []
        write = StoreWrite.of(new, request.dataset_ids)
        if request.fence is not None:
            write = attr.evolve(write, fence=request.fence)
        _index_retained(self._retained, new, (i for i, _ in write.datasets))
        self._store.write(write).addBoth(
            self._written, new, tuple(i for i, _ in write.datasets), self._latest, request)

    def _written(self, result, config: Configuration, touched: tuple[str, ...],
                 waiting: list["_Change"], request: "_Change") -> None:
        self._in_flight -= 1
        if isinstance(result, Failure) and result.check(Fenced):
            # Nothing was written, but ``pending`` holds it, and writes accepted since
            # were built on it: read the whole configuration again once they are done.
            self.leader.fenced(request.fence)
            self._reload_wanted = True
            for done in [request] + waiting:
                done.finish(result)
            if self._in_flight == 0:
                self._maybe_sync()
            return
        if (isinstance(result, Failure) and result.check(StoreConflict) and self._follows
                and self._broken is None):
            # Another replica wrote first: nothing of this was written. Apply it again
            # once the configuration caught up with that writer.
            log_event(_log, "pyflock:control:change-rebased", reason=str(result.value))
            self._rebasing = True
            request.waiters += waiting
            if self.now() - request.started < REBASE_TIMEOUT:
                request.attempts += 1
                self._retrying.append(request)
            else:
                request.finish(Failure(StoreUnavailable(
                    f"other replicas changed the configuration {request.attempts + 1} "
                    f"times in {REBASE_TIMEOUT:g} s while this change was being written; "
                    f"nothing of it was written")))
            self._maybe_sync()
            return
        outcome = self._settle(result, config, touched)
        for done in [request] + waiting:
            done.finish(outcome)
        if self._in_flight == 0:
            self._maybe_sync()

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
                self._fail_waiting(error)
                self._recover()
            return Failure(error)
        # The store completes writes in submission order, so the latest is the newest.
        self.committed = config
        self.revision = result
        self._learn_tag()
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
                self._learn_tag()
                self._broken = None
                self._notify(None)
                log_event(_log, "pyflock:control:store-recovered",
                          generation=config.generation)
                self._maybe_sync()
            return d.addCallback(done)

        def still_broken(failure):
            log_event(_log, "pyflock:control:store-recovery-failed", LogLevel.error,
                      reason=str(failure.value))
            if not self._stopped:
                self._retry = self._reactor.callLater(RECOVERY_RETRY, self._recover)
        self._store.load().addCallback(reloaded).addErrback(still_broken)

    def expire_leases(self) -> Deferred:
        """Drop the leases that have run out, durably, if this replica leads and has led
        for the lease grace (a new leader gives holders time to renew)."""
        now = self.now()
        if not self.leader.settled(now, self.lease_grace):
            return succeed(self.pending)
        expired = [k for k, lease in self.pending.leases.items() if lease.expired(now)]
        if not expired:
            return succeed(self.pending)
        holders = {i: self.pending.leases[i].node_uuid for i in expired}

        def expired_now(config: Configuration) -> Configuration:
            # Logged once durable: a write refused by the fence expired nothing.
            for dataset_id, node_uuid in holders.items():
                if dataset_id not in config.leases:
                    log_event(_log, "pyflock:control:lease-expired", dataset_id=dataset_id,
                              node_uuid=node_uuid)
            return config
        return self.change(expired, lambda c: c.expire_leases(now),
                           fence=self.leader.fence).addCallback(expired_now)

    def release_retained(self) -> Deferred:
        """Let the data of the deleted datasets whose retention is over go, durably, if
        this replica leads and has led for the lease grace."""
        now = self.now()
        if not self.leader.settled(now, self.lease_grace):
            return succeed(self.pending)
        due = [i for i, until in self._retained.items() if until <= now]
        if not due:
            return succeed(self.pending)
        for dataset_id in due:
            log_event(_log, "pyflock:control:dataset-retention-over", dataset_id=dataset_id)
        return self.change(due, lambda c: c.release_retained(due, now),
                           fence=self.leader.fence)

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
        follower, self._follower = self._follower, None
        if follower is not None:
            return follower.stop().addBoth(lambda _: self._stop())
        return self._stop()

    def _stop(self) -> Deferred:
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


__all__ = ["ConfigurationService", "StoreUnavailable", "TagMismatch", "StoreError",
           "HistoryGone", "DEFAULT_LEASE_RESTART_GRACE", "DEFAULT_RETENTION"]
