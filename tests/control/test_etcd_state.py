"""
Shared cluster state on a real etcd member (issue 9, point 3), with two replicas in one
process (each a configuration service, cluster state, agent channel and REST API on one
prefix, sharing reports through ``SharedReports``) and agents speaking the real channel
protocol over in-memory transports: a report made to replica 1 is in replica 2's state
API; a report is written to etcd once per change, not per heartbeat; a replica's death
(its lease revoked, or let expire) takes its reports away; an agent that moves to the
other replica is published by it at once; a replica whose lease was lost claims its nodes
again under a new one; ``GET /v1/state/control`` lists the replicas, the leader and the
etcd members.
"""

from __future__ import annotations

import hashlib
import json
import time
from uuid import uuid4

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site
from twisted.internet.task import deferLater

from pyflock.common._model import Dataset
from pyflock.common._tls import AGENT_CHANNEL
from pyflock.common._wire import DatasetReport, Heartbeat, StateReport
from pyflock.control._agentchannel import AgentChannelServer
from pyflock.control._api import ControlAPI, __version__
from pyflock.control._clusterstate import ClusterStateService
from pyflock.control._etcd_model import b64
from pyflock.control._etcd_state import SharedReports
from pyflock.control._etcd_state_model import ReplicaInfo
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._etcd_watch import follow
from pyflock.control._openapi import build_openapi
from pyflock.control._persistence import ConfigurationService
from pyflock.control.testing import ALICE, NODE_A, validate_response
from tests.control.test_agentchannel import RawAgent
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

etcd = etcd_cluster_fixture(1)

A = NODE_A.node_uuid
OPENAPI = build_openapi(__version__)


def _reactor():
    from twisted.internet import reactor
    return reactor


class Replica:
    """One control replica's parts in this process, on ``prefix``."""

    @classmethod
    async def open(cls, etcd, prefix: str, name: str, ttl: float = 10.0) -> "Replica":
        """A started replica named ``name`` whose reports are bound to a ``ttl`` lease."""
        self = cls()
        reactor = _reactor()
        self.store = await open_etcd_store(reactor, etcd.endpoints, prefix)
        self.configuration = await ConfigurationService.load(self.store, reactor)
        follow(reactor, self.configuration, self.store, interval=1.0, deadline=1.0)
        self.cluster = ClusterStateService(reactor)
        self.shared = SharedReports(reactor, self.store.gateway, self.store.keys,
                                    ReplicaInfo(name, f"{name}.example:4523",
                                                reactor.seconds()), ttl)
        self.channel = AgentChannelServer(
            self.configuration, self.cluster, reactor, reports=self.shared,
            identify=lambda transport: AGENT_CHANNEL.admit(transport.identity))
        self.channel.start()
        await self.shared.start(self.channel.shared.merge)
        api = ControlAPI(self.configuration, self.cluster, lambda r: ALICE, OPENAPI,
                         status=self.shared.status)
        # Plain HTTP on loopback: TLS is not what these tests are about.
        self.port = reactor.listenTCP(0, Site(api.resource()), interface="127.0.0.1")
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        self.agents: list[RawAgent] = []
        self.stopped = False
        return self

    def agent(self, **hello) -> RawAgent:
        """A welcomed connection of node A's agent to this replica."""
        agent = RawAgent(self.channel, NODE_A)
        agent.hello(**hello)
        self.agents.append(agent)
        return agent

    async def get(self, path: str):
        """A REST API GET as a user, checked against the OpenAPI document."""
        response = await self.http.get(
            f"http://127.0.0.1:{self.port.getHost().port}{path}")
        body = json.loads(await response.content())
        validate_response(OPENAPI, "GET", path, response.code, body)
        return body

    async def report_version(self, node_uuid: str = A) -> int:
        """How many times etcd has had the node's report put since it was created."""
        keys = self.store.keys
        answer = await self.store.gateway.call("kv/range", {"key": b64(keys.report(node_uuid))})
        return int((answer.get("kvs") or [{}])[0].get("version", 0))

    async def close(self) -> None:
        """Stop everything this replica started (its agents' connections dropped first)."""
        if self.stopped:
            return
        self.stopped = True
        for agent in self.agents:
            if agent.protocol.connected:
                agent.lose()
        await self.port.stopListening()
        await self.shared.stop()
        await self.channel.stop()
        await self.configuration.stop()


async def replicas(tmp_path, etcd, count: int = 2, ttl: float = 10.0,
                   first: int = 1) -> list[Replica]:
    """``count`` replicas on the test's prefix, ``c<first>``, ``c<first + 1>``, ..."""
    prefix = f"/state-test/{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]}/"
    return [await Replica.open(etcd, prefix, f"c{first + n}", ttl) for n in range(count)]


async def created(first: Replica, others) -> str:
    """A dataset created through ``first`` with A as primary, once every other has it."""
    dataset = Dataset(dataset_id=str(uuid4()), primary=A, metadata={"name": "db"})
    await first.configuration.change([dataset.dataset_id], lambda c: c.create(dataset))
    await until(lambda: all(dataset.dataset_id in r.configuration.committed.datasets
                            for r in others))
    return dataset.dataset_id


def report(*dataset_ids: str, state: str = "mounted") -> StateReport:
    """Node A's report of holding ``dataset_ids``."""
    return StateReport(node_uuid=A, datasets=tuple(
        DatasetReport(d, state, "/m/" + d) for d in dataset_ids))


async def until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` (maybe async) every 10 ms until it holds (fails after ``timeout``)."""
    started = time.monotonic()
    while True:
        result = condition()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        assert time.monotonic() - started < timeout, "the condition did not hold in time"
        await deferLater(_reactor(), 0.01, lambda: None)


async def alive_nodes(replica: Replica) -> list[str]:
    """The uuids of the nodes replica's state API shows alive."""
    return [n["uuid"] for n in await replica.get("/v1/state/nodes") if n["alive"]]


async def datasets_shown(replica: Replica, dataset_ids: list) -> bool:
    """Whether replica's state API shows exactly ``dataset_ids`` held."""
    return [d["dataset_id"] for d in await replica.get("/v1/state/datasets")] == dataset_ids


async def reported(r1: Replica, r2: Replica, both) -> str:
    """A dataset created through ``r1``, reported mounted by node A's agent connected to
    ``r1``, once ``r2``'s state API shows it."""
    dataset_id = await created(r1, both)
    r1.agent().send(report(dataset_id))
    await until(lambda: datasets_shown(r2, [dataset_id]))
    return dataset_id


@pytest_twisted.ensureDeferred
async def test_report_reaches_the_other_replica(tmp_path, etcd):
    """A report made to replica 1 is in replica 2's state API, the same as replica 1's."""
    r1, r2 = both = await replicas(tmp_path, etcd)
    try:
        await reported(r1, r2, both)
        assert await r2.get("/v1/state/datasets") == await r1.get("/v1/state/datasets")
        assert await alive_nodes(r2) == [A]
        assert r2.cluster.state.nodes[A].remote == "c1"
    finally:
        for r in both:
            await r.close()


@pytest_twisted.ensureDeferred
async def test_written_once_per_change_not_per_heartbeat(tmp_path, etcd):
    """
    An agent's hello and each change of its report write its key once; heartbeats and
    unchanged reports write nothing (etcd's own count of the key's puts; changes that
    queue behind a write in flight would even share one).
    """
    [r1] = both = await replicas(tmp_path, etcd, count=1)
    try:
        dataset_id = await created(r1, both)
        agent = r1.agent()
        await until(lambda: not r1.shared._waiting)
        assert await r1.report_version() == 1  # the claim
        for _ in range(5):
            agent.send(report(dataset_id, state="attaching"))
            agent.send(Heartbeat())
        await until(lambda: not r1.shared._waiting)
        assert await r1.report_version() == 2  # the first report
        for _ in range(5):
            agent.send(report(dataset_id))
            agent.send(Heartbeat())
        await until(lambda: not r1.shared._waiting)
        assert await r1.report_version() == 3
    finally:
        for r in both:
            await r.close()


@pytest.mark.parametrize("death", ["revoked", "expired"])
@pytest_twisted.ensureDeferred
async def test_dead_replica_reports_vanish(tmp_path, etcd, death):
    """
    When replica 1 stops (its lease revoked) or dies (its lease no longer kept alive,
    expiring after its 2 s TTL; stopped afterwards), replica 2 shows the node it
    published dead, holding nothing, and its announcement is gone.
    """
    r1, r2 = both = await replicas(tmp_path, etcd, ttl=2.0)
    try:
        dataset_id = await created(r1, both)
        r1.agent().send(report(dataset_id))

        async def shown():
            return await alive_nodes(r2) == [A]
        await until(shown)
        if death == "revoked":
            await r1.close()
        else:
            # As kill -9 would: nothing of its sharing runs any more, nothing is revoked.
            r1.shared._stopped = True
            r1.shared._keepalive.stop()
            r1.shared._stream.abort()

        async def gone():
            return await alive_nodes(r2) == []
        await until(gone)
        assert await r2.get("/v1/state/datasets") == []
        assert [r["name"] for r in (await r2.get("/v1/state/control"))["replicas"]] == ["c2"]
    finally:
        for r in both:
            await r.close()


@pytest_twisted.ensureDeferred
async def test_agent_moving_is_republished_at_once(tmp_path, etcd):
    """
    An agent that moves from replica 1 to replica 2 is claimed by replica 2 on its hello,
    before any report, with what it held; replica 1 then shows it as replica 2's, drops
    its old connection, and its expiry there neither kills nor withdraws it.
    """
    r1, r2 = both = await replicas(tmp_path, etcd)
    try:
        dataset_id = await created(r1, both)
        old = r1.agent()
        old.send(report(dataset_id))
        await until(lambda: dataset_id in getattr(r2.cluster.state.nodes.get(A), "datasets",
                                                  ()))
        r2.agent()
        await until(lambda: r1.cluster.state.nodes[A].remote == "c2")
        assert old.closed
        assert list(r1.cluster.state.nodes[A].datasets) == [dataset_id]
        r1.channel._expire(A)  # the old connection's silence
        await until(lambda: not r1.shared._waiting)
        assert await alive_nodes(r1) == [A] and await alive_nodes(r2) == [A]
        assert [d["primary"] for d in await r1.get("/v1/state/datasets")] == [A]
    finally:
        for r in both:
            await r.close()


@pytest_twisted.ensureDeferred
async def test_control_status_on_etcd(tmp_path, etcd):
    """``GET /v1/state/control`` lists both replicas, the leader by the oldest campaign
    key, and the etcd member, the same through either replica."""
    r1, r2 = both = await replicas(tmp_path, etcd)
    try:
        keys = r1.store.keys
        await r1.store.gateway.call("kv/put", {"key": b64(keys.election + b"a1"),
                                               "value": b64(b"c2")})
        body = await r1.get("/v1/state/control")
        assert (body["store"], body["replica"], body["leader"]) == ("etcd", "c1", "c2")
        assert [(r["name"], r["address"], r["leader"]) for r in body["replicas"]] == [
            ("c1", "c1.example:4523", False), ("c2", "c2.example:4523", True)]
        assert [m["client_urls"] for m in body["etcd_members"]] == [etcd.endpoints]
        again = await r2.get("/v1/state/control")
        assert dict(again, replica="c1") == body
    finally:
        for r in both:
            await r.close()


@pytest_twisted.ensureDeferred
async def test_lost_lease_is_replaced_and_reports_claimed_again(tmp_path, etcd):
    """
    A replica whose lease etcd no longer has (revoked behind its back, as an expiry while
    it was cut off would) takes a new one, announces itself again and claims its nodes
    again: replica 2 sees the node alive with its dataset once more.
    """
    r1, r2 = both = await replicas(tmp_path, etcd)
    try:
        dataset_id = await reported(r1, r2, both)
        lost = r1.shared.lease
        await r2.store.gateway.call("lease/revoke", {"ID": str(lost)})
        await until(lambda: r1.shared.lease != lost)

        async def claimed_again():
            answer = await r2.store.gateway.call(
                "kv/range", {"key": b64(r2.store.keys.report(A))})
            return [kv.get("lease") for kv in answer.get("kvs", [])] == [
                str(r1.shared.lease)]
        await until(claimed_again)
        await until(lambda: datasets_shown(r2, [dataset_id]))
        assert r2.cluster.state.nodes[A].remote == "c1"
        status = await r2.get("/v1/state/control")
        assert [r["name"] for r in status["replicas"]] == ["c1", "c2"]
    finally:
        for r in both:
            await r.close()
