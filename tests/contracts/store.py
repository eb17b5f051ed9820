"""
The contract every ``IConfigurationStore`` keeps, written once and run against each store.

``make_iconfigurationstore_tests(make_opener)`` returns a pytest test class. ``make_opener``
takes a fresh folder (pytest's ``tmp_path``) and the number of revisions of history to
keep, and returns an *opener*: a function of no arguments returning a Deferred that fires
with a store over the same storage every time it is called. Tests close a store before
opening the next one, so "write, close, reopen, load" checks what the store really kept.
The tests run on the real reactor (``pytest_twisted.ensureDeferred``), so threaded stores
deliver their results for real.

Revisions are only assumed to increase strictly from write to write, never to be
consecutive, so that a store whose revisions are shared with other keys (etcd) passes too.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import attr
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults, succeed
from zope.interface.verify import verifyObject

from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.common._tokens import secret_hash
from pyflock.control._tokens import TokenRecord
from pyflock.control._store import (
    RETAINED_REVISIONS, HistoryGone, IConfigurationStore, MemoryConfigurationStore,
    StoreChanges, StoreSnapshot, StoreWrite, apply_write,
)

#: Makes an opener for the storage in a fresh folder, keeping so many revisions of history.
OpenerFactory = Callable[[Any, int], Callable[[], Deferred]]

NODE_A = "5c1d4a3e-0000-4000-8000-00000000000a"
NODE_B = "5c1d4a3e-0000-4000-8000-00000000000b"
GIB = 1024 * 1024 * 1024


def dataset_id(n: int) -> str:
    """A well-formed dataset id numbered ``n``."""
    return f"d{n:07d}-0000-4000-8000-000000000000"


def memory_store_opener(folder: Any,
                        retained: int = RETAINED_REVISIONS) -> Callable[[], Deferred]:
    """An opener of ``MemoryConfigurationStore``s that pass what they hold on."""
    opened: list[MemoryConfigurationStore] = []

    def opener() -> Deferred:
        opened.append(opened[-1].reopen() if opened else
                      MemoryConfigurationStore(retained=retained))
        return succeed(opened[-1])

    return opener


async def using(opener: Callable[[], Deferred],
                body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open a store, run ``body`` with it and close it, whatever happens."""
    store = await opener()
    try:
        return await body(store)
    finally:
        await store.close()


def sample_change() -> StoreWrite:
    """A write touching every kind of row and value the schema holds."""
    config = Configuration(generation=41)
    config = config.create(Dataset(dataset_id=dataset_id(1), primary=NODE_A,
                                   maximum_size=GIB, metadata={"name": "pgdata",
                                                               "profile": "gold"}))
    config = config.create(Dataset(dataset_id=dataset_id(2), primary=NODE_B))
    config = config.create(Dataset(dataset_id=dataset_id(3), primary=NODE_A,
                                   metadata={"name": "gone", "note": "ünïcødé ✓ \"q\""}))
    config = config.delete(0.0, dataset_id(3))
    config = config.create(Dataset(dataset_id=dataset_id(4), primary=NODE_B,
                                   maximum_size=64 * 1024 * 1024, metadata={"name": ""}))
    config = config.create(Dataset(dataset_id=dataset_id(5), primary=NODE_A,
                                   metadata={"name": "binned"}))
    config = config.delete(0.0, dataset_id(5), retain_until=1003600.5)
    config = config.acquire_lease(1000.0, dataset_id(1), NODE_A, 60.25)
    config = config.acquire_lease(1000.0, dataset_id(2), NODE_B, None)
    return StoreWrite.of(config, config.datasets.keys())


async def loaded(store: Any) -> Configuration:
    """The configuration ``store`` loads, checking that it comes as a snapshot."""
    snapshot = await store.load()
    assert isinstance(snapshot, StoreSnapshot)
    return snapshot.configuration


async def replayed(store: Any, config: Configuration, revision: int) -> Configuration:
    """``config``, the configuration at ``revision``, brought up to date by the change feed."""
    changes = await store.changes_since(revision)
    assert isinstance(changes, StoreChanges)
    assert changes.since == revision
    return apply_write(config, changes.change)


def model_steps() -> list:
    """(model change, the dataset it touches): create, move, lease, delete, purge."""
    return [
        (lambda c: c.create(Dataset(dataset_id=dataset_id(1), primary=NODE_A,
                                    metadata={"name": "a"})), dataset_id(1)),
        (lambda c: c.create(Dataset(dataset_id=dataset_id(2), primary=NODE_A,
                                    metadata={"name": "b"})), dataset_id(2)),
        (lambda c: c.acquire_lease(10.0, dataset_id(1), NODE_A, 60), dataset_id(1)),
        (lambda c: c.update(20.0, dataset_id(2), primary=NODE_B), dataset_id(2)),
        (lambda c: c.delete(30.0, dataset_id(1), allowed_holder=NODE_A), dataset_id(1)),
        (lambda c: c.create(Dataset(dataset_id=dataset_id(3), primary=NODE_B,
                                    metadata={"name": "a"})), dataset_id(3)),
        (lambda c: c.purge(dataset_id(1)), dataset_id(1)),
        (lambda c: c.acquire_lease(40.0, dataset_id(3), NODE_B, None), dataset_id(3)),
        (lambda c: c.release_lease(dataset_id(3), NODE_B), dataset_id(3)),
        (lambda c: c.delete(50.0, dataset_id(3), retain_until=110.0), dataset_id(3)),
        (lambda c: c.restore(dataset_id(3)), dataset_id(3)),
        (lambda c: c.delete(60.0, dataset_id(3), retain_until=120.0), dataset_id(3)),
        (lambda c: c.release_retained([dataset_id(3)], 120.0), dataset_id(3)),
        (lambda c: c.purge(dataset_id(3)), dataset_id(3)),
    ]


async def write_model_history(store: Any) -> list[tuple[Configuration, int]]:
    """Store each of ``model_steps``; (configuration, revision) before and after each."""
    snapshot = await store.load()
    history = [(snapshot.configuration, snapshot.revision)]
    config = snapshot.configuration
    for step, touched in model_steps():
        config = step(config)
        history.append((config, await store.write(StoreWrite.of(config, [touched]))))
    return history


def make_iconfigurationstore_tests(make_opener: OpenerFactory) -> type:
    """A pytest test class checking the ``IConfigurationStore`` contract on a store."""

    class ConfigurationStoreContract:
        """Behaviour every configuration store shares."""

        @pytest_twisted.ensureDeferred
        async def test_interface(self, tmp_path):
            """The store provides ``IConfigurationStore``."""
            async def check(store):
                assert verifyObject(IConfigurationStore, store)
            await using(make_opener(tmp_path), check)

        @pytest_twisted.ensureDeferred
        async def test_empty(self, tmp_path):
            """A new store loads as the empty configuration with generation 0."""
            config = await using(make_opener(tmp_path), loaded)
            assert config == Configuration()

        @pytest_twisted.ensureDeferred
        async def test_write_fires_revision(self, tmp_path):
            """
            A successful write fires with the revision it committed at: a later one than
            the store loaded at before, and the one it loads at after.
            """
            async def write(store):
                before = (await store.load()).revision
                revision = await store.write(sample_change())
                return before, revision, (await store.load()).revision

            before, revision, after = await using(make_opener(tmp_path), write)
            assert type(revision) is int
            assert before < revision == after

        @pytest_twisted.ensureDeferred
        async def test_write_then_load(self, tmp_path):
            """
            Datasets (tombstones, metadata, sizes included), leases with and without
            expiration and the generation load back as written, in the same session.
            """
            change = sample_change()

            async def write_and_load(store):
                await store.write(change)
                return await loaded(store)

            config = await using(make_opener(tmp_path), write_and_load)
            assert config == apply_write(Configuration(), change)
            config.check()

        @pytest_twisted.ensureDeferred
        async def test_reopen(self, tmp_path):
            """What was written is there after the store is closed and opened again."""
            opener = make_opener(tmp_path)
            change = sample_change()
            await using(opener, lambda store: store.write(change))
            config = await using(opener, loaded)
            expected = apply_write(Configuration(), change)
            assert config == expected
            assert config.datasets[dataset_id(3)].purging
            assert config.datasets[dataset_id(5)].retained_until == 1003600.5
            assert config.leases[dataset_id(1)].expiration == 1060.25
            assert config.leases[dataset_id(2)].expiration is None
            assert dict(config.names) == {"pgdata": dataset_id(1), "": dataset_id(4)}

        @pytest_twisted.ensureDeferred
        async def test_update_rows(self, tmp_path):
            """A later write replaces a dataset's and a lease's stored values."""
            opener = make_opener(tmp_path)
            first = sample_change()
            moved = Dataset(dataset_id=dataset_id(1), primary=NODE_B, maximum_size=None,
                            metadata={"name": "renamed"})
            lease = Lease(dataset_id=dataset_id(1), node_uuid=NODE_B, expiration=None)
            second = StoreWrite(datasets=((dataset_id(1), moved),),
                                leases=((dataset_id(1), lease),), generation=42)

            async def write_both(store):
                await store.write(first)
                await store.write(second)

            await using(opener, write_both)
            config = await using(opener, loaded)
            assert config.datasets[dataset_id(1)] == moved
            assert config.leases[dataset_id(1)] == lease
            assert config.by_name("renamed") == moved
            assert config.by_name("pgdata") is None
            assert config == apply_write(apply_write(Configuration(), first), second)

        @pytest_twisted.ensureDeferred
        async def test_remove_rows(self, tmp_path):
            """A write with None for a dataset or lease removes its row."""
            opener = make_opener(tmp_path)
            first = sample_change()
            second = StoreWrite(datasets=((dataset_id(3), None), (dataset_id(9), None)),
                                leases=((dataset_id(1), None), (dataset_id(9), None)),
                                generation=43)

            async def write_both(store):
                await store.write(first)
                await store.write(second)

            await using(opener, write_both)
            config = await using(opener, loaded)
            assert dataset_id(3) not in config.datasets
            assert dataset_id(1) not in config.leases
            assert dataset_id(2) in config.leases
            assert config == apply_write(apply_write(Configuration(), first), second)

        @pytest_twisted.ensureDeferred
        async def test_generation(self, tmp_path):
            """The generation round-trips, also a large one and with no rows written."""
            opener = make_opener(tmp_path)
            await using(opener, lambda store: store.write(StoreWrite(generation=2 ** 53)))
            config = await using(opener, loaded)
            assert config.generation == 2 ** 53
            await using(opener, lambda store: store.write(StoreWrite(generation=7)))
            config = await using(opener, loaded)
            assert config.generation == 7

        @pytest_twisted.ensureDeferred
        async def test_writes_in_order(self, tmp_path):
            """
            Writes submitted without waiting are applied in submission order, and a load
            submitted after them sees all of them.
            """
            opener = make_opener(tmp_path)
            changes = []
            for n in range(20):
                dataset = Dataset(dataset_id=dataset_id(n % 3), primary=NODE_A,
                                  metadata={"step": str(n)}, deleted=n == 19)
                lease = (None if n % 2 else
                         Lease(dataset_id=dataset_id(n % 3), node_uuid=NODE_B,
                               expiration=float(n)))
                changes.append(StoreWrite(datasets=((dataset.dataset_id, dataset),),
                                          leases=((dataset.dataset_id, lease),),
                                          generation=n))
            expected = Configuration()
            for change in changes:
                expected = apply_write(expected, change)

            async def write_all(store):
                writes = [store.write(change) for change in changes]
                loading = store.load()
                revisions = await gatherResults(writes)
                assert revisions == sorted(set(revisions)), "revisions strictly increase"
                snapshot = await loading
                assert snapshot.revision == revisions[-1]
                return snapshot.configuration

            assert await using(opener, write_all) == expected
            assert await using(opener, loaded) == expected

        @pytest_twisted.ensureDeferred
        async def test_close_finishes_writes(self, tmp_path):
            """Writes submitted just before ``close`` are applied before it fires."""
            opener = make_opener(tmp_path)
            store = await opener()
            change = sample_change()
            written = store.write(change)
            await store.close()
            assert type(await written) is int
            config = await using(opener, loaded)
            assert config == apply_write(Configuration(), change)

        @pytest_twisted.ensureDeferred
        async def test_model_history(self, tmp_path):
            """
            Storing ``StoreWrite.of`` each model change (create, move, lease, delete,
            purge) reproduces the model's configuration exactly.
            """
            opener = make_opener(tmp_path)
            history = await using(opener, write_model_history)
            config = await using(opener, loaded)
            assert config == history[-1][0]
            config.check()

        @pytest_twisted.ensureDeferred
        async def test_revision_survives_reopen(self, tmp_path):
            """After a restart the store loads at its last revision and goes on above it."""
            opener = make_opener(tmp_path)
            written = await using(opener, lambda store: store.write(sample_change()))

            async def reopened(store):
                return (await store.load()).revision, await store.write(sample_change())

            revision, following = await using(opener, reopened)
            assert revision == written < following

        @pytest_twisted.ensureDeferred
        async def test_store_id(self, tmp_path):
            """
            A store tells one id in loads and in the feed, keeps it across restarts, and
            another new store has another.
            """
            opener = make_opener(tmp_path / "one")

            async def ids(store):
                snapshot = await store.load()
                await store.write(sample_change())
                changes = await store.changes_since(snapshot.revision)
                return snapshot.store_id, changes.store_id, (await store.load()).store_id

            first = await using(opener, ids)
            again = await using(opener, ids)
            other = await using(make_opener(tmp_path / "two"), ids)
            assert type(first[0]) is str and first[0]
            assert set(first) == set(again) == {first[0]}
            assert other[0] != first[0]

        @pytest_twisted.ensureDeferred
        async def test_changes_since_now(self, tmp_path):
            """Since the current revision nothing changed: no rows, the same revision."""
            async def check(store):
                revision = await store.write(sample_change())
                changes = await store.changes_since(revision)
                assert (changes.since, changes.revision) == (revision, revision)
                assert changes.change == StoreWrite(generation=sample_change().generation)
            await using(make_opener(tmp_path), check)

        @pytest_twisted.ensureDeferred
        async def test_changes_replay(self, tmp_path):
            """
            From every revision of a history (the new store's included), its configuration
            plus the rows changed since give the current configuration, also after a
            restart.
            """
            opener = make_opener(tmp_path)
            history = await using(opener, write_model_history)
            current, revision = history[-1]

            async def check(store):
                for config, at in history:
                    assert await replayed(store, config, at) == current
                assert (await store.changes_since(history[0][1])).revision == revision

            await using(opener, check)

        @pytest_twisted.ensureDeferred
        async def test_changes_are_the_changed_rows(self, tmp_path):
            """
            The feed holds exactly the rows written after the revision, each with its
            current value, None for a row removed, and the current generation.
            """
            first = sample_change()
            gone = StoreWrite(datasets=((dataset_id(3), None),),
                              leases=((dataset_id(1), None),), generation=50)
            moved = Dataset(dataset_id=dataset_id(2), primary=NODE_A)
            move = StoreWrite(datasets=((dataset_id(2), moved),), generation=51)

            async def check(store):
                revision = await store.write(first)
                await store.write(gone)
                await store.write(move)
                return await store.changes_since(revision)

            change = (await using(make_opener(tmp_path), check)).change
            assert sorted(change.datasets) == [(dataset_id(2), moved), (dataset_id(3), None)]
            assert change.leases == ((dataset_id(1), None),)
            assert change.generation == 51

        @pytest_twisted.ensureDeferred
        async def test_history_is_bounded(self, tmp_path):
            """
            A store keeping 5 revisions answers for the last 5 and fails with
            ``HistoryGone`` for older ones, saying which it keeps.
            """
            async def write_many(store):
                history = await write_model_history(store)
                current = history[-1]
                kept = [h for h in history if h[1] >= current[1] - 5]
                for config, at in kept:
                    assert await replayed(store, config, at) == current[0]
                with pytest.raises(HistoryGone) as raised:
                    await store.changes_since(history[0][1])
                assert raised.value.revision == history[0][1]
                assert raised.value.oldest <= kept[0][1]
                assert raised.value.current == current[1]

            await using(make_opener(tmp_path, 5), write_many)

        @pytest_twisted.ensureDeferred
        async def test_future_revision(self, tmp_path):
            """A revision the store never reached fails with ``HistoryGone``."""
            async def check(store):
                revision = await store.write(sample_change())
                with pytest.raises(HistoryGone, match=f"revision {revision + 1} "):
                    await store.changes_since(revision + 1)
            await using(make_opener(tmp_path), check)

        @pytest_twisted.ensureDeferred
        async def test_no_tokens(self, tmp_path):
            """A new store keeps no join token."""
            tokens = await using(make_opener(tmp_path), lambda store: store.load_tokens())
            assert tuple(tokens) == ()

        @pytest_twisted.ensureDeferred
        async def test_tokens_kept(self, tmp_path):
            """Written join tokens (fractional times too) load back after a reopen."""
            opener = make_opener(tmp_path)
            first, second = sample_token("0000000000000001"), sample_token(
                "00000000000000ff", used=2)

            async def write(store):
                await store.write_token(first.token_id, first)
                await store.write_token(second.token_id, second)
            await using(opener, write)
            tokens = await using(opener, lambda store: store.load_tokens())
            assert sorted(tokens, key=lambda t: t.token_id) == [first, second]

        @pytest_twisted.ensureDeferred
        async def test_token_updated_and_removed(self, tmp_path):
            """A token written again is replaced; written as None it is gone, for good."""
            opener = make_opener(tmp_path)
            kept, gone = sample_token("000000000000000a"), sample_token("000000000000000b")

            async def write(store):
                await store.write_token(kept.token_id, kept)
                await store.write_token(gone.token_id, gone)
                await store.write_token(kept.token_id, attr.evolve(kept, used=1))
                await store.write_token(gone.token_id, None)
                await store.write_token("000000000000000c", None)
            await using(opener, write)
            tokens = await using(opener, lambda store: store.load_tokens())
            assert list(tokens) == [attr.evolve(kept, used=1)]

        @pytest_twisted.ensureDeferred
        async def test_tokens_take_no_revision(self, tmp_path):
            """Writing a token leaves the configuration's revision and change feed alone."""
            async def check(store):
                revision = await store.write(sample_change())
                await store.write_token("0000000000000001", sample_token("0000000000000001"))
                snapshot = await store.load()
                changes = await store.changes_since(revision)
                return revision, snapshot.revision, changes.change
            revision, after, change = await using(make_opener(tmp_path), check)
            assert after == revision
            assert change.datasets == () and change.leases == ()

    return ConfigurationStoreContract


def sample_token(token_id: str, used: int = 0) -> TokenRecord:
    """A join token record with id ``token_id`` (the hash of a made-up secret)."""
    return TokenRecord(token_id=token_id, secret_hash=secret_hash(f"secret-{token_id}"),
                       created=1_700_000_000.25, expires=1_700_003_600.5, uses=3, used=used)
