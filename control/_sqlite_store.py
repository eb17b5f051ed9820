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
  deleted 0/1)``
- ``leases(dataset_id, node_uuid, expiration REAL|NULL)``: absolute seconds since the epoch
- ``meta(key, value)``: ``generation``

To restore a backup, stop pyflock-control, remove ``configuration.sqlite3`` and its
``-wal``/``-shm`` files, and copy the backup file to ``configuration.sqlite3``.
"""

from __future__ import annotations

import errno
import fcntl
import gc
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
from pyrsistent import pmap
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from pyflock.common._files import fsync_path as _fsync
from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._store import IConfigurationStore, StoreError, StoreWrite

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


#: ``MIGRATIONS[n]`` takes a store from schema version ``n`` to ``n + 1``; append only.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_1,)

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
            1 if d.deleted else 0))
        for dataset_id, d in change.datasets)
    leases = tuple(
        (dataset_id, None if lease is None else (
            dataset_id, lease.node_uuid, lease.expiration))
        for dataset_id, lease in change.leases)
    return _Rows(datasets=datasets, leases=leases, generation=int(change.generation))


_UPSERT_DATASET = """
    INSERT INTO datasets (dataset_id, primary_node, maximum_size, metadata, deleted)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (dataset_id) DO UPDATE SET primary_node = excluded.primary_node,
        maximum_size = excluded.maximum_size, metadata = excluded.metadata,
        deleted = excluded.deleted"""
_DELETE_DATASET = "DELETE FROM datasets WHERE dataset_id = ?"
_UPSERT_LEASE = """
    INSERT INTO leases (dataset_id, node_uuid, expiration) VALUES (?, ?, ?)
    ON CONFLICT (dataset_id) DO UPDATE SET node_uuid = excluded.node_uuid,
        expiration = excluded.expiration"""
_DELETE_LEASE = "DELETE FROM leases WHERE dataset_id = ?"
_SET_GENERATION = "UPDATE meta SET value = ? WHERE key = 'generation'"


def _apply(db: sqlite3.Connection, batch: Sequence[_Rows]) -> None:
    """Write ``batch`` in the open transaction; later writes to a row win, as in order."""
    datasets: dict[str, Optional[tuple]] = {}
    leases: dict[str, Optional[tuple]] = {}
    for rows in batch:
        datasets.update(rows.datasets)
        leases.update(rows.leases)
    db.executemany(_DELETE_DATASET, [(k,) for k, row in datasets.items() if row is None])
    db.executemany(_UPSERT_DATASET, [row for row in datasets.values() if row is not None])
    db.executemany(_DELETE_LEASE, [(k,) for k, row in leases.items() if row is None])
    db.executemany(_UPSERT_LEASE, [row for row in leases.values() if row is not None])
    if db.execute(_SET_GENERATION, (batch[-1].generation,)).rowcount != 1:
        raise sqlite3.DatabaseError("the generation row is missing from the meta table")


_MetadataMap = type(Dataset(dataset_id="", primary="").metadata)


def _metadata(text: str) -> Any:
    """
    Decode stored metadata into the checked map ``Dataset.metadata`` holds. Checking the
    types here and building the map from a plain one is what keeps loading 10,000
    datasets well under a second: pyrsistent's own conversion costs twice as much.
    """
    value = json.loads(text)
    if type(value) is not dict or not all(
            type(k) is str and type(v) is str for k, v in value.items()):
        raise ValueError(f"metadata must be a JSON object of strings, not {text!r}")
    plain = pmap(value)
    try:
        return _MetadataMap(plain._buckets, plain._size)
    except AttributeError:
        # Another pyrsistent whose internals differ: the slower, public way.
        return _MetadataMap.create(value)


def _read(db: sqlite3.Connection, path: str) -> Configuration:
    """Read the whole configuration in one read transaction."""
    db.execute("BEGIN")
    try:
        dataset_rows = db.execute(
            "SELECT dataset_id, primary_node, maximum_size, metadata, deleted "
            "FROM datasets").fetchall()
        lease_rows = db.execute(
            "SELECT dataset_id, node_uuid, expiration FROM leases").fetchall()
        generation = db.execute(
            "SELECT value FROM meta WHERE key = 'generation'").fetchone()
    finally:
        db.execute("COMMIT")
    if generation is None or not isinstance(generation[0], int):
        raise _damaged(path, "the generation is missing from the meta table")
    datasets = []
    for dataset_id, primary, maximum_size, metadata, deleted in dataset_rows:
        try:
            datasets.append(Dataset(dataset_id=dataset_id, primary=primary,
                                    maximum_size=maximum_size,
                                    metadata=_metadata(metadata), deleted=bool(deleted)))
        except Exception as e:
            raise _damaged(path, f"dataset {dataset_id!r} cannot be read: {e}") from e
    leases = []
    for dataset_id, node_uuid, expiration in lease_rows:
        try:
            leases.append(Lease(dataset_id=dataset_id, node_uuid=node_uuid,
                                expiration=expiration))
        except Exception as e:
            raise _damaged(path, f"the lease on {dataset_id!r} cannot be read: {e}") from e
    return Configuration.from_records(datasets, leases, generation[0])


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
                 migrations: Sequence[Callable[[sqlite3.Connection], None]] = MIGRATIONS):
        self.path = os.fspath(path)
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

    def write(self, change: StoreWrite) -> Deferred:
        """Commit ``change`` (with whatever writes are queued beside it); fires when durable."""
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
            for waiting in job.waiting:
                if isinstance(result, Failure):
                    waiting.errback(result)
                else:
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
            except StoreError:
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
            assert self._open_error is not None
            raise StoreError(str(self._open_error))
        return self._db

    def _do_check(self, _: None) -> None:
        self._usable()

    def _do_load(self, _: None) -> Configuration:
        db = self._usable()
        # Building tens of thousands of records sets off the cyclic collector again and
        # again, doubling the time a load takes; none of them can form a cycle.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _read(db, self.path)
        except sqlite3.Error as e:
            raise _damaged(self.path, f"reading failed: {e}") from e
        finally:
            if collecting:
                gc.enable()

    def _do_write(self, batch: list[_Rows]) -> None:
        db = self._usable()
        self.transactions += 1
        try:
            db.execute("BEGIN IMMEDIATE")
            _apply(db, batch)
            db.execute("COMMIT")
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


def open_sqlite_store(reactor: Any, data_path: str | os.PathLike) -> Deferred:
    """
    Open (or create) the store in ``data_path``; fires with a ``SQLiteConfigurationStore``
    or fails with ``StoreError`` when the store cannot be used.
    """
    store = SQLiteConfigurationStore(store_path(data_path), reactor)

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
