"""
Issue 9 point 5 and issue 12 point 3, on a real etcd: agents (the real ``AgentChannel``)
connected to replica 1 of two ``pyflock-control run --store etcd`` replicas move to replica
2 when replica 1 stops, and resume with one diff based on their view (``Diff.base``), not
a snapshot, ending with the view a fresh agent of replica 2 gets; an agent whose resume
point is older than what replica 2 has followed (it started after) gets a snapshot.
"""

from __future__ import annotations

import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from pyflock.agent._channel import AgentChannel
from pyflock.agent._view import AgentView
from pyflock.common._tls import client_tls_options, tls_client_endpoint
from pyflock.common._wire import Diff, Snapshot
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, free_address
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"

#: Agents moving; heartbeats fast, so that they learn a resume point soon.
AGENTS, HEARTBEAT = 3, 0.5

etcd = etcd_cluster_fixture(1)


def _reactor():
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def replicas(tmp_path, etcd):
    """The cluster's certificates and two started replicas on one fresh prefix."""
    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=AGENTS + 1, users=("alice",),
                                        control_host=host)
    prefix = f"/switch-{uuid4().hex[:8]}/"
    processes = [ControlProcess(tmp_path / f"data{n}", folder, host=host,
                                log_directory=tmp_path / "logs", extra_arguments=[
                                    "--store", "etcd", "--etcd-endpoints", etcd.endpoints[0],
                                    "--etcd-prefix", prefix, "--heartbeat", str(HEARTBEAT)])
                 for n in range(2)]
    try:
        for process in processes:
            process.start()
        yield cluster, processes
    finally:
        for process in processes:
            process.close()


class Agent:
    """One node's real channel to the replicas, in order, keeping what made each view."""

    def __init__(self, cluster, node: str, replicas, view: AgentView = AgentView()):
        reactor = _reactor()
        endpoints = [tls_client_endpoint(reactor, r.host, r.agent_port, client_tls_options(
            cluster.node_directory(node), "node", r.host)) for r in replicas]
        self.changes: list = []
        self.channel = AgentChannel(reactor, endpoints, node, "era-" + node[:8],
                                    lambda view: self.changes.append(self.channel.change),
                                    address="127.0.0.1", view=view, heartbeat=HEARTBEAT,
                                    timeout=3 * HEARTBEAT, chance=lambda: 0.0,
                                    retry_policy=lambda rounds: 0.2)
        self.channel.report_state([])

    def kinds(self) -> list[str]:
        """What each change was: snapshot, diff, or resume (a diff with a base)."""
        return ["snapshot" if isinstance(c, Snapshot) else
                "resume" if isinstance(c, Diff) and c.base is not None else "diff"
                for c in self.changes]


async def until(check, what: str, timeout: float = 15.0) -> None:
    """Poll ``check()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        await deferLater(_reactor(), 0.05, lambda: None)


async def create(client: APIClient, cluster, name: str) -> str:
    """Create a dataset ``name`` through ``client``; its id."""
    answer = await client.post(DATASETS, {"primary": cluster.node_uuids[0],
                                          "metadata": {"name": name}})
    assert answer.code == 201, answer
    return answer.json["dataset_id"]


def content(view: AgentView) -> tuple:
    """What a view says, whatever its epoch and version."""
    return dict(view.datasets), dict(view.nodes)


async def synced_on_replica_1(cluster, processes, client) -> tuple[list[Agent], set]:
    """Agents on replica 1 holding a few datasets and a resume point, and the ids."""
    ids = {await create(client, cluster, f"before{n}") for n in range(3)}
    agents = [Agent(cluster, node, processes) for node in cluster.node_uuids[:AGENTS]]
    for agent in agents:
        agent.channel.start()
    await until(lambda: all(ids <= set(a.channel.view.datasets) and a.channel.resume
                            is not None for a in agents), "the first sync")
    assert {a.channel.replica for a in agents} == {"replica-0"}
    return agents, ids


@pytest_twisted.ensureDeferred
async def test_agents_move_to_replica_2_with_a_diff(replicas):
    """
    Replica 1 stops after a few changes: its agents move to replica 2, each gets one
    resume diff (no snapshot), and ends with the view a fresh agent of replica 2 gets.
    """
    cluster, processes = replicas
    client = APIClient(_reactor(), processes[0].url, cluster.path, "alice")
    agents, ids = await synced_on_replica_1(cluster, processes, client)
    fresh = None
    try:
        told = max(a.channel.resume.revision for a in agents)
        ids.add(await create(client, cluster, "after"))
        # A resume point follows the configuration (docs/ha.md, "Limits"): after this
        # change it is past the revision replica 2 first read the reports at.
        await until(lambda: all(ids <= set(a.channel.view.datasets)
                                and a.channel.resume.revision > told for a in agents),
                    "the change and its resume point")
        for agent in agents:
            agent.changes.clear()
        await deferToThread(processes[0].stop)
        await until(lambda: all(a.channel.replica == "replica-1" and a.changes
                                for a in agents), "the move to replica 2")
        fresh = Agent(cluster, cluster.node_uuids[AGENTS], processes[1:])
        fresh.channel.start()
        await until(lambda: fresh.changes and all(
            a.channel.view.current == fresh.channel.view.current for a in agents),
            "one view on replica 2")
        for agent in agents:
            kinds = agent.kinds()
            assert "snapshot" not in kinds and kinds[0] == "resume", kinds
            assert content(agent.channel.view) == content(fresh.channel.view)
        assert fresh.kinds()[0] == "snapshot"
        assert ids <= set(fresh.channel.view.datasets)
    finally:
        await client.close()
        for agent in agents + ([fresh] if fresh else []):
            await agent.channel.stop()


@pytest_twisted.ensureDeferred
async def test_resume_point_older_than_replica_2_gets_a_snapshot(replicas):
    """
    Agents hold a view of replica 1 and its resume point; replica 2 restarts (it has
    followed the store only since) and a change is made: resuming there is a snapshot.
    """
    cluster, processes = replicas
    client = APIClient(_reactor(), processes[0].url, cluster.path, "alice")
    agents, ids = await synced_on_replica_1(cluster, processes, client)
    moved = []
    try:
        for agent in agents:
            await agent.channel.stop()
        await deferToThread(processes[1].stop)
        ids.add(await create(client, cluster, "meanwhile"))
        await deferToThread(processes[0].stop)
        await deferToThread(processes[1].start)
        for agent in agents:
            again = Agent(cluster, agent.channel.node_uuid, processes[1:],
                          view=agent.channel.view)
            again.channel.resume = agent.channel.resume
            moved.append(again)
            again.channel.start()
        await until(lambda: all(ids <= set(a.channel.view.datasets) for a in moved),
                    "the sync on replica 2")
        assert all(a.kinds()[0] == "snapshot" for a in moved), [a.kinds() for a in moved]
    finally:
        await client.close()
        for agent in agents + moved:
            await agent.channel.stop()
