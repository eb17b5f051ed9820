"""
This node's Docker-plugin leases on the control service: taken by a Mount, renewed while
in use, released when idle. IO only: which datasets are in use is the plugin core's
answer (``in_use``), and the holder of a refused lease is the 409 answer's ``holder``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.common._client import Conflict, NotAllowed, NotFound
from pyflock.common._records import Lease
from pyflock.common._logging import log_event

_log = Logger()


class LeaseKeeper:
    """
    This node's leases: taken by Mount, renewed while in use, released when idle. The
    operations on one dataset run one after the other, so a release from the copy-up
    Unmount can never land after the start Mount's acquire.
    """

    def __init__(self, client: Any, node_uuid: str, duration: float,
                 in_use: Callable[[str], bool]):
        self._client = client
        self._node = node_uuid
        self._duration = duration
        self._in_use = in_use
        self._locks: dict[str, DeferredLock] = {}
        # The callers sharing the last acquire queued per dataset (none queued after it).
        self._sharing: dict[str, list[Deferred]] = {}
        self.held: set[str] = set()

    def _serially(self, dataset_id: str, f: Callable[[], Deferred]) -> Deferred:
        self._sharing.pop(dataset_id, None)
        lock = self._locks.get(dataset_id)
        if lock is None:
            lock = self._locks[dataset_id] = DeferredLock()

        def tidy(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._locks.get(dataset_id) is lock:
                del self._locks[dataset_id]
            return result
        return lock.run(f).addBoth(tidy)

    def acquire(self, dataset_id: str) -> Deferred:
        """Take or renew this node's lease; fails with the client's error (``Conflict``)."""
        sharing = self._sharing.get(dataset_id)
        if sharing is not None:
            joined: Deferred = Deferred()
            sharing.append(joined)
            return joined

        def go() -> Deferred:
            d = self._client.acquire_lease(dataset_id, self._node, self._duration)

            def taken(lease: Lease) -> Lease:
                if dataset_id not in self.held:
                    log_event(_log, "pyflock:plugin:lease-acquired", dataset_id=dataset_id,
                              node_uuid=self._node, expires=self._duration)
                self.held.add(dataset_id)
                return lease
            return d.addCallback(taken)

        sharing: list[Deferred] = []
        answered = []

        def share(result: Any) -> Any:
            answered.append(True)
            if self._sharing.get(dataset_id) is sharing:
                del self._sharing[dataset_id]
            for joined in sharing:
                if isinstance(result, Failure):
                    joined.errback(result)
                else:
                    joined.callback(result)
            return result
        d = self._serially(dataset_id, go).addBoth(share)
        if not answered:
            self._sharing[dataset_id] = sharing
        return d

    def took(self, dataset_id: str) -> None:
        """This node's lease on ``dataset_id`` was taken another way (with the dataset's
        creation): keep it like one ``acquire`` took."""
        if dataset_id not in self.held:
            log_event(_log, "pyflock:plugin:lease-acquired", dataset_id=dataset_id,
                      node_uuid=self._node, expires=self._duration, created=True)
        self.held.add(dataset_id)

    def release_if_idle(self, dataset_id: Optional[str]) -> Deferred:
        """Release this node's lease unless the dataset is in use again by then; never
        fails (a lease that cannot be released expires on its own)."""
        if dataset_id is None:
            return succeed(None)

        def go() -> Deferred:
            if self._in_use(dataset_id) or dataset_id not in self.held:
                return succeed(None)
            self.held.discard(dataset_id)
            d = self._client.release_lease(dataset_id)

            def released(_: Any) -> None:
                log_event(_log, "pyflock:plugin:lease-released", dataset_id=dataset_id,
                          node_uuid=self._node)

            def failed(failure: Failure) -> None:
                if failure.check(NotFound):
                    return None
                log_event(_log, "pyflock:plugin:lease-release-failed", LogLevel.warn,
                          dataset_id=dataset_id, reason=str(failure.value),
                          expires_within=self._duration)
            return d.addCallbacks(released, failed)
        return self._serially(dataset_id, go)

    def renew(self, dataset_ids: Iterable[str]) -> Deferred:
        """Renew the leases of ``dataset_ids`` (those in use); never fails, logs trouble."""
        def one(dataset_id: str) -> Deferred:
            def go() -> Deferred:
                if not self._in_use(dataset_id):
                    return succeed(None)
                d = self._client.acquire_lease(dataset_id, self._node, self._duration)

                def failed(failure: Failure) -> None:
                    if failure.check(Conflict):
                        self.held.discard(dataset_id)
                        log_event(_log, "pyflock:plugin:lease-lost", LogLevel.error,
                                  dataset_id=dataset_id, holder=failure.value.holder,
                                  reason=str(failure.value))
                    elif failure.check(NotFound, NotAllowed):
                        self.held.discard(dataset_id)
                        log_event(_log, "pyflock:plugin:lease-lost", LogLevel.error,
                                  dataset_id=dataset_id, holder=None,
                                  reason="the dataset was deleted while in use here")
                    else:
                        log_event(_log, "pyflock:plugin:lease-renew-failed", LogLevel.warn,
                                  dataset_id=dataset_id, reason=str(failure.value))
                return d.addCallbacks(lambda _: self.held.add(dataset_id), failed)
            return self._serially(dataset_id, go)
        return DeferredList([one(i) for i in sorted(set(dataset_ids))], consumeErrors=True)

    def forget(self, dataset_id: str) -> None:
        """Stop treating the dataset's lease as this node's (it went with the dataset)."""
        self.held.discard(dataset_id)


__all__ = ["LeaseKeeper"]
