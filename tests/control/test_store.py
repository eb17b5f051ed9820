"""
Tests for the configuration stores: the shared contract on the in-memory and SQLite stores,
and the SQLite store's own promises (group commit, rollback, refusing damaged files,
migrations, online backup, durability across kill -9).
"""

from __future__ import annotations

import gc
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._sqlite_store import (
    APPLICATION_ID, FILENAME, MIGRATIONS, SCHEMA_VERSION, SQLiteConfigurationStore, backup,
    open_sqlite_store, store_path,
)
from pyflock.control._store import (
    RETAINED_REVISIONS, HistoryGone, MemoryConfigurationStore, StoreError, StoreWrite,
    apply_write,
)
from tests.harness.files import unwritable
from tests.contracts.store import (
    NODE_A, dataset_id, loaded, make_iconfigurationstore_tests, memory_store_opener,
    sample_change, sample_token, using,
)


def _reactor():
    from twisted.internet import reactor
    return reactor


def sqlite_store_opener(folder, retained: int = RETAINED_REVISIONS):
    """An opener of SQLite stores kept in ``folder``/control (created on first open)."""
    return lambda: open_sqlite_store(_reactor(), folder / "control", retained)


TestMemoryStoreContract = make_iconfigurationstore_tests(memory_store_opener)
TestSQLiteStoreContract = make_iconfigurationstore_tests(sqlite_store_opener)


def one_dataset(n: int, generation: int = None) -> StoreWrite:
    """A write creating dataset number ``n``, with generation ``n`` unless given."""
    dataset = Dataset(dataset_id=dataset_id(n), primary=NODE_A, metadata={"name": f"v{n}"})
    return StoreWrite(datasets=((dataset.dataset_id, dataset),),
                      generation=n if generation is None else generation)


def open_database(path) -> sqlite3.Connection:
    """A plain connection to a store's file, as a person with the sqlite3 shell would have."""
    return sqlite3.connect(str(path), isolation_level=None)


async def stored(folder) -> Configuration:
    """The configuration stored in the data folder ``folder``."""
    snapshot = await using(lambda: open_sqlite_store(_reactor(), folder), lambda s: s.load())
    return snapshot.configuration


async def refusal(folder) -> str:
    """The message of the ``StoreError`` that opening the store in ``folder`` fails with."""
    with pytest.raises(StoreError) as raised:
        store = await open_sqlite_store(_reactor(), folder)
        await store.close()
    return str(raised.value)


async def make_store(folder, datasets: int = 300) -> None:
    """Create a closed store in ``folder`` holding ``datasets`` datasets."""
    await using(lambda: open_sqlite_store(_reactor(), folder),
                lambda s: s.write(StoreWrite(
                    datasets=tuple((dataset_id(n), one_dataset(n).datasets[0][1])
                                   for n in range(datasets)), generation=datasets)))


def _result(d):
    """The result of the already fired Deferred ``d``, raising its failure."""
    results = []
    d.addBoth(results.append)
    [result] = results
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


_ROW_WRITES = st.lists(st.lists(st.tuples(
    st.integers(0, 4), st.booleans(), st.sampled_from([None, 1.0, 2.5])), max_size=3),
    min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(writes=_ROW_WRITES, retained=st.integers(1, 30))
def test_memory_feed_replays_any_history(writes, retained):
    """
    For any history of writes (datasets created, changed, removed; leases taken, renewed,
    dropped) the memory store's feed since every kept revision brings that revision's
    configuration up to date, and every older revision is ``HistoryGone``.
    """
    store = MemoryConfigurationStore(retained=retained)
    history = [(store.config, store.revision)]
    for generation, rows in enumerate(writes, 1):
        datasets, leases = [], []
        for n, present, expiration in rows:
            dataset = Dataset(dataset_id=dataset_id(n), primary=NODE_A,
                              metadata={"step": str(generation)})
            datasets.append((dataset.dataset_id, dataset if present else None))
            leases.append((dataset.dataset_id, None if expiration is None else Lease(
                dataset_id=dataset.dataset_id, node_uuid=NODE_A, expiration=expiration)))
        revision = _result(store.write(StoreWrite(tuple(datasets), tuple(leases),
                                                  generation)))
        history.append((store.config, revision))
    for config, revision in history:
        if revision >= store.revision - retained:
            changes = _result(store.changes_since(revision))
            assert apply_write(config, changes.change) == store.config
        else:
            with pytest.raises(HistoryGone):
                _result(store.changes_since(revision))


@pytest_twisted.ensureDeferred
async def test_sqlite_feed_matches_memory(tmp_path):
    """
    Over random histories (seeded), the SQLite store answers ``load`` and every
    ``changes_since`` as the memory store does, with the same rows and revisions.
    """
    rng = random.Random(7)
    for attempt in range(8):
        retained = rng.randint(1, 12)
        memory = MemoryConfigurationStore(retained=retained)
        sqlite = await open_sqlite_store(_reactor(), tmp_path / str(attempt), retained)
        try:
            for generation in range(1, rng.randint(2, 30)):
                ids = [dataset_id(rng.randint(0, 5)) for _ in range(rng.randint(0, 3))]
                change = StoreWrite(
                    datasets=tuple((i, rng.choice([None, Dataset(
                        dataset_id=i, primary=NODE_A, metadata={"g": str(generation)})]))
                        for i in ids),
                    leases=tuple((i, rng.choice([None, Lease(
                        dataset_id=i, node_uuid=NODE_A, expiration=float(generation))]))
                        for i in ids),
                    generation=generation)
                assert await sqlite.write(change) == _result(memory.write(change))
            snapshot = await sqlite.load()
            assert (snapshot.configuration, snapshot.revision) == (memory.config,
                                                                   memory.revision)
            for since in range(-1, memory.revision + 2):
                try:
                    expected = _result(memory.changes_since(since))
                except HistoryGone:
                    with pytest.raises(HistoryGone):
                        await sqlite.changes_since(since)
                    continue
                got = await sqlite.changes_since(since)
                assert (sorted(got.change.datasets), sorted(got.change.leases),
                        got.change.generation, got.revision) == (
                    sorted(expected.change.datasets), sorted(expected.change.leases),
                    expected.change.generation, expected.revision)
        finally:
            await sqlite.close()


@pytest_twisted.ensureDeferred
async def test_new_store_layout(tmp_path):
    """A missing data folder is created with mode 0700; the file is WAL with synchronous FULL."""
    folder = tmp_path / "a" / "control"
    store = await open_sqlite_store(_reactor(), folder)
    try:
        assert os.stat(folder).st_mode & 0o777 == 0o700
        db = open_database(folder / FILENAME)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        finally:
            db.close()
        assert store.path == store_path(folder)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_rows_per_dataset(tmp_path):
    """Each dataset and lease is one row with typed columns; a write touches only its rows."""
    await using(sqlite_store_opener(tmp_path), lambda s: s.write(sample_change()))
    db = open_database(tmp_path / "control" / FILENAME)
    try:
        row = db.execute("SELECT primary_node, maximum_size, metadata, deleted, "
                         "typeof(maximum_size), typeof(deleted) FROM datasets "
                         "WHERE dataset_id = ?", (dataset_id(1),)).fetchone()
        assert row == (NODE_A, 1024 ** 3, '{"name":"pgdata","profile":"gold"}', 0,
                       "integer", "integer")
        assert db.execute("SELECT maximum_size FROM datasets WHERE dataset_id = ?",
                          (dataset_id(2),)).fetchone() == (None,)
        assert db.execute("SELECT expiration, typeof(expiration) FROM leases ORDER BY "
                          "dataset_id").fetchall() == [(1060.25, "real"), (None, "null")]
        assert db.execute("SELECT value FROM meta WHERE key = 'generation'"
                          ).fetchone() == (sample_change().generation,)
        db.execute("CREATE TABLE touched (dataset_id TEXT)")
        db.execute("CREATE TRIGGER t AFTER UPDATE ON datasets BEGIN "
                   "INSERT INTO touched VALUES (NEW.dataset_id); END")
    finally:
        db.close()
    moved = Dataset(dataset_id=dataset_id(2), primary=NODE_A)
    await using(sqlite_store_opener(tmp_path),
                lambda s: s.write(StoreWrite(datasets=((dataset_id(2), moved),),
                                             generation=50)))
    db = open_database(tmp_path / "control" / FILENAME)
    try:
        assert db.execute("SELECT dataset_id FROM touched").fetchall() == [(dataset_id(2),)]
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_group_commit(tmp_path):
    """
    Writes queued while a commit is in progress share the next transaction: of 50 writes
    submitted at once to an idle store, the first commits alone and the other 49 together.
    """
    store = await open_sqlite_store(_reactor(), tmp_path)
    try:
        submitted = Deferred()
        _reactor().callLater(0, lambda: submitted.callback(
            [store.write(one_dataset(n)) for n in range(50)]))
        results = await gatherResults(await submitted)
        assert results == list(range(1, 51))
        assert store.transactions == 2
        config = (await store.load()).configuration
        assert set(config.datasets) == {dataset_id(n) for n in range(50)}
        assert config.generation == 49
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_group_commit_from_callbacks(tmp_path):
    """Writes submitted from the callbacks of a committed batch go together in one more."""
    store = await open_sqlite_store(_reactor(), tmp_path)
    try:
        first = store.write(one_dataset(0))
        later = []
        first.addCallback(lambda _: later.extend(store.write(one_dataset(n))
                                                 for n in range(1, 10)))
        await first
        await gatherResults(later)
        assert store.transactions == 2
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_failed_transaction(tmp_path):
    """
    When a transaction fails, every write in it fails with ``StoreError`` and none of them
    is applied; writes in other transactions are unaffected and the store keeps working.
    """
    store = await open_sqlite_store(_reactor(), tmp_path)
    try:
        db = open_database(store.path)
        try:
            db.execute("CREATE TRIGGER poison BEFORE INSERT ON datasets "
                       f"WHEN NEW.dataset_id = '{dataset_id(2)}' "
                       "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
        finally:
            db.close()
        revision = await store.write(one_dataset(0))
        before = store.transactions
        together = [store.write(one_dataset(n)) for n in (1, 2, 3)]
        for write in together:
            with pytest.raises(StoreError) as raised:
                await write
            assert store.path in str(raised.value)
            assert "poisoned row" in str(raised.value)
        assert store.transactions == before + 1
        snapshot = await store.load()
        assert set(snapshot.configuration.datasets) == {dataset_id(0)}
        assert (snapshot.configuration.generation, snapshot.revision) == (0, revision)
        assert (await store.changes_since(revision)).change.datasets == ()
        assert await store.write(one_dataset(4)) == revision + 1
        assert set((await store.load()).configuration.datasets) == {dataset_id(0),
                                                                    dataset_id(4)}
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_closed_store(tmp_path):
    """After ``close``, writes and loads fail with ``StoreError`` and ``close`` again succeeds."""
    store = await open_sqlite_store(_reactor(), tmp_path)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.write(one_dataset(0))
    with pytest.raises(StoreError, match="closed"):
        await store.load()
    assert await store.close() is None


@pytest_twisted.ensureDeferred
async def test_one_process_at_a_time(tmp_path):
    """A store already open is refused to a second opener, and usable again once closed."""
    store = await open_sqlite_store(_reactor(), tmp_path)
    try:
        message = await refusal(tmp_path)
        assert store.path in message and "another process" in message
    finally:
        await store.close()
    assert await stored(tmp_path) == Configuration()


@pytest_twisted.ensureDeferred
async def test_constructor_reports_open_failure(tmp_path):
    """A store constructed on a damaged file fails ``opened``, ``load`` and ``write`` alike."""
    (tmp_path / FILENAME).write_bytes(b"not a database" * 1000)
    store = SQLiteConfigurationStore(tmp_path / FILENAME, _reactor())
    try:
        for attempt in (store.opened(), store.load(), store.write(one_dataset(0))):
            with pytest.raises(StoreError, match="damaged"):
                await attempt
    finally:
        await store.close()


def _zero_page_headers(path):
    """Zero the header of every page but the first, as a failing disk might."""
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        for offset in range(4096, size, 4096):
            f.seek(offset)
            f.write(b"\0" * 12)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 64)


def _empty(path):
    with open(path, "wb"):
        pass


@pytest.mark.parametrize("damage", [_zero_page_headers, _truncate, _garbage, _empty])
@pytest_twisted.ensureDeferred
async def test_damaged_file_refused(tmp_path, damage):
    """A damaged store is refused naming the file and the restore, never opened empty."""
    await make_store(tmp_path)
    damage(tmp_path / FILENAME)
    message = await refusal(tmp_path)
    assert str(tmp_path / FILENAME) in message
    assert "damaged" in message and "pyflock-control backup" in message


@pytest_twisted.ensureDeferred
async def test_damaged_record_refused(tmp_path):
    """A row the model cannot read fails ``load`` naming the file and the dataset."""
    await make_store(tmp_path, datasets=3)
    db = open_database(tmp_path / FILENAME)
    try:
        db.execute("UPDATE datasets SET metadata = '[1, 2]' WHERE dataset_id = ?",
                   (dataset_id(1),))
    finally:
        db.close()
    with pytest.raises(StoreError) as raised:
        await stored(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / FILENAME) in message and dataset_id(1) in message
    assert "pyflock-control backup" in message


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(tmp_path):
    """A store from a newer schema is refused naming the file and both versions."""
    await make_store(tmp_path, datasets=1)
    db = open_database(tmp_path / FILENAME)
    try:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    finally:
        db.close()
    message = await refusal(tmp_path)
    assert str(tmp_path / FILENAME) in message
    assert f"version {SCHEMA_VERSION + 7}" in message and f"to {SCHEMA_VERSION}" in message


@pytest_twisted.ensureDeferred
async def test_foreign_database_refused(tmp_path):
    """An SQLite database that is not a pyflock store is refused, and left untouched."""
    db = open_database(tmp_path / FILENAME)
    try:
        db.execute("CREATE TABLE recipes (name TEXT)")
    finally:
        db.close()
    before = (tmp_path / FILENAME).read_bytes()
    message = await refusal(tmp_path)
    assert str(tmp_path / FILENAME) in message and "not a pyflock" in message
    assert (tmp_path / FILENAME).read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_data_path_is_a_file(tmp_path):
    """A data path that is a file is refused, naming it."""
    (tmp_path / "control").write_text("oops")
    message = await refusal(tmp_path / "control")
    assert str(tmp_path / "control") in message and "not a folder" in message


@pytest_twisted.ensureDeferred
async def test_store_file_is_a_folder(tmp_path):
    """A folder where the store file should be is refused, naming it."""
    (tmp_path / FILENAME).mkdir()
    message = await refusal(tmp_path)
    assert str(tmp_path / FILENAME) in message and "is a folder" in message


@pytest_twisted.ensureDeferred
async def test_unwritable_file_refused(tmp_path):
    """A store file that cannot be written is refused at open, naming it and the fix."""
    await make_store(tmp_path, datasets=1)
    path = tmp_path / FILENAME
    with unwritable(path):
        message = await refusal(tmp_path)
    assert str(path) in message and "readable and writable" in message


@pytest_twisted.ensureDeferred
async def test_migrate_from_version_0(tmp_path):
    """An SQLite file without tables and at user_version 0 is given the current schema."""
    db = open_database(tmp_path / FILENAME)
    try:
        db.execute("CREATE TABLE scratch (x)")
        db.execute("DROP TABLE scratch")
    finally:
        db.close()
    assert (tmp_path / FILENAME).stat().st_size > 0
    assert await stored(tmp_path) == Configuration()
    await using(lambda: open_sqlite_store(_reactor(), tmp_path),
                lambda s: s.write(sample_change()))
    assert await stored(tmp_path) == apply_write(Configuration(), sample_change())


def _version_1_by_hand(path):
    """A store as version 1 wrote it, made with SQL rather than with this code's migrations."""
    db = open_database(path)
    try:
        db.execute("CREATE TABLE datasets (dataset_id TEXT PRIMARY KEY NOT NULL, "
                   "primary_node TEXT NOT NULL, maximum_size INTEGER, metadata TEXT NOT NULL,"
                   " deleted INTEGER NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE leases (dataset_id TEXT PRIMARY KEY NOT NULL, "
                   "node_uuid TEXT NOT NULL, expiration REAL) WITHOUT ROWID")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value NOT NULL) "
                   "WITHOUT ROWID")
        db.execute("INSERT INTO meta VALUES ('generation', 12)")
        db.execute("INSERT INTO datasets VALUES (?, ?, NULL, '{\"name\":\"old\"}', 0)",
                   (dataset_id(1), NODE_A))
        db.execute("INSERT INTO datasets VALUES (?, ?, 67108864, '{}', 1)",
                   (dataset_id(2), NODE_A))
        db.execute("INSERT INTO leases VALUES (?, ?, 99.5)", (dataset_id(1), NODE_A))
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 1")
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_version_1_reads(tmp_path):
    """A version 1 store written by hand loads with this code, values intact."""
    _version_1_by_hand(tmp_path / FILENAME)
    config = await stored(tmp_path)
    assert config.generation == 12
    assert config.datasets[dataset_id(1)] == Dataset(
        dataset_id=dataset_id(1), primary=NODE_A, metadata={"name": "old"})
    assert config.datasets[dataset_id(2)].deleted
    assert config.datasets[dataset_id(2)].maximum_size == 64 * 1024 * 1024
    assert config.leases[dataset_id(1)] == Lease(dataset_id=dataset_id(1), node_uuid=NODE_A,
                                                 expiration=99.5)


@pytest_twisted.ensureDeferred
async def test_older_deleted_datasets_are_not_retained(tmp_path):
    """Upgraded to schema 4, an older store's deleted datasets keep no data: theirs was
    already going; its live ones have nothing retained; a retained one is then kept."""
    _version_1_by_hand(tmp_path / FILENAME)
    config = await stored(tmp_path)
    assert config.datasets[dataset_id(2)].purging
    assert config.datasets[dataset_id(1)].retained_until is None
    binned = config.delete(5.0, dataset_id(1), NODE_A, retain_until=3605.0)
    await using(lambda: open_sqlite_store(_reactor(), tmp_path),
                lambda store: store.write(StoreWrite.of(binned, [dataset_id(1)])))
    assert (await stored(tmp_path)).datasets[dataset_id(1)].retained_until == 3605.0


@pytest_twisted.ensureDeferred
async def test_version_1_gains_tokens(tmp_path):
    """A version 1 store, upgraded, keeps no join token yet and then keeps one."""
    _version_1_by_hand(tmp_path / FILENAME)
    token = sample_token("0123456789abcdef")

    async def upgrade(store):
        assert tuple(await store.load_tokens()) == ()
        await store.write_token(token.token_id, token)
    await using(lambda: open_sqlite_store(_reactor(), tmp_path), upgrade)
    tokens = await using(lambda: open_sqlite_store(_reactor(), tmp_path),
                         lambda store: store.load_tokens())
    assert list(tokens) == [token]
    assert (await stored(tmp_path)).generation == 12


@pytest_twisted.ensureDeferred
async def test_migrations_run_in_order(tmp_path):
    """Opening an older store runs the missing migrations in order, keeping its data."""
    _version_1_by_hand(tmp_path / FILENAME)
    ran = []

    def later_1(db):
        ran.append(1)
        db.execute("ALTER TABLE datasets ADD COLUMN created REAL")

    def later_2(db):
        ran.append(2)
        db.execute("UPDATE datasets SET created = 1.5")

    store = SQLiteConfigurationStore(tmp_path / FILENAME, _reactor(),
                                     migrations=MIGRATIONS + (later_1, later_2))
    try:
        await store.opened()
        config = (await store.load()).configuration
    finally:
        await store.close()
    assert ran == [1, 2]
    assert config.generation == 12 and set(config.datasets) == {dataset_id(1),
                                                                 dataset_id(2)}
    db = open_database(tmp_path / FILENAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 2
        assert db.execute("SELECT DISTINCT created FROM datasets").fetchall() == [(1.5,)]
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_failed_migration_changes_nothing(tmp_path):
    """A migration that fails leaves the store at its old version with its data."""
    _version_1_by_hand(tmp_path / FILENAME)

    def failing(db):
        db.execute("ALTER TABLE datasets ADD COLUMN created REAL")
        db.execute("SELECT no_such_function()")

    store = SQLiteConfigurationStore(tmp_path / FILENAME, _reactor(),
                                     migrations=MIGRATIONS + (failing,))
    try:
        with pytest.raises(StoreError) as raised:
            await store.opened()
    finally:
        await store.close()
    assert str(tmp_path / FILENAME) in str(raised.value)
    assert f"from schema version 1 to {SCHEMA_VERSION + 1} failed" in str(raised.value)
    db = open_database(tmp_path / FILENAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "created" not in [c[1] for c in db.execute("PRAGMA table_info(datasets)")]
        assert db.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'changes'"
                          ).fetchone() == (0,)
    finally:
        db.close()
    assert (await stored(tmp_path)).generation == 12


@pytest_twisted.ensureDeferred
async def test_upgrade_from_version_1(tmp_path):
    """
    A version 1 store is upgraded to the current schema: what it held is revision 0, the
    first write after is revision 1 and the feed since 0 holds only that write's rows;
    the revision survives a restart.
    """
    _version_1_by_hand(tmp_path / FILENAME)
    def opener():
        return open_sqlite_store(_reactor(), tmp_path)

    before = await using(opener, lambda s: s.load())
    assert before.revision == 0 and set(before.configuration.datasets) == {
        dataset_id(1), dataset_id(2)}
    assert before.store_id
    with pytest.raises(HistoryGone):
        await using(opener, lambda s: s.changes_since(-1))
    assert await using(opener, lambda s: s.write(one_dataset(5, generation=13))) == 1

    async def after_restart(store):
        return await store.load(), await store.changes_since(0)

    snapshot, changes = await using(opener, after_restart)
    assert snapshot.revision == changes.revision == 1
    assert snapshot.store_id == changes.store_id == before.store_id
    assert changes.change == one_dataset(5, generation=13)
    assert snapshot.configuration == apply_write(before.configuration, changes.change)
    db = open_database(tmp_path / FILENAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_history_pruned_by_the_writer(tmp_path):
    """
    Keeping 10 revisions, the change index holds only the rows that exist plus those
    removed in the last 10 revisions, however many were removed before.
    """
    async def churn(store):
        for n in range(200):
            await store.write(one_dataset(n))
            await store.write(StoreWrite(datasets=((dataset_id(n), None),), generation=n))
        await store.write(one_dataset(1000))
        return await store.load()

    snapshot = await using(sqlite_store_opener(tmp_path, retained=10), churn)
    assert snapshot.revision == 401
    db = open_database(tmp_path / "control" / FILENAME)
    try:
        assert db.execute("SELECT count(*), min(revision) FROM changes").fetchone() == (
            6, 392)
        assert db.execute("SELECT value FROM meta WHERE key = 'compacted'"
                          ).fetchone() == (391,)
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_load_leaves_the_garbage_collector_alone(tmp_path, monkeypatch):
    """
    Loading never turns the process's garbage collector off or on from the writer thread:
    that is for the program to decide (pyflock-control's main does, while it loads).
    """
    await make_store(tmp_path, datasets=300)
    calls = []
    monkeypatch.setattr(gc, "disable", lambda: calls.append("disable"))
    monkeypatch.setattr(gc, "enable", lambda: calls.append("enable"))
    config = await stored(tmp_path)
    assert len(config.datasets) == 300
    assert calls == []


@pytest_twisted.ensureDeferred
async def test_backup_while_writing(tmp_path):
    """
    A backup taken while writes are in flight is an openable store holding exactly the
    writes of some committed prefix; the store keeps working meanwhile.
    """
    await make_store(tmp_path / "control", datasets=0)
    store = await open_sqlite_store(_reactor(), tmp_path / "control")
    try:
        writes = [store.write(one_dataset(n, generation=n + 1)) for n in range(2000)]
        copied = deferToThread(backup, tmp_path / "control", tmp_path / "copy.sqlite3")
        writes += [store.write(one_dataset(n, generation=n + 1)) for n in range(2000, 2500)]
        await copied
        await gatherResults(writes)
        assert (await store.load()).configuration.generation == 2500
    finally:
        await store.close()
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "copy.sqlite3", restored / FILENAME)
    config = await stored(restored)
    assert set(config.datasets) == {dataset_id(n) for n in range(config.generation)}


@pytest_twisted.ensureDeferred
async def test_backup_of_stopped_store(tmp_path):
    """A backup of a store nobody has open copies it and leaves no files behind."""
    await using(sqlite_store_opener(tmp_path), lambda s: s.write(sample_change()))
    before = sorted(os.listdir(tmp_path / "control"))
    await deferToThread(backup, tmp_path / "control", tmp_path / "copy.sqlite3")
    assert sorted(os.listdir(tmp_path / "control")) == before
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "copy.sqlite3", restored / FILENAME)
    assert await stored(restored) == apply_write(Configuration(), sample_change())


@pytest_twisted.ensureDeferred
async def test_restored_backup_has_a_store_id_of_its_own(tmp_path):
    """
    A backup's copy, restored, holds the same revision under a new store id, so that a
    revision from the lost store is not taken for one of the restored store.
    """
    await using(sqlite_store_opener(tmp_path), lambda s: s.write(sample_change()))
    original = await using(sqlite_store_opener(tmp_path), lambda s: s.load())
    await deferToThread(backup, tmp_path / "control", tmp_path / "copy.sqlite3")
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "copy.sqlite3", restored / FILENAME)
    copy = await using(lambda: open_sqlite_store(_reactor(), restored), lambda s: s.load())
    assert (copy.configuration, copy.revision) == (original.configuration, original.revision)
    assert copy.store_id != original.store_id
    again = await using(sqlite_store_opener(tmp_path), lambda s: s.load())
    assert again.store_id == original.store_id


def test_backup_refusals(tmp_path):
    """A backup never overwrites, and says what is wrong with its source or destination."""
    with pytest.raises(StoreError, match="no configuration store"):
        backup(tmp_path, tmp_path / "copy")
    (tmp_path / FILENAME).write_bytes(b"\0" * 8192)
    with pytest.raises(StoreError, match="damaged|not a pyflock"):
        backup(tmp_path, tmp_path / "copy")
    (tmp_path / "exists").write_text("keep me")
    with pytest.raises(StoreError, match="already exists"):
        backup(tmp_path, tmp_path / "exists")
    assert (tmp_path / "exists").read_text() == "keep me"
    with pytest.raises(StoreError, match="does not exist"):
        backup(tmp_path, tmp_path / "missing" / "copy")
    assert sorted(os.listdir(tmp_path)) == [FILENAME, "exists"]


_CRASH_WRITER = r"""
import sys
from twisted.internet import defer, task
from pyflock.common._model import Dataset
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import StoreWrite

async def main(reactor, folder):
    reactor.callLater(60, reactor.stop)  # never outlive a test that forgot us
    store = await open_sqlite_store(reactor, folder)
    submitted = 0

    async def writer():
        nonlocal submitted
        while True:
            submitted += 1
            ident = f"crash-{submitted:07d}"
            revision = await store.write(StoreWrite(
                datasets=((ident, Dataset(dataset_id=ident, primary="node")),),
                generation=submitted))
            sys.stdout.write(f"{ident} {revision}\n")
            sys.stdout.flush()

    await defer.gatherResults([defer.Deferred.fromCoroutine(writer()) for _ in range(8)])

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1])))
"""


def _acknowledged_then_kill(folder, wanted: int) -> list[str]:
    """Run the crash writer, SIGKILL it once ``wanted`` writes are acknowledged; all acks."""
    child = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while output.count(b"\n") < wanted:
            ready, _, _ = select.select([child.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(child.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"the writer stopped early: {child.stderr.read()!r}")
            output += chunk
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        output += child.stdout.read()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    # Only whole lines were acknowledged; a torn last line was still being printed.
    return output.decode().split("\n")[:-1]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_acknowledged_writes_survive_kill(tmp_path):
    """
    Every write acknowledged before the process is killed with SIGKILL is stored, and the
    store's revision is at least the last one acknowledged.
    """
    lines = _acknowledged_then_kill(tmp_path, wanted=400)
    assert len(lines) >= 400
    acknowledged = dict(line.split(" ") for line in lines)
    snapshot = await using(lambda: open_sqlite_store(_reactor(), tmp_path), lambda s: s.load())
    config = snapshot.configuration
    assert set(acknowledged) <= set(config.datasets)
    assert config.generation >= max(int(i.split("-")[1]) for i in acknowledged)
    assert snapshot.revision >= max(int(r) for r in acknowledged.values())


@pytest_twisted.ensureDeferred
async def test_many_datasets(tmp_path):
    """Ten thousand datasets with leases load back equal to what was written."""
    config = Configuration()
    datasets = {}
    for n in range(10_000):
        datasets[dataset_id(n)] = Dataset(dataset_id=dataset_id(n), primary=NODE_A,
                                          maximum_size=1024 ** 3,
                                          metadata={"name": f"v{n}", "profile": "gold"})
    config = Configuration.from_records(
        datasets.values(),
        [Lease(dataset_id=dataset_id(n), node_uuid=NODE_A, expiration=float(n))
         for n in range(0, 10_000, 10)], 10_000)
    change = StoreWrite.of(config, datasets)
    await using(sqlite_store_opener(tmp_path), lambda s: s.write(change))
    assert await using(sqlite_store_opener(tmp_path), loaded) == config
