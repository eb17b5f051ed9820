"""
The configuration store interface, what one write carries, and an in-memory store.

A store keeps datasets, leases and the configuration generation. The control service
validates every change in memory and hands the store only the rows it touched, so a write
costs O(change), never O(cluster).
"""

from __future__ import annotations

from typing import Iterable, Optional

import attr
from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from pyflock.common._model import Configuration, Dataset, Lease


class StoreError(Exception):
    """The store cannot be opened or written; the message names the file and the cause."""


@attr.s(frozen=True, auto_attribs=True)
class StoreWrite:
    """
    Rows to write in one transaction: for each dataset id, the new dataset record (or None
    to forget it) and the new lease (or None for no lease); and the generation.
    """

    datasets: tuple[tuple[str, Optional[Dataset]], ...] = ()
    leases: tuple[tuple[str, Optional[Lease]], ...] = ()
    generation: int = 0

    @classmethod
    def of(cls, config: Configuration, dataset_ids: Iterable[str]) -> "StoreWrite":
        """The rows of ``config`` for ``dataset_ids``: what a change to them must write."""
        ids = tuple(dict.fromkeys(dataset_ids))
        return cls(datasets=tuple((i, config.datasets.get(i)) for i in ids),
                   leases=tuple((i, config.leases.get(i)) for i in ids),
                   generation=config.generation)


class IConfigurationStore(Interface):
    """Durable storage of the desired configuration."""

    def load() -> Deferred:
        """
        Read the whole stored configuration; fires with a ``Configuration``. Fails with
        ``StoreError`` naming the file when the store is corrupt or unreadable.
        """

    def write(change: StoreWrite) -> Deferred:
        """
        Apply ``change``; fires with None once it is durable (survives kill -9 and power
        loss), or fails with ``StoreError`` (then none of it was applied).
        """

    def close() -> Deferred:
        """Finish pending writes and release the store; fires when done."""


def apply_write(config: Configuration, change: StoreWrite) -> Configuration:
    """The configuration that results from applying ``change``'s rows to ``config``."""
    datasets = config.datasets.evolver()
    for dataset_id, dataset in change.datasets:
        if dataset is None:
            if dataset_id in datasets:
                del datasets[dataset_id]
        else:
            datasets[dataset_id] = dataset
    leases = config.leases.evolver()
    for dataset_id, lease in change.leases:
        if lease is None:
            if dataset_id in leases:
                del leases[dataset_id]
        else:
            leases[dataset_id] = lease
    return Configuration.from_records(datasets.persistent().values(),
                                      leases.persistent().values(), change.generation)


@implementer(IConfigurationStore)
class MemoryConfigurationStore:
    """A store in memory, for unit tests; ``fail_next`` makes the next write fail."""

    def __init__(self, config: Configuration = Configuration()):
        self.config = config
        self.writes: list[StoreWrite] = []
        self.fail_next: Optional[Exception] = None

    def load(self) -> Deferred:
        return succeed(self.config)

    def write(self, change: StoreWrite) -> Deferred:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            d: Deferred = Deferred()
            d.errback(error)
            return d
        self.writes.append(change)
        self.config = apply_write(self.config, change)
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)
