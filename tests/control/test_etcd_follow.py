"""
Configuration services on one etcd prefix kept current by the watch (``_etcd_watch``), in
one process on a real etcd member: a change through one is seen by the other with the
same tag, a change beaten by another writer is applied again on what that writer left,
and a watch from a compacted revision makes the service reload everything.
"""

from __future__ import annotations

import hashlib
import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater

from pyflock.common._model import Dataset, NameTaken
from pyflock.control._etcd_model import store_revision
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._etcd_watch import EtcdFollower, follow
from pyflock.control._persistence import ConfigurationService, TagMismatch
from tests.contracts.store import NODE_A
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

etcd = etcd_cluster_fixture(1)


def _reactor():
    from twisted.internet import reactor
    return reactor


async def open_services(tmp_path, etcd, count: int, *, following: bool = True,
                        interval: float = 1.0) -> list[ConfigurationService]:
    """``count`` configuration services on one new prefix, following it unless told not."""
    prefix = f"/follow-test/{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]}/"
    services = []
    for _ in range(count):
        store = await open_etcd_store(_reactor(), etcd.endpoints, prefix)
        service = await ConfigurationService.load(store, _reactor())
        if following:
            follow(_reactor(), service, store, interval=interval, deadline=interval)
        services.append(service)
    return services


def creating(name: str):
    """A dataset id and the transform creating a dataset named ``name`` with it."""
    dataset = Dataset(dataset_id=str(uuid4()), primary=NODE_A, metadata={"name": name})
    return [dataset.dataset_id], lambda config: config.create(dataset)


async def until(condition, timeout: float = 5.0) -> float:
    """Poll ``condition`` every 5 ms; the seconds it took to hold (fails after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "the condition did not hold in time"
        await deferLater(_reactor(), 0.005, lambda: None)
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_change_reaches_the_other_service_with_the_same_tag(tmp_path, etcd):
    """A dataset created through one service is in the other within 100 ms, same tag."""
    services = await open_services(tmp_path, etcd, 2)
    try:
        first, second = services
        for n in range(5):
            ids, transform = creating(f"db{n}")
            await first.change(ids, transform)
            took = await until(lambda: ids[0] in second.committed.datasets)
            assert took < 0.1
            assert second.tag == first.tag and second.committed == first.committed
    finally:
        for service in services:
            await service.stop()


@pytest_twisted.ensureDeferred
async def test_beaten_change_is_applied_again(tmp_path, etcd):
    """
    Two services change at once, both on the same tag: one change wins; the other is
    applied again on the winner's configuration and refused there (``TagMismatch``);
    without a tag both changes are kept.
    """
    services = await open_services(tmp_path, etcd, 2)
    try:
        tag = services[0].tag
        outcomes = await DeferredList([
            s.change(*creating(f"cas{n}"), expected_tag=tag) for n, s in enumerate(services)],
            consumeErrors=True)
        assert sorted(ok for ok, _ in outcomes) == [False, True]
        assert [r for ok, r in outcomes if not ok][0].check(TagMismatch)
        requests = [creating(f"free{n}") for n in range(2)]
        await DeferredList([s.change(*r) for s, r in zip(services, requests)],
                           fireOnOneErrback=True)
        await until(lambda: services[0].tag == services[1].tag
                    and services[0].committed == services[1].committed)
        assert {"free0", "free1"} <= set(services[0].committed.names)
        with pytest.raises(NameTaken):
            services[0].change(*creating("free1"))
    finally:
        for service in services:
            await service.stop()


@pytest_twisted.ensureDeferred
async def test_watch_from_a_compacted_revision_reloads(tmp_path, etcd):
    """
    A service whose watch starts from a revision etcd compacted since (its checks too
    rare to help) reloads the whole configuration and serves what the other one wrote.
    """
    writer, reader = await open_services(tmp_path, etcd, 2, following=False)
    try:
        for n in range(3):
            await writer.change(*creating(f"c{n}"))
        head = writer.revision // store_revision(1)
        await reader._store.gateway.call("kv/compaction", {"revision": str(head),
                                                           "physical": True})
        follower = EtcdFollower(_reactor(), reader._store, reader, interval=3600)
        reader.follow_with(follower)
        follower.start()
        await until(lambda: follower.compactions == 1)
        await until(lambda: reader.committed == writer.committed)
        assert reader.tag == writer.tag
        ids, transform = creating("after")
        await writer.change(ids, transform)
        await until(lambda: ids[0] in reader.committed.datasets)
    finally:
        await writer.stop()
        await reader.stop()


@pytest_twisted.ensureDeferred
async def test_tag_survives_a_restart(tmp_path, etcd):
    """A service opened again on the prefix tells the tag the first one did."""
    [first] = await open_services(tmp_path, etcd, 1)
    await first.change(*creating("x"))
    tag = first.tag
    await first.stop()
    [again] = await open_services(tmp_path, etcd, 1)
    try:
        assert again.tag == tag
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_failed_check_refuses_changes_until_the_member_answers(tmp_path, etcd):
    """
    A check that etcd does not answer makes the service refuse changes with
    ``StoreUnavailable`` naming the member; the next check that it answers takes them again.
    """
    from pyflock.control._persistence import StoreUnavailable
    [service] = await open_services(tmp_path, etcd, 1, following=False)
    follower = EtcdFollower(_reactor(), service._store, service, interval=3600, deadline=0.5)
    service.follow_with(follower)
    try:
        etcd.members[0].pause()
        try:
            await follower.check()
        finally:
            etcd.members[0].resume()
        with pytest.raises(StoreUnavailable, match="answered a linearizable read"):
            await service.change(*creating("refused"))
        await follower.check()
        await service.change(*creating("taken"))
    finally:
        await service.stop()

