"""
Tests for ``pyflock.common._threads``: named bounded pools started and stopped with the
reactor, and the ``RunBlocking`` helpers.
"""

import threading

import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._threads import Pools, UnknownPool, in_pool, in_reactor_pool, run_now


class PoolsTests(SynchronousTestCase):
    """Pools are bounded, named, and follow the reactor's life."""

    def test_sizes(self):
        """Each pool runs at most the threads it was given."""
        pools = Pools(MemoryReactorClock(), {"backend": 3, "plugin": 2})
        self.assertEqual((pools.size("backend"), pools.size("plugin")), (3, 2))

    def test_bad_size(self):
        """A pool without a thread is refused, naming it."""
        with self.assertRaises(ValueError) as caught:
            Pools(MemoryReactorClock(), {"plugin": 0})
        self.assertIn("'plugin'", str(caught.exception))

    def test_unknown_pool(self):
        """Asking for a pool that was not made is ``UnknownPool`` naming it."""
        pools = Pools(MemoryReactorClock(), {"plugin": 1})
        with self.assertRaises(UnknownPool) as caught:
            pools.run_blocking("backend")
        self.assertEqual(str(caught.exception), "no thread pool is called 'backend'")

    def test_with_reactor(self):
        """``with_reactor`` starts the pools when the reactor runs and stops them at its
        shutdown."""
        reactor = MemoryReactorClock()
        pools = Pools.with_reactor(reactor, {"plugin": 1})
        pool = pools._pool("plugin")
        self.assertFalse(pool.started)
        for call, args, kwargs in reactor.whenRunningHooks:
            call(*args, **kwargs)
        self.assertTrue(pool.started)
        [(stop, args, kwargs)] = reactor.triggers["during"]["shutdown"]
        stop(*args, **kwargs)
        self.assertFalse(pool.started)


def test_run_now():
    """``run_now`` runs in this thread and fails its Deferred with the error."""
    d = run_now(threading.get_ident)
    assert d.result == threading.get_ident()
    failed = run_now(int, "x")
    with pytest.raises(ValueError):
        failed.result.raiseException()
    failed.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_pools_run_in_their_threads():
    """Work given to a pool runs in one of its named threads, off the reactor thread."""
    from twisted.internet import reactor
    pools = Pools(reactor, {"plugin": 2})
    pools.start()
    try:
        name = await pools.run_blocking("plugin")(lambda: threading.current_thread().name)
    finally:
        pools.stop()
    assert "plugin-pool" in name


@pytest_twisted.ensureDeferred
async def test_bounded():
    """A pool never runs more of its work at once than its size."""
    from twisted.internet import reactor
    pools = Pools(reactor, {"bulk": 2})
    pools.start()
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def work():
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
    try:
        run = pools.run_blocking("bulk")
        for d in [run(work) for _ in range(6)]:
            await d
    finally:
        pools.stop()
    assert running[1] == 2


@pytest_twisted.ensureDeferred
async def test_reactor_pool_and_given_pool():
    """``in_reactor_pool`` and ``in_pool`` run off the reactor thread."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool
    main = threading.get_ident()
    assert await in_reactor_pool(reactor)(threading.get_ident) != main
    pool = ThreadPool(0, 1)
    pool.start()
    try:
        assert await in_pool(reactor, pool)(threading.get_ident) != main
    finally:
        pool.stop()
