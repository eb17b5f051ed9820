"""
Issue 9 point 4: a node whose report vanished (its replica died) is marked dead by the
leader alone, with its fence, on a real etcd member. Replica 1 serves node A's agent;
replicas 2 and 3 campaign, but a bare candidate that follows no reports leads first.
While it leads, neither replica marks A dead, and both keep showing it; once it steps
down, the replica that leads then marks it, and both replicas wipe it.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from pyflock.control._etcd_client import EtcdGateway
from pyflock.control._etcd_leader import EtcdLeadership
from pyflock.control._etcd_model import b64
from tests.control.test_etcd_leader import TTL, until as leads
from tests.control.test_etcd_state import (
    A, _reactor, alive_nodes, created, replicas, report, until,
)
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

etcd = etcd_cluster_fixture(1)


def candidate(etcd, replica, name: str) -> EtcdLeadership:
    """A started candidate under ``replica``'s prefix, with a gateway of its own."""
    leadership = EtcdLeadership(_reactor(), EtcdGateway(_reactor(), etcd.endpoints),
                                replica.store.keys, name, ttl=TTL)
    leadership.start()
    return leadership


async def death_marked(replica) -> bool:
    """Whether etcd holds the leader's mark of node A's death."""
    answer = await replica.store.gateway.call(
        "kv/range", {"key": b64(replica.store.keys.death(A))})
    return bool(answer.get("kvs"))


@pytest_twisted.ensureDeferred
async def test_only_the_leader_marks_a_vanished_node_dead(tmp_path, etcd):
    r1, r2, r3 = made = await replicas(tmp_path, etcd, count=3, ttl=2.0)
    bare = candidate(etcd, r1, "bare")
    electing = []
    try:
        await leads(lambda: bare.leading, "the bare candidate leads")
        for replica in (r2, r3):
            leadership = candidate(etcd, replica, replica.shared.replica.name)
            electing.append(leadership)
            replica.shared.follow_leader(leadership)
        await leads(lambda: all(e.leader == "bare" for e in electing), "followers know it")
        dataset_id = await created(r1, made)
        r1.agent().send(report(dataset_id))

        async def shown():
            return all([await alive_nodes(r) == [A] for r in (r2, r3)])
        await until(shown)

        await r1.close()  # its lease revoked: node A's report vanishes
        await until(lambda: all(A in r.shared.deaths.vanished for r in (r2, r3)))
        # No replica leads: neither marks the node dead, both still show it as it was.
        assert not any(r.shared.deaths.marking for r in (r2, r3))
        assert not await death_marked(r2)
        assert await shown()

        await bare.stop()  # another candidate leads: it marks the death, both wipe A
        await leads(lambda: any(e.leading for e in electing), "a replica leads")
        await until(lambda: death_marked(r2))

        async def dead():
            return all([await alive_nodes(r) == [] for r in (r2, r3)])
        await until(dead)
        assert all(A not in r.shared.deaths.vanished for r in (r2, r3))
        assert [r.cluster.state.nodes[A].datasets for r in (r2, r3)] == [{}, {}]
    finally:
        for leadership in [bare] * (not bare._stopped) + electing:
            await leadership.stop()
        await bare._gateway.close()
        for leadership in electing:
            await leadership._gateway.close()
        for r in made:
            await r.close()


@pytest_twisted.ensureDeferred
async def test_the_leader_marks_its_own_silent_node_dead(tmp_path, etcd):
    """
    Node A's agent talks to the leading replica and goes silent there: the leader
    withdraws its report and marks it dead, and the follower shows it dead too.
    """
    r1, r2 = made = await replicas(tmp_path, etcd, count=2, ttl=2.0)
    electing = []
    try:
        for replica in made:
            leadership = candidate(etcd, replica, replica.shared.replica.name)
            electing.append(leadership)
            replica.shared.follow_leader(leadership)
            await leads(lambda: leadership.leader is not None, "a leader is known")
        await leads(lambda: electing[0].leading, "replica 1 leads")
        dataset_id = await created(r1, made)
        r1.agent().send(report(dataset_id))

        async def shown():
            return await alive_nodes(r2) == [A]
        await until(shown)
        # As its expiry timer does after --node-expiry (replica 1's own view of its node
        # is the agent channel's: only the follower is looked at here).
        r1.channel._expire(A)

        async def dead():
            return await alive_nodes(r2) == []
        await until(dead)
        assert await death_marked(r2)
        assert r2.cluster.state.nodes[A].datasets == {}
    finally:
        for leadership in electing:
            await leadership.stop()
            await leadership._gateway.close()
        for r in made:
            await r.close()
