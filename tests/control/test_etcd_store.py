"""
The etcd store on real etcd processes (``tests/harness/etcd.py``): the store contract
suite on one member, and the etcd store's own promises: group commit within etcd's
limits, one writer wins a compare-and-swap race, a new store object sees everything, and
a member that stops answering is left for another within 2 s (three members).
"""

from __future__ import annotations

import hashlib
import time

import pytest
import pytest_twisted
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from pyflock.common._ca import _issue, parse_hostname
from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._etcd_model import MAX_TXN_OPS, REVISION_SCALE
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._store import (
    RETAINED_REVISIONS, StoreConflict, StoreError, StoreWrite, apply_write,
)
from tests.contracts.store import (
    NODE_A, NODE_B, dataset_id, loaded, make_iconfigurationstore_tests, sample_change, using,
)
from tests.harness.certificates import make_cluster_certificates
from tests.harness.etcd import EtcdCluster, EtcdServerTLS, etcd_cluster_fixture

pytestmark = pytest.mark.integration

#: The endpoints of the module's one-member cluster, for the contract's openers.
_SINGLE: dict = {}


def _reactor():
    from twisted.internet import reactor
    return reactor


single_etcd = etcd_cluster_fixture(1)


@pytest.fixture(autouse=True)
def single_endpoints(single_etcd):
    """The one-member cluster's endpoints, for the contract's openers."""
    _SINGLE["endpoints"] = single_etcd.endpoints


def prefix_of(folder) -> str:
    """A prefix of its own for each test folder."""
    return f"/pyflock-test/{hashlib.sha1(str(folder).encode()).hexdigest()[:16]}/"


def etcd_store_opener(folder, retained: int = RETAINED_REVISIONS, endpoints=None,
                      timeout=None):
    """An opener of etcd stores under the prefix of ``folder`` on the module's member."""
    return lambda: Deferred.fromCoroutine(open_etcd_store(
        _reactor(), endpoints or _SINGLE["endpoints"], prefix_of(folder),
        retained=retained, timeout=timeout))


TestEtcdStoreContract = make_iconfigurationstore_tests(etcd_store_opener)


def creating(n: int, generation: int) -> StoreWrite:
    """A write creating dataset number ``n``."""
    dataset = Dataset(dataset_id=dataset_id(n), primary=NODE_A, metadata={"name": f"v{n}"})
    return StoreWrite(datasets=((dataset.dataset_id, dataset),), generation=generation)


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_share_transactions(tmp_path):
    """
    200 writes submitted at once commit in a few transactions within etcd's limits, each
    at a revision of its own, and all of them load back.
    """
    async def write_all(store):
        revisions = await gatherResults([store.write(creating(n, n)) for n in range(200)])
        return revisions, store.transactions

    revisions, transactions = await using(etcd_store_opener(tmp_path), write_all)
    assert revisions == sorted(set(revisions))
    assert transactions <= 10
    config = await using(etcd_store_opener(tmp_path), loaded)
    assert len(config.datasets) == 200 and config.generation == 199


@pytest_twisted.ensureDeferred
async def test_big_lease_change_is_split(tmp_path):
    """
    A lease-only write of 300 leases (as when they all expire) is committed over several
    transactions and loads back whole.
    """
    ids = range(300)
    creates = StoreWrite(datasets=tuple((dataset_id(n), Dataset(
        dataset_id=dataset_id(n), primary=NODE_A)) for n in ids[:60]), generation=1)
    leases = StoreWrite(leases=tuple((dataset_id(n), Lease(
        dataset_id=dataset_id(n), node_uuid=NODE_B, expiration=5.0)) for n in ids[:60]),
        generation=1)
    more_datasets = [StoreWrite(datasets=tuple((dataset_id(n), Dataset(
        dataset_id=dataset_id(n), primary=NODE_A)) for n in ids[k:k + 60]), generation=1)
        for k in range(60, 300, 60)]
    expire = StoreWrite(leases=tuple((dataset_id(n), None) for n in ids), generation=1)

    async def write(store):
        for change in [creates, leases, *more_datasets]:
            await store.write(change)
        before = store.transactions
        await store.write(expire)
        return store.transactions - before

    transactions = await using(etcd_store_opener(tmp_path), write)
    assert transactions == -(-300 // (MAX_TXN_OPS - 2))
    config = await using(etcd_store_opener(tmp_path), loaded)
    assert len(config.datasets) == 300 and not config.leases


@pytest_twisted.ensureDeferred
async def test_big_dataset_change_is_refused(tmp_path):
    """A write of more dataset rows than one transaction carries fails, writing nothing."""
    change = StoreWrite(datasets=tuple((dataset_id(n), Dataset(
        dataset_id=dataset_id(n), primary=NODE_A)) for n in range(MAX_TXN_OPS)), generation=1)

    async def write(store):
        with pytest.raises(StoreError, match="at most 128 operations.*Nothing was written"):
            await store.write(change)
        return await loaded(store)

    assert await using(etcd_store_opener(tmp_path), write) == Configuration()


@pytest_twisted.ensureDeferred
async def test_compare_and_swap_race(tmp_path):
    """
    Two store objects loaded at one revision write at once: exactly one write commits, the
    other fails with ``StoreError`` and nothing of it is stored; after a load, the loser
    writes again.
    """
    opener = etcd_store_opener(tmp_path)
    await using(opener, lambda store: store.write(sample_change()))
    first, second = await opener(), await opener()
    try:
        await first.load()
        await second.load()
        outcomes = await DeferredList([first.write(creating(7, 100)),
                                       second.write(creating(8, 100))], consumeErrors=True)
        assert sorted(ok for ok, _ in outcomes) == [False, True]
        loser = [store for (ok, _), store in zip(outcomes, (first, second)) if not ok][0]
        assert [r.value for ok, r in outcomes if not ok][0].__class__ is StoreConflict
        config = await loaded(first)
        assert (dataset_id(7) in config.datasets) != (dataset_id(8) in config.datasets)
        await loser.load()
        await loser.write(creating(9, 101))
        assert dataset_id(9) in (await loaded(first)).datasets
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_new_store_object_sees_everything(tmp_path):
    """
    A second store object on the same prefix, opened while the first is still open, loads
    every write, the revision and the store id, and answers the change feed from a
    revision the first one wrote.
    """
    opener = etcd_store_opener(tmp_path)
    first = await opener()
    try:
        middle = await first.write(sample_change())
        last = await first.write(creating(5, 60))
        snapshot = await first.load()
        other = await opener()
        try:
            again = await other.load()
            changes = await other.changes_since(middle)
        finally:
            await other.close()
    finally:
        await first.close()
    assert again == snapshot and again.revision == last
    assert changes.change.datasets == ((dataset_id(5), creating(5, 60).datasets[0][1]),)
    assert apply_write(apply_write(Configuration(), sample_change()),
                       changes.change) == again.configuration


@pytest_twisted.ensureDeferred
async def test_revisions_scale_etcd_revisions(tmp_path):
    """The revision a lone write fires with is its etcd revision times REVISION_SCALE."""
    async def write(store):
        revision = await store.write(creating(1, 1))
        return revision, store._meta.revision
    revision, etcd_revision = await using(etcd_store_opener(tmp_path), write)
    assert revision == etcd_revision * REVISION_SCALE


three_etcd = etcd_cluster_fixture(3)


@pytest_twisted.ensureDeferred
async def test_stopped_member_is_left_within_2_seconds(tmp_path, three_etcd):
    """
    With the member a store uses stopped (SIGSTOP, a follower), a write commits through
    another member within 2 s, and the next one goes there at once (within the timeout).
    """
    leader = three_etcd.leader()
    follower = next(m for m in three_etcd.members if m is not leader)
    endpoints = [follower.url] + [m.url for m in three_etcd.members if m is not follower]
    opener = etcd_store_opener(tmp_path, endpoints=endpoints, timeout=1.0)
    store = await opener()
    try:
        await store.write(creating(1, 1))
        follower.pause()
        try:
            started = time.monotonic()
            await store.write(creating(2, 2))
            failover = time.monotonic() - started
            started = time.monotonic()
            await store.write(creating(3, 3))
            following = time.monotonic() - started
        finally:
            follower.resume()
        assert failover < 2.0
        assert following < 1.0
        assert len((await loaded(store)).datasets) == 3
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_writes_survive_killing_the_etcd_leader(tmp_path, three_etcd):
    """
    With 8 writers writing through one store, kill -9 of the etcd leader (the member the
    store uses): writes resume through the others, and every acknowledged one is stored.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    leader = three_etcd.leader()
    endpoints = [leader.url] + [m.url for m in three_etcd.members if m is not leader]
    store = await etcd_store_opener(tmp_path, endpoints=endpoints, timeout=1.0)()
    acknowledged: list[int] = []

    async def writer(first: int):
        for n in range(first, first + 15):
            await store.write(creating(n, n))
            acknowledged.append(n)

    try:
        writers = gatherResults([Deferred.fromCoroutine(writer(100 * w)) for w in range(8)])
        while len(acknowledged) < 20:
            await deferLater(reactor, 0.01, lambda: None)
        leader.kill9()
        await writers
    finally:
        await store.close()
        if not leader.running:
            leader.spawn()
    other = [m.url for m in three_etcd.members if m is not leader]
    config = await using(etcd_store_opener(tmp_path, endpoints=other), loaded)
    assert len(acknowledged) == 120
    assert {dataset_id(n) for n in acknowledged} <= set(config.datasets)


@pytest_twisted.ensureDeferred
async def test_old_tombstones_are_pruned(tmp_path):
    """
    A removed row stays as a tombstone while the history it is in is kept, and is deleted
    from etcd once that history is older than the store keeps; a row written again since
    is kept.
    """
    from pyflock.control._etcd_model import range_request

    async def keys_of(store, *dataset_ids):
        found = []
        for i in dataset_ids:
            answer = await store._gateway.call("kv/range", range_request(
                store.keys.dataset(i)))
            found += [i] if answer.get("kvs") else []
        return found

    async def check(store):
        await store.write(creating(1, 1))
        await store.write(creating(2, 2))
        await store.write(StoreWrite(datasets=((dataset_id(1), None), (dataset_id(2), None)),
                                     generation=3))
        await store.write(creating(2, 4))
        kept = await keys_of(store, dataset_id(1), dataset_id(2))
        for n in range(10):
            await store.write(creating(10 + n, 5 + n))
        await store.load()
        return kept, await keys_of(store, dataset_id(1), dataset_id(2))

    kept, later = await using(etcd_store_opener(tmp_path, retained=5), check)
    assert kept == [dataset_id(1), dataset_id(2)]
    assert later == [dataset_id(2)]


@pytest_twisted.ensureDeferred
async def test_tag_revision_moves_with_datasets_only(tmp_path):
    """
    The generation key's mod revision changes with a dataset change, not with a lease
    change, and another store object loads the same one.
    """
    lease = Lease(dataset_id=dataset_id(1), node_uuid=NODE_B)

    async def write(store):
        await store.write(creating(1, 1))
        after_create = store.tag_revision
        await store.write(StoreWrite(leases=((dataset_id(1), lease),), generation=1))
        after_lease = store.tag_revision
        await store.write(creating(2, 2))
        return after_create, after_lease, store.tag_revision

    created, leased, changed = await using(etcd_store_opener(tmp_path), write)

    async def reload(store):
        await store.load()
        return store.tag_revision
    assert created == leased < changed == await using(etcd_store_opener(tmp_path), reload)


@pytest_twisted.ensureDeferred
async def test_tls_to_etcd(tmp_path):
    """
    Over TLS with client certificates, the store writes and loads given the CA and a
    client certificate, and cannot open without the client certificate.
    """
    from pyflock.control._etcd_client import EtcdTLS
    (tmp_path / "certs").mkdir()
    certificates = make_cluster_certificates(tmp_path / "certs", nodes=0,
                                             users=("pyflock",), control_host="127.0.0.1")
    folder = certificates.path
    # etcd's gateway presents the server's certificate to etcd itself: it needs both usages.
    _issue(folder, folder, "etcd", "etcd",
           [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
           [parse_hostname("127.0.0.1")], None)
    server = EtcdServerTLS(certificate=folder / "etcd.crt",
                           key=folder / "etcd.key", ca=folder / "cluster.crt",
                           client_certificate=folder / "pyflock.crt",
                           client_key=folder / "pyflock.key")
    with EtcdCluster(1, tmp_path / "logs", tls=server).start() as cluster:
        assert cluster.endpoints[0].startswith("https://")
        tls = EtcdTLS(str(server.ca), str(server.client_certificate), str(server.client_key))

        def opener(tls):
            return lambda: Deferred.fromCoroutine(open_etcd_store(
                _reactor(), cluster.endpoints, "/tls/", tls, timeout=1.0, deadline=1.5))
        await using(opener(tls), lambda store: store.write(creating(1, 1)))
        config = await using(opener(tls), loaded)
        assert dataset_id(1) in config.datasets
        with pytest.raises(StoreError, match="no etcd member answered"):
            await opener(EtcdTLS(str(server.ca)))()


async def put_raw(key: bytes, value: bytes) -> None:
    """Put one key straight into the module's etcd member."""
    from pyflock.control._etcd_client import EtcdGateway
    from pyflock.control._etcd_model import b64
    gateway = EtcdGateway(_reactor(), _SINGLE["endpoints"])
    try:
        await gateway.call("kv/put", {"key": b64(key), "value": b64(value)})
    finally:
        await gateway.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_initialise_a_prefix_once(tmp_path):
    """Two stores opened at once on an empty prefix make one store id between them."""
    opener = etcd_store_opener(tmp_path)
    first, second = await gatherResults([opener(), opener()])
    try:
        assert first.store_id == second.store_id != ""
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_foreign_prefix_refused(tmp_path):
    """A prefix holding keys but no pyflock store is refused, saying how many and what to do."""
    await put_raw(prefix_of(tmp_path).encode() + b"someone/else", b"x")
    with pytest.raises(StoreError, match="holds 1 keys but no pyflock store.*--etcd-prefix"):
        await etcd_store_opener(tmp_path)()


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(tmp_path):
    """A store written by a newer schema is refused, naming both versions."""
    await using(etcd_store_opener(tmp_path), lambda store: store.load())
    await put_raw(prefix_of(tmp_path).encode() + b"store/schema", b"99")
    with pytest.raises(StoreError, match="schema version 99.*versions up to 1"):
        await etcd_store_opener(tmp_path)()


@pytest_twisted.ensureDeferred
async def test_damaged_row_fails_the_load(tmp_path):
    """A row that cannot be read fails the load with ``StoreError`` naming its key."""
    async def damage(store):
        await store.write(creating(1, 1))
        await put_raw(store.keys.dataset(dataset_id(1)), b"{not json")
        with pytest.raises(StoreError, match=f"damaged.*dataset/{dataset_id(1)}"):
            await store.load()
    await using(etcd_store_opener(tmp_path), damage)


@pytest_twisted.ensureDeferred
async def test_two_services_cannot_both_take_a_name(tmp_path):
    """
    Two configuration services on one prefix create datasets of one name at once: one
    wins; the other's write is beaten, it catches up and applies the change again, which
    is refused (``NameTaken``); after that it refuses the name at once.
    """
    from pyflock.common._model import NameTaken
    from pyflock.control._persistence import ConfigurationService
    from twisted.internet.task import deferLater
    reactor = _reactor()
    opener = etcd_store_opener(tmp_path)
    services = [await ConfigurationService.load(await opener(), reactor) for _ in range(2)]
    try:
        def named(n):
            dataset = Dataset(dataset_id=dataset_id(n), primary=NODE_A,
                              metadata={"name": "db"})
            return dataset.dataset_id, lambda config: config.create(dataset)
        outcomes = await DeferredList([s.change([named(n)[0]], named(n)[1])
                                       for n, s in enumerate(services)], consumeErrors=True)
        assert sorted(ok for ok, _ in outcomes) == [False, True]
        loser = services[[ok for ok, _ in outcomes].index(False)]
        assert outcomes[services.index(loser)][1].check(NameTaken)
        for _ in range(100):
            if "db" in loser.committed.names:
                break
            await deferLater(reactor, 0.02, lambda: None)
        with pytest.raises(NameTaken):
            loser.change([named(5)[0]], named(5)[1])
    finally:
        for service in services:
            await service.stop()


@pytest_twisted.ensureDeferred
async def test_writers_writing_again_share_transactions(tmp_path):
    """
    32 writers that each write again as soon as their write is acknowledged share one
    transaction per round: 5 rounds take about 5 transactions, not 10.
    """
    async def write_all(store):
        async def writer(w):
            for i in range(5):
                await store.write(creating(100 * w + i, i))
        await store.write(creating(99999, 0))
        before = store.transactions
        await gatherResults([Deferred.fromCoroutine(writer(w)) for w in range(32)])
        return store.transactions - before

    assert await using(etcd_store_opener(tmp_path), write_all) <= 6


@pytest_twisted.ensureDeferred
async def test_refused_write_tells_what_changed(tmp_path):
    """
    A write refused because another store wrote reads that writer's changes; the next
    ``catch_up`` answers them as ``changes_since`` would, after which writes go through.
    """
    opener = etcd_store_opener(tmp_path)
    first, second = await opener(), await opener()
    try:
        loaded_at = (await first.load()).revision
        await second.load()
        await second.write(creating(1, 1))
        with pytest.raises(StoreConflict):
            await first.write(creating(2, 1))
        expected = await second.changes_since(loaded_at)
        calls = []
        real = first.gateway.call
        first.gateway.call = lambda *a, **k: calls.append(a) or real(*a, **k)
        caught = await first.catch_up(loaded_at)
        assert calls == [] and caught == expected
        del first.gateway.call
        await first.write(creating(2, 2))
        assert {dataset_id(1), dataset_id(2)} <= set((await loaded(second)).datasets)
    finally:
        await first.close()
        await second.close()
