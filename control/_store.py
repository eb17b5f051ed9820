"""
The configuration store interface, what one write carries, and an in-memory store.

A store keeps datasets, leases and the configuration generation. The control service
validates every change in memory and hands the store only the rows it touched, so a write
costs O(change), never O(cluster).

Revisions. Every write commits at a revision, an integer that strictly increases from one
write to the next and survives restarts (a store's revisions need not be consecutive: an
etcd store uses etcd's). ``load`` tells the revision of what it read and ``write`` the
revision it committed at. A new store is at revision 0, the state it started with.

Change feed. ``changes_since(R)`` tells what changed after revision R: the rows written
after R, with their current values, so that applying them (``apply_write``) to the
configuration at R gives the current one. A store keeps the history of its last
``RETAINED_REVISIONS`` revisions (the SQLite and memory stores prune it as they write);
for an older R, or one the store never reached (say, read from a store since restored
from a backup), it fails with ``HistoryGone`` and the caller loads a full snapshot
instead. Pruning keeps the history's size bounded by the rows removed in the retained
revisions plus the rows that exist.

Store id. A revision means something only within one line of revisions: a store restored
from a backup repeats revisions the lost one had already used, with other changes behind
them. So every store has a ``store_id``, kept across restarts and new in a new store and
in a backup's copy; ``load`` and ``changes_since`` tell it, and a caller that resumes from
a revision compares it with the one its revision came from (a different one: load again).
"""

from __future__ import annotations

import secrets
from typing import Any, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

from pyflock.common._model import Configuration, Dataset, Lease

#: How many revisions of history a store keeps for ``changes_since``: about 200 s of
#: renewals of 10,000 leases every 20 s, hours at ordinary rates; the tombstones of the
#: rows removed in them cost at most a few MB.
RETAINED_REVISIONS = 100_000


class StoreError(Exception):
    """The store cannot be opened or written; the message names the file and the cause."""


class StoreConflict(StoreError):
    """Another writer changed the store since this one read it; nothing was written."""


class Fenced(StoreError):
    """
    A leader-only write was refused: its fence (the leader's campaign key, created at a
    revision) no longer holds, so another replica may lead; nothing was written.
    """


class HistoryGone(Exception):
    """
    The store cannot tell what changed since ``revision``: it is older than the history
    the store keeps, or newer than the store; load a full snapshot instead.
    """

    def __init__(self, revision: int, oldest: int, current: int):
        self.revision = revision
        self.oldest = oldest
        self.current = current
        super().__init__(f"revision {revision} is not in the store's history, which "
                         f"tells the changes since any revision from {oldest} to "
                         f"{current}; load the whole configuration instead")


@attr.s(frozen=True, auto_attribs=True)
class StoreWrite:
    """
    Rows to write in one transaction: for each dataset id, the new dataset record (or None
    to forget it) and the new lease (or None for no lease); and the generation.
    """

    datasets: tuple[tuple[str, Optional[Dataset]], ...] = ()
    leases: tuple[tuple[str, Optional[Lease]], ...] = ()
    generation: int = 0
    #: A leader-only write (lease expiry, purging) carries the leader's fence
    #: (``_election.Fence``): a shared store (etcd) writes it only while the fence holds,
    #: else fails with ``Fenced``; a store with one writer ignores it.
    fence: Any = None

    @classmethod
    def of(cls, config: Configuration, dataset_ids: Iterable[str]) -> "StoreWrite":
        """The rows of ``config`` for ``dataset_ids``: what a change to them must write."""
        ids = tuple(dict.fromkeys(dataset_ids))
        return cls(datasets=tuple((i, config.datasets.get(i)) for i in ids),
                   leases=tuple((i, config.leases.get(i)) for i in ids),
                   generation=config.generation)


@attr.s(frozen=True, auto_attribs=True)
class StoreSnapshot:
    """The whole stored configuration, the revision it was read at and the store's id."""

    configuration: Configuration
    revision: int
    store_id: str


@attr.s(frozen=True, auto_attribs=True)
class StoreChanges:
    """
    What changed after revision ``since`` up to ``revision``: the current value of every
    row written in between (None for a row now gone) and the current generation; and the
    id of the store that answered.
    """

    since: int
    revision: int
    change: StoreWrite
    store_id: str


class IConfigurationStore(Interface):
    """Durable storage of the desired configuration, with revisions and a change feed."""

    def load() -> Deferred:
        """
        Read the whole stored configuration; fires with a ``StoreSnapshot``. Fails with
        ``StoreError`` naming the file when the store is corrupt or unreadable.
        """

    def write(change: StoreWrite) -> Deferred:
        """
        Apply ``change``; fires with the revision it committed at once it is durable
        (survives kill -9 and power loss), or fails with ``StoreError`` (then none of it
        was applied). Writes are applied, and fire, in submission order.
        """

    def changes_since(revision: int) -> Deferred:
        """
        What changed after ``revision``, as of every write submitted before this call;
        fires with a ``StoreChanges``, or fails with ``HistoryGone``.
        """

    def close() -> Deferred:
        """Finish pending writes and release the store; fires when done."""

    def load_tokens() -> Deferred:
        """Every stored join token; fires with a tuple of ``TokenRecord``."""

    def write_token(token_id: str, record) -> Deferred:
        """
        Store ``record`` (a ``TokenRecord``) as token ``token_id``, or forget the token if
        ``record`` is None; fires with None once durable, or fails with ``StoreError``.
        """


def _with_rows(rows, changes) -> Any:
    """``rows`` (a pyrsistent map by dataset id) with each changed row set, or removed
    where the change holds None."""
    evolver = rows.evolver()
    for dataset_id, row in changes:
        if row is not None:
            evolver[dataset_id] = row
        elif dataset_id in evolver:
            del evolver[dataset_id]
    return evolver.persistent()


def apply_write(config: Configuration, change: StoreWrite) -> Configuration:
    """The configuration that results from applying ``change``'s rows to ``config``."""
    datasets = _with_rows(config.datasets, change.datasets)
    leases = _with_rows(config.leases, change.leases)
    return Configuration.from_records(datasets.values(),
                                      leases.values(), change.generation)


def check_history(since: int, oldest: int, current: int) -> None:
    """Raise ``HistoryGone`` unless a history from ``oldest`` to ``current`` covers ``since``."""
    if not oldest <= since <= current:
        raise HistoryGone(since, oldest, current)


def new_store_id() -> str:
    """A fresh store id: 16 random hex digits."""
    return secrets.token_hex(8)


def oldest_kept(oldest: int, current: int, retained: int) -> int:
    """The oldest revision a store at ``current`` keeps history from, after pruning."""
    return max(oldest, current - retained)


#: Keys of the memory store's change index: ("dataset" or "lease", dataset id).
_DATASET, _LEASE = "dataset", "lease"


@implementer(IConfigurationStore)
class MemoryConfigurationStore:
    """
    A store in memory, for unit tests and in-memory doubles; ``fail_next`` makes the next
    write fail. ``config`` is what it holds, at ``revision``.
    """

    def __init__(self, config: Configuration = Configuration(), revision: int = 0,
                 retained: int = RETAINED_REVISIONS):
        self.config = config
        self.revision = revision
        self.store_id = new_store_id()
        self.writes: list[StoreWrite] = []
        self.fail_next: Optional[Exception] = None
        self._retained = retained
        self._oldest = revision
        # (kind, dataset id) -> the revision of its last change, oldest first.
        self._changed: dict[tuple[str, str], int] = {}
        self.tokens: dict[str, Any] = {}

    def reopen(self) -> "MemoryConfigurationStore":
        """A new store holding what this one kept, history included, as after a restart."""
        store = MemoryConfigurationStore(self.config, self.revision, self._retained)
        store._oldest, store._changed = self._oldest, dict(self._changed)
        store.store_id = self.store_id
        store.tokens = dict(self.tokens)
        return store

    def load(self) -> Deferred:
        """Fire with the configuration and its revision."""
        return succeed(StoreSnapshot(self.config, self.revision, self.store_id))

    def write(self, change: StoreWrite) -> Deferred:
        """Apply ``change`` at the next revision, or fail with ``fail_next`` if set."""
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return fail(error)
        self.writes.append(change)
        self.config = apply_write(self.config, change)
        self.revision += 1
        for key in [(_DATASET, i) for i, _ in change.datasets] + [
                (_LEASE, i) for i, _ in change.leases]:
            self._changed.pop(key, None)
            self._changed[key] = self.revision
        self._oldest = oldest_kept(self._oldest, self.revision, self._retained)
        while self._changed:
            key = next(iter(self._changed))
            if self._changed[key] > self._oldest:
                break
            del self._changed[key]
        return succeed(self.revision)

    def changes_since(self, revision: int) -> Deferred:
        """Fire with the rows changed after ``revision``, or fail with ``HistoryGone``."""
        try:
            check_history(revision, self._oldest, self.revision)
        except HistoryGone:
            return fail()
        changed = []
        for key, at in reversed(self._changed.items()):
            if at <= revision:
                break
            changed.append(key)
        changed.reverse()
        change = StoreWrite(
            datasets=tuple((i, self.config.datasets.get(i))
                           for kind, i in changed if kind == _DATASET),
            leases=tuple((i, self.config.leases.get(i)) for kind, i in changed if kind == _LEASE),
            generation=self.config.generation)
        return succeed(StoreChanges(since=revision, revision=self.revision, change=change,
                                    store_id=self.store_id))

    def close(self) -> Deferred:
        """Nothing to release; fires at once."""
        return succeed(None)

    def load_tokens(self) -> Deferred:
        """Fire with every token record."""
        return succeed(tuple(self.tokens.values()))

    def write_token(self, token_id: str, record) -> Deferred:
        """Keep (or with None forget) a token, or fail with ``fail_next`` if set."""
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return fail(error)
        if record is None:
            self.tokens.pop(token_id, None)
        else:
            self.tokens[token_id] = record
        return succeed(None)
