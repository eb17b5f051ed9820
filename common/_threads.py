"""
Blocking work off the reactor, the one place pyflock hands work to threads.

A ``RunBlocking`` is a callable ``run_blocking(f, *args, **kwargs)`` returning a Deferred
of ``f``'s result; code that blocks (a backend call, mkfs, a file write) takes one as a
parameter. ``Pools`` are named, bounded thread pools started and stopped with the reactor,
so that one kind of work (the plugin's mount checks, say) never waits behind another (a
burst of volume creations); ``pools.run_blocking(name)`` runs in one of them.
``in_reactor_pool(reactor)`` uses the reactor's own pool (tools and tests), ``run_now``
runs at once in the calling thread (fakes that never block, in unit tests).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

#: Runs a blocking function with arguments and returns a Deferred of its result.
RunBlocking = Callable[..., Deferred]


class UnknownPool(KeyError):
    """A pool name that ``Pools`` was not given."""

    def __str__(self) -> str:
        return f"no thread pool is called {self.args[0]!r}"


def run_now(f: Callable, *args: Any, **kwargs: Any) -> Deferred:
    """Run ``f`` right away in this thread (fakes that never block, in unit tests)."""
    return maybeDeferred(f, *args, **kwargs)


def in_pool(reactor: Any, pool: ThreadPool) -> RunBlocking:
    """A ``RunBlocking`` running functions in the started ``pool``."""
    def run_blocking(f: Callable, *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(reactor, pool, f, *args, **kwargs)
    return run_blocking


def in_reactor_pool(reactor: Any) -> RunBlocking:
    """A ``RunBlocking`` running functions in ``reactor``'s own thread pool."""
    def run_blocking(f: Callable, *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)
    return run_blocking


class Pools:
    """
    Named thread pools of bounded size (``sizes``: threads by name), started when
    ``reactor`` runs and stopped when it shuts down (their threads finish the work they
    hold first), as the reactor's own pool is. Threads are made on demand and named
    ``PoolThread-<name>-pool-...``, which shows in tracebacks and ``py-spy``.
    """

    def __init__(self, reactor: Any, sizes: Mapping[str, int]):
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"thread pool {name!r} needs at least one thread, "
                                 f"not {size!r}")
        self._reactor = reactor
        self._pools = {name: ThreadPool(minthreads=0, maxthreads=size,
                                        name=f"{name}-pool")
                       for name, size in sizes.items()}

    @classmethod
    def with_reactor(cls, reactor: Any, sizes: Mapping[str, int]) -> "Pools":
        """Pools started when ``reactor`` runs (at once if it does) and stopped at its
        shutdown."""
        pools = cls(reactor, sizes)
        reactor.callWhenRunning(pools.start)
        reactor.addSystemEventTrigger("during", "shutdown", pools.stop)
        return pools

    def size(self, name: str) -> int:
        """The most threads pool ``name`` runs at once."""
        return self._pool(name).max

    def start(self) -> None:
        """Start every pool (idempotent)."""
        for pool in self._pools.values():
            if not pool.started:
                pool.start()

    def stop(self) -> None:
        """Stop every pool, after the work each holds (idempotent)."""
        for pool in self._pools.values():
            if pool.started:
                pool.stop()

    def run_blocking(self, name: str) -> RunBlocking:
        """A ``RunBlocking`` running in pool ``name``."""
        return in_pool(self._reactor, self._pool(name))

    def _pool(self, name: str) -> ThreadPool:
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownPool(name) from None


__all__ = ["Pools", "RunBlocking", "UnknownPool", "in_pool", "in_reactor_pool", "run_now"]
