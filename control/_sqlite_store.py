"""
The embedded configuration store: one SQLite file in WAL mode with ``synchronous=FULL``,
written by one dedicated thread that commits concurrent writes in one transaction.

The reactor thread never touches SQLite. It queues jobs (open, load, write batches,
close) one at a time to the writer thread, which hands results back with
``reactor.callFromThread``. While a job is in flight, new writes wait on the reactor side;
when the job finishes, all of them go to the thread together and are committed in one
transaction (group commit), so N concurrent writers cost about one fsync per round.

Layout of ``configuration.sqlite3`` (schema version ``SCHEMA_VERSION``, kept in
``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as pyflock's):

- ``datasets(dataset_id, primary_node, maximum_size INTEGER|NULL, metadata JSON text,
  deleted 0/1, retained_until REAL|NULL)``: ``retained_until``, absolute seconds since the
  epoch, is until when a deleted dataset's data is kept (schema version 4; the deleted
  datasets of an older store have NULL: their data was already going)
- ``leases(dataset_id, node_uuid, expiration REAL|NULL)``: absolute seconds since the epoch
- ``meta(key, value)``: ``generation``; ``revision``, the revision of the last write;
  ``compacted``, the oldest revision ``changes_since`` answers for; ``store_id``, text,
  made anew in every backup's copy (schema version 2)
- ``changes(kind 'dataset'|'lease', dataset_id, revision)``: the revision at which each
  row last changed, for the rows changed after ``compacted``, removed rows included (schema
  version 2). Every write in a group commit gets a revision of its own; each transaction
  drops the entries at or before ``revision - retained`` (``RETAINED_REVISIONS`` unless
  told) and raises ``compacted`` to match, so the table holds at most the existing rows
  plus the rows removed in the retained revisions.
- ``tokens(token_id, secret_hash, created REAL, expires REAL, uses, used)``: the join
  tokens (``TokenRecord``), the SHA-256 of each secret only; outside revisions (schema
  version 3)

To restore a backup, stop pyflock-control, remove ``configuration.sqlite3`` and its
``-wal``/``-shm`` files, and copy the backup file to ``configuration.sqlite3``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import sqlite3
import tempfile
import threading
from collections import deque
from typing import Any, Callable, Optional, Sequence
from urllib.request import pathname2url

import attr
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from pyflock.common._files import fsync_path as _fsync
from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.common._records import metadata_of
from pyflock.control._tokens import TokenRecord
from pyflock.control._store import (
    RETAINED_REVISIONS, HistoryGone, IConfigurationStore, StoreChanges, StoreError,
    StoreSnapshot, StoreWrite, check_history, new_store_id, oldest_kept,
)

#: The data file's name inside the control service's data path.
FILENAME = "configuration.sqlite3"

#: ``PRAGMA application_id`` of a pyflock configuration store ("pflk").
APPLICATION_ID = 0x70666C6B

#: How long a transaction waits for another connection's write lock (a backup only reads).
BUSY_TIMEOUT = 30.0

#: The most writes committed in one transaction; the rest go in the next one.
MAX_BATCH = 4096


def _schema_1(db: sqlite3.Connection) -> None:
    """Datasets, leases and the generation."""
    db.execute("""
        CREATE TABLE datasets (
            dataset_id TEXT PRIMARY KEY NOT NULL,
            primary_node TEXT NOT NULL,
            maximum_size INTEGER CHECK (maximum_size IS NULL OR maximum_size >= 0),
            metadata TEXT NOT NULL,
            deleted INTEGER NOT NULL CHECK (deleted IN (0, 1))
        ) WITHOUT ROWID""")
    db.execute("""
        CREATE TABLE leases (
            dataset_id TEXT PRIMARY KEY NOT NULL,
            node_uuid TEXT NOT NULL,
            expiration REAL
        ) WITHOUT ROWID""")
    db.execute("""
        CREATE TABLE meta (
            key TEXT PRIMARY KEY NOT NULL,
            value NOT NULL
        ) WITHOUT ROWID""")
    db.execute("INSERT INTO meta (key, value) VALUES ('generation', 0)")


def _schema_2(db: sqlite3.Connection) -> None:
    """
    Revisions and the change index. What a store held before is its state at revision 0,
    with no history before it.
    """
    db.execute("""
        CREATE TABLE changes (
            kind TEXT NOT NULL CHECK (kind IN ('dataset', 'lease')),
            dataset_id TEXT NOT NULL,
            revision INTEGER NOT NULL,
            PRIMARY KEY (kind, dataset_id)
        ) WITHOUT ROWID""")
    db.execute("CREATE INDEX changes_by_revision ON changes (revision)")
    db.execute("INSERT INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0), "
               "('store_id', ?)", (new_store_id(),))


def _schema_3(db: sqlite3.Connection) -> None:
    """Join tokens: the hash of each secret, never the secret."""
    db.execute("""
        CREATE TABLE tokens (
            token_id TEXT PRIMARY KEY NOT NULL,
            secret_hash TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL NOT NULL,
            uses INTEGER NOT NULL CHECK (uses >= 1),
            used INTEGER NOT NULL CHECK (used >= 0)
        ) WITHOUT ROWID""")


def _schema_4(db: sqlite3.Connection) -> None:
    """Deleted datasets kept for a while: until when (NULL: live, or data going now)."""
    db.execute("ALTER TABLE datasets ADD COLUMN retained_until REAL "
               "CHECK (retained_until IS NULL OR deleted = 1)")


#: ``MIGRATIONS[n]`` takes a store from schema version ``n`` to ``n + 1``; append only.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _schema_1, _schema_2, _schema_3, _schema_4)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def _uri(path: str, mode: str) -> str:
    # A URI lets ``mode=rw`` refuse to create a missing file, which a plain path cannot.
    return "file:" + pathname2url(os.path.abspath(path)) + "?mode=" + mode


def _restore_advice(path: str) -> str:
    return (f"Stop pyflock-control, move {path} (and its -wal and -shm files, if any) "
            f"aside and restore it from a backup made with `pyflock-control backup`; "
            f"pyflock-control will not start with an empty configuration instead.")


def _damaged(path: str, reason: str) -> StoreError:
    return StoreError(f"{path}: the configuration store is damaged ({reason}). "
                      + _restore_advice(path))


def _unopenable(path: str, reason: str) -> StoreError:
    return StoreError(f"{path}: cannot open the configuration store ({reason}). Check that "
                      f"the file and its folder are readable and writable by the user "
                      f"running pyflock-control.")


def _translate_open_error(path: str, error: Exception) -> StoreError:
    """The ``StoreError`` to report for an exception raised while opening ``path``."""
    if isinstance(error, StoreError):
        return error
    message = str(error)
    if isinstance(error, PermissionError) or any(
            text in message.lower() for text in ("unable to open", "readonly", "permission")):
        return _unopenable(path, message or repr(error))
    if "full" in message or getattr(error, "errno", None) == errno.ENOSPC:
        return StoreError(f"{path}: cannot open the configuration store: the disk is full "
                          f"({message}). Free some space, then start again.")
    if "locked" in message:
        return StoreError(f"{path}: the configuration store is locked by another process "
                          f"({message}); stop it, then try again.")
    if isinstance(error, sqlite3.DatabaseError):
        return _damaged(path, message)
    return _unopenable(path, message or repr(error))


def _prepare_folder(folder: str) -> None:
    """Make sure ``folder`` is a folder, creating it (mode 0700) when it is missing."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise StoreError(f"{folder}: the data path is a file, not a folder. Give "
                         f"pyflock-control a folder as its data path (it is created if "
                         f"missing).")
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=0o700)
            os.chmod(folder, 0o700)
        except OSError as e:
            raise StoreError(f"{folder}: cannot create the data folder ({e.strerror}). "
                             f"Create it, writable by the user running pyflock-control, "
                             f"or choose another data path.") from e


def _lock(path: str) -> int:
    """Take the store's exclusive lock, so that only one process ever writes it."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise _unopenable(path, f"cannot open the lock file {lock_path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path}: another process is using this configuration store (it "
                         f"holds {lock_path}): another pyflock-control, or a backup being "
                         f"taken. Two control services must never share one store; stop "
                         f"the other one, or wait for the backup to finish.") from None
    return fd


def _migrate(db: sqlite3.Connection, current: int,
             migrations: Sequence[Callable[[sqlite3.Connection], None]]) -> None:
    """Run ``migrations[current:]`` in the open transaction and record the new version."""
    for migration in migrations[current:]:
        migration(db)
    db.execute(f"PRAGMA user_version = {len(migrations):d}")
    db.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")


def _create(path: str, migrations: Sequence[Callable[[sqlite3.Connection], None]]) -> None:
    """
    Create a new store at ``path`` atomically: a file that exists is always a whole store,
    so an empty or truncated one is damage, never a store still being created.
    """
    scratch = path + ".new"
    for suffix in ("", "-journal", "-wal", "-shm"):
        if os.path.lexists(scratch + suffix):
            os.unlink(scratch + suffix)
    db = sqlite3.connect(_uri(scratch, "rwc"), uri=True, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        _migrate(db, 0, migrations)
        db.execute("COMMIT")
    finally:
        db.close()
    _fsync(scratch)
    os.rename(scratch, path)
    _fsync(os.path.dirname(path) or ".", directory=True)


def _connect(path: str, migrations: Sequence[Callable[[sqlite3.Connection], None]]
             ) -> sqlite3.Connection:
    """Open an existing store, check it and bring its schema up to date."""
    if os.path.isdir(path):
        raise StoreError(f"{path} is a folder, not a configuration store file. Move it "
                         f"aside or choose another data path.")
    # SQLite quietly opens an unwritable file read-only; writes would then fail one by one.
    if not os.access(path, os.R_OK | os.W_OK):
        raise _unopenable(path, "the file is not both readable and writable")
    folder = os.path.dirname(path) or "."
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unopenable(path, f"its folder {folder} is not writable")
    if os.path.getsize(path) == 0:
        raise _damaged(path, "the file is empty: truncated")
    db = sqlite3.connect(_uri(path, "rw"), uri=True, isolation_level=None,
                         timeout=BUSY_TIMEOUT)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise _damaged(path, "integrity check failed: " + "; ".join(problems))
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if application_id not in (0, APPLICATION_ID) or (
                application_id == 0 and db.execute(
                    "SELECT count(*) FROM sqlite_schema").fetchone()[0]):
            raise StoreError(f"{path} is an SQLite database but not a pyflock configuration "
                             f"store. Move it aside or choose another data path.")
        if version > len(migrations):
            raise StoreError(f"{path}: the configuration store has schema version "
                             f"{version}, but this pyflock-control knows versions up to "
                             f"{len(migrations)}. Run a pyflock-control at least as new as "
                             f"the one that wrote it, or restore a backup made by this "
                             f"version.")
        # Only now that the file is known to be ours and readable by this code may it change.
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise _unopenable(path, f"cannot switch to WAL mode, journal mode is {mode}")
        db.execute("PRAGMA synchronous = FULL")
        # Give back the disk a burst of writes took, once it has been checkpointed.
        db.execute("PRAGMA journal_size_limit = 67108864")
        if version < len(migrations):
            db.execute("BEGIN IMMEDIATE")
            try:
                _migrate(db, version, migrations)
                db.execute("COMMIT")
            except Exception as e:
                db.execute("ROLLBACK")
                raise StoreError(f"{path}: upgrading the configuration store from schema "
                                 f"version {version} to {len(migrations)} failed ({e}); "
                                 f"the store was left unchanged at version {version}. "
                                 f"Run the pyflock-control that wrote it, and report this "
                                 f"as a bug.") from e
        return db
    except BaseException:
        db.close()
        raise


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Rows:
    """A ``StoreWrite`` encoded as SQL parameters, ready for the writer thread."""

    datasets: tuple[tuple[str, Optional[tuple]], ...]
    leases: tuple[tuple[str, Optional[tuple]], ...]
    generation: int


def _encode(change: StoreWrite) -> _Rows:
    """Encode ``change``'s rows; raises on values the schema cannot hold."""
    datasets = tuple(
        (dataset_id, None if d is None else (
            dataset_id, d.primary, d.maximum_size,
            json.dumps(dict(d.metadata), sort_keys=True, separators=(",", ":")),
            1 if d.deleted else 0, d.retained_until))
        for dataset_id, d in change.datasets)
    leases = tuple(
        (dataset_id, None if lease is None else (
            dataset_id, lease.node_uuid, lease.expiration))
        for dataset_id, lease in change.leases)
    return _Rows(datasets=datasets, leases=leases, generation=int(change.generation))


_UPSERT_DATASET = """
    INSERT INTO datasets (dataset_id, primary_node, maximum_size, metadata, deleted,
        retained_until)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (dataset_id) DO UPDATE SET primary_node = excluded.primary_node,
        maximum_size = excluded.maximum_size, metadata = excluded.metadata,
        deleted = excluded.deleted, retained_until = excluded.retained_until"""
_DELETE_DATASET = "DELETE FROM datasets WHERE dataset_id = ?"
_UPSERT_LEASE = """
    INSERT INTO leases (dataset_id, node_uuid, expiration) VALUES (?, ?, ?)
    ON CONFLICT (dataset_id) DO UPDATE SET node_uuid = excluded.node_uuid,
        expiration = excluded.expiration"""
_DELETE_LEASE = "DELETE FROM leases WHERE dataset_id = ?"
_SET_META = "UPDATE meta SET value = ? WHERE key = ?"
_UPSERT_CHANGE = """
    INSERT INTO changes (kind, dataset_id, revision) VALUES (?, ?, ?)
    ON CONFLICT (kind, dataset_id) DO UPDATE SET revision = excluded.revision"""
_PRUNE_CHANGES = "DELETE FROM changes WHERE revision <= ?"
_META = ("SELECT key, value FROM meta "
         "WHERE key IN ('generation', 'revision', 'compacted', 'store_id')")
_DATASET_COLUMNS = "primary_node, maximum_size, metadata, deleted, retained_until"
_LEASE_COLUMNS = "node_uuid, expiration"


def _set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
    if db.execute(_SET_META, (value, key)).rowcount != 1:
        raise sqlite3.DatabaseError(f"the {key} row is missing from the meta table")


def _apply(db: sqlite3.Connection, batch: Sequence[_Rows], retained: int) -> list[int]:
    """
    Write ``batch`` in the open transaction, each write at the next revision, and prune
    the history to the last ``retained`` revisions; the revisions, in order. Later writes
    to a row win, as in order.
    """
    meta = dict(db.execute(_META).fetchall())
    first = meta["revision"] + 1
    datasets: dict[str, Optional[tuple]] = {}
    leases: dict[str, Optional[tuple]] = {}
    changed: dict[tuple[str, str], int] = {}
    for revision, rows in enumerate(batch, first):
        datasets.update(rows.datasets)
        leases.update(rows.leases)
        changed.update((("dataset", k), revision) for k, _ in rows.datasets)
        changed.update((("lease", k), revision) for k, _ in rows.leases)
    revision = first + len(batch) - 1
    db.executemany(_DELETE_DATASET, [(k,) for k, row in datasets.items() if row is None])
    db.executemany(_UPSERT_DATASET, [row for row in datasets.values() if row is not None])
    db.executemany(_DELETE_LEASE, [(k,) for k, row in leases.items() if row is None])
    db.executemany(_UPSERT_LEASE, [row for row in leases.values() if row is not None])
    db.executemany(_UPSERT_CHANGE, [(kind, k, at) for (kind, k), at in changed.items()])
    compacted = oldest_kept(meta["compacted"], revision, retained)
    if compacted > meta["compacted"]:
        db.execute(_PRUNE_CHANGES, (compacted,))
        _set_meta(db, "compacted", compacted)
    _set_meta(db, "revision", revision)
    _set_meta(db, "generation", batch[-1].generation)
    return list(range(first, revision + 1))


def _metadata(text: str) -> Any:
    """Decode stored metadata into the map ``Dataset.metadata`` holds (``metadata_of``
    builds it fast enough to load 10,000 datasets well under a second)."""
    value = json.loads(text)
    if type(value) is not dict:
        raise ValueError(f"metadata must be a JSON object of strings, not {text!r}")
    return metadata_of(value)


def _dataset(path: str, dataset_id: str, primary: Optional[str], maximum_size: Any,
             metadata: Optional[str], deleted: Any,
             retained_until: Any) -> Optional[Dataset]:
    """The dataset a row holds, None for no row (``primary`` NULL from an outer join)."""
    if primary is None:
        return None
    try:
        return Dataset(dataset_id=dataset_id, primary=primary, maximum_size=maximum_size,
                       metadata=_metadata(metadata), deleted=bool(deleted),
                       retained_until=retained_until)
    except Exception as e:
        raise _damaged(path, f"dataset {dataset_id!r} cannot be read: {e}") from e


def _lease(path: str, dataset_id: str, node_uuid: Optional[str],
           expiration: Any) -> Optional[Lease]:
    """The lease a row holds, None for no row (``node_uuid`` NULL from an outer join)."""
    if node_uuid is None:
        return None
    try:
        return Lease(dataset_id=dataset_id, node_uuid=node_uuid, expiration=expiration)
    except Exception as e:
        raise _damaged(path, f"the lease on {dataset_id!r} cannot be read: {e}") from e


def _read_meta(db: sqlite3.Connection, path: str) -> dict[str, Any]:
    """The generation, revision, compacted revision and store id, checked."""
    meta = dict(db.execute(_META).fetchall())
    for key, kind in (("generation", int), ("revision", int), ("compacted", int),
                      ("store_id", str)):
        if not isinstance(meta.get(key), kind):
            raise _damaged(path, f"the {key} is missing from the meta table")
    return meta


def _read(db: sqlite3.Connection, path: str) -> StoreSnapshot:
    """Read the whole configuration and its revision in one read transaction."""
    db.execute("BEGIN")
    try:
        dataset_rows = db.execute(
            f"SELECT dataset_id, {_DATASET_COLUMNS} FROM datasets").fetchall()
        lease_rows = db.execute(f"SELECT dataset_id, {_LEASE_COLUMNS} FROM leases").fetchall()
        meta = _read_meta(db, path)
    finally:
        db.execute("COMMIT")
    datasets = [_dataset(path, *row) for row in dataset_rows]
    leases = [_lease(path, *row) for row in lease_rows]
    return StoreSnapshot(Configuration.from_records(datasets, leases, meta["generation"]),
                         meta["revision"], meta["store_id"])


def _read_changes(db: sqlite3.Connection, path: str, since: int) -> StoreChanges:
    """The rows changed after revision ``since``, read in one read transaction."""
    db.execute("BEGIN")
    try:
        meta = _read_meta(db, path)
        check_history(since, meta["compacted"], meta["revision"])
        dataset_rows = db.execute(
            f"SELECT c.dataset_id, {_DATASET_COLUMNS} FROM changes AS c LEFT JOIN datasets "
            f"USING (dataset_id) WHERE c.kind = 'dataset' AND c.revision > ? "
            f"ORDER BY c.revision", (since,)).fetchall()
        lease_rows = db.execute(
            f"SELECT c.dataset_id, {_LEASE_COLUMNS} FROM changes AS c LEFT JOIN leases "
            f"USING (dataset_id) WHERE c.kind = 'lease' AND c.revision > ? "
            f"ORDER BY c.revision", (since,)).fetchall()
    finally:
        db.execute("COMMIT")
    change = StoreWrite(
        datasets=tuple((row[0], _dataset(path, *row)) for row in dataset_rows),
        leases=tuple((row[0], _lease(path, *row)) for row in lease_rows),
        generation=meta["generation"])
    return StoreChanges(since=since, revision=meta["revision"], change=change,
                        store_id=meta["store_id"])


_TOKEN_COLUMNS = "token_id, secret_hash, created, expires, uses, used"


def _read_tokens(db: sqlite3.Connection, path: str) -> tuple[TokenRecord, ...]:
    """Every stored join token."""
    rows = db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens").fetchall()
    try:
        return tuple(TokenRecord(*row) for row in rows)
    except TypeError as e:
        raise _damaged(path, f"a join token cannot be read: {e}") from e


def _write_token(db: sqlite3.Connection, token_id: str, row: Optional[tuple]) -> None:
    """Store (or with None remove) one join token in its own transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM tokens WHERE token_id = ?", (token_id,))
        if row is not None:
            db.execute(f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       row)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@attr.s(slots=True, auto_attribs=True)
class _Job:
    """One unit of work for the writer thread and the Deferreds waiting on it."""

    kind: str
    payload: Any
    waiting: list[Deferred]


@implementer(IConfigurationStore)
class SQLiteConfigurationStore:
    """
    A configuration store in the SQLite file ``path``, opened (created if missing, checked,
    migrated) by its writer thread as soon as it is constructed; ``opened()`` tells how
    that went. Results are delivered to ``reactor`` with ``callFromThread``.
    """

    def __init__(self, path: str | os.PathLike, reactor: Any,
                 migrations: Sequence[Callable[[sqlite3.Connection], None]] = MIGRATIONS,
                 retained: int = RETAINED_REVISIONS):
        self.path = os.fspath(path)
        self._retained = retained
        #: Write transactions run (committed or rolled back), for tests and benchmarks.
        self.transactions = 0
        self._reactor = reactor
        self._migrations = tuple(migrations)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._pending: deque[_Job] = deque()
        self._busy = False
        self._delivering = False
        self._closing: Optional[Deferred] = None
        self._closed: list[Deferred] = []
        self._done = False
        # Only the writer thread reads or writes these two.
        self._db: Optional[sqlite3.Connection] = None
        self._open_error: Optional[StoreError] = None
        self._lock_fd: Optional[int] = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"pyflock store writer {self.path}")
        self._thread.start()
        self._submit("open", None, [])

    def opened(self) -> Deferred:
        """Fires with None once the store is open, or fails with the ``StoreError`` why not."""
        return self._request("check", None)

    def load(self) -> Deferred:
        """Read the whole configuration, after every write submitted before this call."""
        return self._request("load", None)

    def changes_since(self, revision: int) -> Deferred:
        """The rows changed after ``revision``, after every write submitted before this call."""
        return self._request("changes", revision)

    def load_tokens(self) -> Deferred:
        """Every stored join token, after every write submitted before this call."""
        return self._request("tokens", None)

    def write_token(self, token_id: str, record: Optional[TokenRecord]) -> Deferred:
        """Store (or with None forget) a join token; fires with None when durable."""
        row = None if record is None else (
            record.token_id, record.secret_hash, float(record.created),
            float(record.expires), int(record.uses), int(record.used))
        return self._request("token", (token_id, row))

    def write(self, change: StoreWrite) -> Deferred:
        """
        Commit ``change`` (with whatever writes are queued beside it); fires with its
        revision when durable.
        """
        try:
            rows = _encode(change)
        except Exception as e:
            return fail(StoreError(f"{self.path}: cannot store {change!r}: {e}"))
        return self._request("write", rows)

    def close(self) -> Deferred:
        """Commit what is queued, stop the writer thread and close the file; idempotent."""
        waiting: Deferred = Deferred()
        if self._closing is None:
            self._closing = waiting
            self._submit("close", None, [waiting])
        elif self._done:
            waiting.callback(None)
        else:
            self._closed.append(waiting)
        return waiting

    def _request(self, kind: str, payload: Any) -> Deferred:
        if self._closing is not None:
            return fail(StoreError(f"{self.path}: the configuration store is closed."))
        waiting: Deferred = Deferred()
        self._submit(kind, payload, [waiting])
        return waiting

    def _submit(self, kind: str, payload: Any, waiting: list[Deferred]) -> None:
        self._pending.append(_Job(kind, payload, waiting))
        if not (self._busy or self._delivering):
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand the next job to the thread; consecutive pending writes become one batch."""
        if not self._pending:
            return
        job = self._pending.popleft()
        if job.kind == "write":
            batch, waiting = [job.payload], list(job.waiting)
            while (self._pending and self._pending[0].kind == "write"
                   and len(batch) < MAX_BATCH):
                following = self._pending.popleft()
                batch.append(following.payload)
                waiting.extend(following.waiting)
            job = _Job("write", batch, waiting)
        self._busy = True
        self._jobs.put(job)

    def _finished(self, job: _Job, result: Any) -> None:
        """
        In the reactor thread: report ``job``'s result. Jobs that waited during it leave
        at once; if none did, what its callbacks submit leaves together once they have
        all run, so writers that write again on success share one transaction.
        """
        self._busy = False
        self._dispatch()
        self._delivering = True
        try:
            if job.kind == "close":
                self._thread.join()
                self._done = True
                closed, self._closed = self._closed, []
                for waiting in closed:
                    waiting.callback(None)
            if isinstance(result, Failure):
                for waiting in job.waiting:
                    waiting.errback(result)
            elif job.kind == "write":
                # One revision per write, in the order of the Deferreds waiting for them.
                for waiting, revision in zip(job.waiting, result):
                    waiting.callback(revision)
            else:
                for waiting in job.waiting:
                    waiting.callback(result)
        finally:
            self._delivering = False
        if not self._busy:
            self._dispatch()

    def _run(self) -> None:
        """The writer thread: run jobs one by one until the store is closed."""
        while True:
            job = self._jobs.get()
            try:
                result = getattr(self, "_do_" + job.kind)(job.payload)
            except (StoreError, HistoryGone):
                result = Failure()
            except Exception as e:
                result = Failure(StoreError(f"{self.path}: unexpected error: {e!r}"))
            self._reactor.callFromThread(self._finished, job, result)
            if job.kind == "close":
                return

    def _do_open(self, _: None) -> None:
        try:
            _prepare_folder(os.path.dirname(self.path) or ".")
            self._lock_fd = _lock(self.path)
            if not os.path.lexists(self.path):
                _create(self.path, self._migrations)
            self._db = _connect(self.path, self._migrations)
        except Exception as e:
            self._open_error = _translate_open_error(self.path, e)
            self._unlock()

    def _usable(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(str(self._open_error or
                                 f"{self.path}: the configuration store is not open."))
        return self._db

    def _do_check(self, _: None) -> None:
        self._usable()

    def _do_load(self, _: None) -> StoreSnapshot:
        # The garbage collector is the process's: whoever loads decides whether it runs
        # (pyflock-control's main turns it off while it loads).
        db = self._usable()
        try:
            return _read(db, self.path)
        except sqlite3.Error as e:
            raise _damaged(self.path, f"reading failed: {e}") from e

    def _do_changes(self, since: int) -> StoreChanges:
        db = self._usable()
        try:
            return _read_changes(db, self.path, since)
        except sqlite3.Error as e:
            raise _damaged(self.path, f"reading the changes failed: {e}") from e

    def _do_tokens(self, _: None) -> tuple[TokenRecord, ...]:
        db = self._usable()
        try:
            return _read_tokens(db, self.path)
        except sqlite3.Error as e:
            raise _damaged(self.path, f"reading the join tokens failed: {e}") from e

    def _do_token(self, payload: tuple[str, Optional[tuple]]) -> None:
        db = self._usable()
        try:
            _write_token(db, *payload)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: writing a join token failed ({e}); it was "
                             f"not changed.") from e

    def _do_write(self, batch: list[_Rows]) -> list[int]:
        db = self._usable()
        self.transactions += 1
        try:
            db.execute("BEGIN IMMEDIATE")
            revisions = _apply(db, batch, self._retained)
            db.execute("COMMIT")
            return revisions
        except Exception as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise StoreError(f"{self.path}: writing the configuration failed ({e}); none "
                             f"of the {len(batch)} change(s) in this transaction was "
                             f"applied.") from e

    def _do_close(self, _: None) -> None:
        try:
            if self._db is not None:
                self._db.close()
                self._db = None
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def store_path(data_path: str | os.PathLike) -> str:
    """The configuration store's file inside the control service's data path."""
    return os.path.join(os.fspath(data_path), FILENAME)


def open_sqlite_store(reactor: Any, data_path: str | os.PathLike,
                      retained: int = RETAINED_REVISIONS) -> Deferred:
    """
    Open (or create) the store in ``data_path``, keeping ``retained`` revisions of
    history; fires with a ``SQLiteConfigurationStore`` or fails with ``StoreError`` when
    the store cannot be used.
    """
    store = SQLiteConfigurationStore(store_path(data_path), reactor, retained=retained)

    async def opening() -> SQLiteConfigurationStore:
        try:
            await store.opened()
        except StoreError:
            await store.close()
            raise
        return store

    return Deferred.fromCoroutine(opening())


def backup(data_path: str | os.PathLike, destination: str | os.PathLike) -> None:
    """
    Copy the store in ``data_path`` to the new file ``destination``: a consistent snapshot,
    safe while pyflock-control runs. Raises ``StoreError`` saying what went wrong.
    """
    source = store_path(data_path)
    destination = os.path.abspath(os.fspath(destination))
    if not os.path.isfile(source):
        raise StoreError(f"{source}: there is no configuration store here. Check --data-path "
                         f"(it names the control service's data folder).")
    if os.path.lexists(destination):
        raise StoreError(f"{destination} already exists; a backup never overwrites a file. "
                         f"Choose a new file name.")
    folder = os.path.dirname(destination)
    if not os.path.isdir(folder):
        raise StoreError(f"{destination}: the folder {folder} does not exist. Create it or "
                         f"choose another destination.")
    try:
        fd, scratch = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(destination),
                                       suffix=".partial")
    except OSError as e:
        raise StoreError(f"{destination}: cannot write in {folder} ({e.strerror}).") from e
    os.close(fd)
    lock_fd = None
    try:
        lock_fd, mode = _backup_lock(source)
        try:
            src = sqlite3.connect(_uri(source, mode), uri=True, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as e:
            raise _translate_open_error(source, e) from e
        try:
            copy = sqlite3.connect(scratch, isolation_level=None)
            try:
                try:
                    version = src.execute("PRAGMA user_version").fetchone()[0]
                    application_id = src.execute("PRAGMA application_id").fetchone()[0]
                    src.backup(copy)
                except sqlite3.Error as e:
                    raise _translate_open_error(source, e) from e
                # A backup must be one self-contained file: leave WAL mode.
                copy.execute("PRAGMA journal_mode = DELETE")
                problems = [row[0] for row in copy.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise _damaged(source, "integrity check of the copy failed: "
                                   + "; ".join(problems))
                if version == 0 or application_id != APPLICATION_ID:
                    raise StoreError(f"{source} is not a pyflock configuration store; "
                                     f"nothing was backed up.")
                # Restored, it starts a line of revisions of its own (an older store has
                # no id yet; it gets one when it is upgraded).
                if version >= 2:
                    copy.execute("UPDATE meta SET value = ? WHERE key = 'store_id'",
                                 (new_store_id(),))
            finally:
                copy.close()
        finally:
            src.close()
        _fsync(scratch)
        try:
            os.link(scratch, destination)
        except FileExistsError:
            raise StoreError(f"{destination} already exists; a backup never overwrites a "
                             f"file. Choose a new file name.") from None
        except OSError as e:
            raise StoreError(f"{destination}: cannot create the backup ({e.strerror}).") from e
        _fsync(folder, directory=True)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        for suffix in ("", "-journal", "-wal", "-shm"):
            if os.path.lexists(scratch + suffix):
                os.unlink(scratch + suffix)


def _backup_lock(source: str) -> tuple[Optional[int], str]:
    """
    Keep pyflock-control from opening ``source`` during a backup if it is not running, and
    say how to open the file. While it runs, its -wal and -shm files exist and a read-only
    connection shares them; when it does not, a read-write connection removes the ones it
    creates on closing, so a backup by root never leaves root-owned files behind.
    """
    try:
        fd = os.open(source + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "rw"
    except OSError as e:
        raise _unopenable(source, f"cannot open its lock file: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, "ro"
    return fd, "rw"
