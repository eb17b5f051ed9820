"""
Issue 9 point 4: a node whose report vanished (its replica died) is marked dead by the
leader alone, with its fence, on a real etcd member. Replica 1 serves node A's agent;
replicas 2 and 3 campaign, but a bare candidate that follows no reports leads first.
While it leads, neither replica marks A dead, and both keep showing it; once it steps
down, the replica that leads then marks it, and both replicas wipe it. The same holds on
the replica whose agent went silent: it withdraws the report and waits for the mark too.
A replica started after the report vanished lists the node as marked; a node forgotten
loses its mark, a replica started afterwards does not list it, and the other replicas
forget it too (not one that comes back: its claim deletes the mark as well).
"""

from __future__ import annotations

import pytest
import pytest_twisted

from pyflock.control._etcd_client import EtcdGateway
from pyflock.control._etcd_leader import EtcdLeadership
from pyflock.control._etcd_model import b64
from tests.control.test_etcd_leader import TTL, until as leads
from tests.control.test_etcd_state import (
    A, _reactor, alive_nodes, created, datasets_shown, replicas, report, until,
)
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

etcd = etcd_cluster_fixture(1)

#: Node A's address, as its agent's hello says (``RawAgent``).
HOST = "127.0.0.7"


def candidate(etcd, replica, name: str) -> EtcdLeadership:
    """A started candidate under ``replica``'s prefix, with a gateway of its own."""
    leadership = EtcdLeadership(_reactor(), EtcdGateway(_reactor(), etcd.endpoints),
                                replica.store.keys, name, ttl=TTL)
    leadership.start()
    return leadership


def following(etcd, replicas) -> list[EtcdLeadership]:
    """A started candidate for each of ``replicas``, which leaves deaths to the leader."""
    made = []
    for replica in replicas:
        made.append(candidate(etcd, replica, replica.shared.replica.name))
        replica.shared.follow_leader(made[-1])
    return made


async def stop_all(candidates, made) -> None:
    """Stop the candidates still running (their gateways closed) and the replicas."""
    for leadership in candidates:
        if not leadership._stopped:
            await leadership.stop()
        await leadership._gateway.close()
    for r in made:
        await r.close()


async def nodes_shown(replica) -> list[tuple[str, str, bool]]:
    """The nodes replica's state API lists: uuid, host, alive."""
    return [(n["uuid"], n["host"], n["alive"]) for n in await replica.get("/v1/state/nodes")]


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


@pytest_twisted.ensureDeferred
async def test_silent_node_waits_for_the_mark_on_its_own_replica(tmp_path, etcd):
    """
    Node A's agent goes silent on replica 1, which does not lead: replica 1 withdraws its
    report but, like replica 2, shows it as it was until the leader marks it dead; then
    both show it dead, holding nothing.
    """
    r1, r2 = made = await replicas(tmp_path, etcd, ttl=2.0)
    bare = candidate(etcd, r1, "bare")
    electing = []
    try:
        await leads(lambda: bare.leading, "the bare candidate leads")
        electing = following(etcd, made)
        await leads(lambda: all(e.leader == "bare" for e in electing), "followers know it")
        dataset_id = await created(r1, made)
        r1.agent().send(report(dataset_id))

        async def shown():
            return all([await alive_nodes(r) == [A] and await datasets_shown(r, [dataset_id])
                        for r in made])
        await until(shown)
        r1.channel._expire(A)  # as its expiry timer does after --node-expiry
        await until(lambda: all(A in r.shared.deaths.vanished for r in made))
        assert await r1.report_version() == 0  # withdrawn
        assert await shown()
        assert not await death_marked(r1)

        await bare.stop()  # a replica leads: it marks the death, both wipe A
        await leads(lambda: any(e.leading for e in electing), "a replica leads")

        async def dead():
            return all([await nodes_shown(r) == [(A, HOST, False)] for r in made])
        await until(dead)
        assert [r.cluster.state.nodes[A].datasets for r in made] == [{}, {}]
    finally:
        await stop_all([bare] + electing, made)


@pytest_twisted.ensureDeferred
async def test_replica_started_later_lists_a_dead_node(tmp_path, etcd):
    """
    Replica 3, started while node A waits for its mark (its report gone with replica 1),
    and replica 4, started once it is marked, list it as replica 2 does: dead.
    """
    made = await replicas(tmp_path, etcd, ttl=2.0)
    r1, r2 = made
    bare = candidate(etcd, r1, "bare")
    electing = []
    try:
        await leads(lambda: bare.leading, "the bare candidate leads")
        electing = following(etcd, [r2])
        await leads(lambda: electing[0].leader == "bare", "replica 2 knows it")
        r1.agent()

        async def shown():
            return await alive_nodes(r2) == [A]
        await until(shown)
        await r1.close()  # its lease revoked: node A's report vanishes
        await until(lambda: A in r2.shared.deaths.vanished)
        made += await replicas(tmp_path, etcd, count=1, ttl=2.0, first=3)
        electing += following(etcd, made[-1:])

        await bare.stop()  # replica 2 leads and marks A dead
        await leads(lambda: electing[0].leading, "replica 2 leads")
        await until(lambda: death_marked(r2))
        made += await replicas(tmp_path, etcd, count=1, ttl=2.0, first=4)

        async def listed():
            return all([await nodes_shown(r) == [(A, HOST, False)] for r in made[1:]])
        await until(listed)
    finally:
        await stop_all([bare] + electing, made)


@pytest_twisted.ensureDeferred
async def test_forgotten_node_loses_its_mark(tmp_path, etcd):
    """
    Node A, dead as the leader (replica 2) marked it, is forgotten through replica 2's
    REST API: its mark is deleted from etcd, and a replica started afterwards does not
    list it.
    """
    made = await replicas(tmp_path, etcd, ttl=2.0)
    r1, r2 = made
    electing = []
    try:
        electing = following(etcd, [r2])
        await leads(lambda: electing[0].leading, "replica 2 leads")
        r1.agent()

        async def shown():
            return await alive_nodes(r2) == [A]
        await until(shown)
        await r1.close()

        async def dead():
            return await nodes_shown(r2) == [(A, HOST, False)]
        await until(dead)
        assert await death_marked(r2)
        response = await r2.http.delete(
            f"http://127.0.0.1:{r2.port.getHost().port}/v1/state/nodes/{A}")
        await response.content()
        assert response.code == 200
        await until(lambda: not r2.shared._waiting)
        assert not await death_marked(r2)
        made += await replicas(tmp_path, etcd, count=1, ttl=2.0, first=3)
        assert await nodes_shown(made[-1]) == []
    finally:
        await stop_all(electing, made)


def forgets(replica) -> list[str]:
    """The uuids of the nodes ``replica`` forgets from now on, as they go."""
    gone: list[str] = []
    replica.cluster.on_forget(gone.append)
    return gone


async def marked_dead_on(etcd, made) -> list[EtcdLeadership]:
    """Replica 2 leads, replica 3 follows; node A's agent talked to replica 1, which
    closed: once both list A dead as marked (the candidates returned)."""
    r1, r2, r3 = made
    electing = following(etcd, [r2])
    await leads(lambda: electing[0].leading, "replica 2 leads")
    electing += following(etcd, [r3])
    await leads(lambda: electing[1].leader == "c2", "replica 3 knows it")
    r1.agent()

    async def shown():
        return all([await alive_nodes(r) == [A] for r in (r2, r3)])
    await until(shown)
    await r1.close()

    async def dead():
        return all([await nodes_shown(r) == [(A, HOST, False)] for r in (r2, r3)])
    await until(dead)
    assert await death_marked(r2)
    return electing


@pytest_twisted.ensureDeferred
async def test_node_forgotten_on_one_replica_is_forgotten_on_the_others(tmp_path, etcd):
    """
    Node A, dead as marked, is forgotten through replica 3's REST API: replica 2 (the
    leader) sees the mark deleted with no report and stops listing A too, writing
    nothing to etcd.
    """
    made = await replicas(tmp_path, etcd, count=3, ttl=2.0)
    r1, r2, r3 = made
    electing = []
    try:
        electing = await marked_dead_on(etcd, made)
        gone, writes = forgets(r2), r2.shared.writes
        response = await r3.http.delete(
            f"http://127.0.0.1:{r3.port.getHost().port}/v1/state/nodes/{A}")
        await response.content()
        assert response.code == 200

        async def forgotten():
            return await nodes_shown(r2) == []
        await until(forgotten)
        assert not await death_marked(r2)
        assert (gone, r2.shared.writes) == ([A], writes)
        assert await nodes_shown(r3) == []
    finally:
        await stop_all(electing, made)


@pytest_twisted.ensureDeferred
async def test_node_coming_back_is_not_forgotten(tmp_path, etcd):
    """
    Node A, dead as marked, comes back: its agent says hello to replica 3, whose claim
    deletes the mark. Neither replica forgets A; both list it alive.
    """
    made = await replicas(tmp_path, etcd, count=3, ttl=2.0)
    r1, r2, r3 = made
    electing = []
    try:
        electing = await marked_dead_on(etcd, made)
        gone2, gone3 = forgets(r2), forgets(r3)
        r3.agent()

        async def alive():
            return all([await alive_nodes(r) == [A] for r in (r2, r3)])
        await until(alive)
        await until(lambda: not r2.shared.deaths.unmarked and r2.shared.watched >= max(
            r3.shared._owned.values(), default=0))
        assert not await death_marked(r2)
        assert (gone2, gone3) == ([], [])
        assert await alive()
    finally:
        await stop_all(electing, made)
