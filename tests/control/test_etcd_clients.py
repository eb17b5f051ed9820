"""
Clients follow control service replicas (issue 9, points 5 and 7), on a real three-member
etcd, three real ``pyflock-control`` replicas and two real agents (loopback backend, root):

- kill -9 of a replica while 8 clients (pyflock's own REST client, given every replica,
  each starting at another) write: every acknowledged create is listed afterwards by every
  surviving replica, the clients carry on, and the agents move to another replica and go
  on converging;
- the agents' replica is killed right after a move is acknowledged: the move completes
  through another replica, and a sampler never sees the dataset attached to, nor mounted
  on, two nodes.

Switch times and counts are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from pyflock.common._client import AnswerLost, ControlError
from pyflock.common._model import MINIMUM_SIZE
from tests.agent.test_agents_integration import HolderSampler, checksum, poll, write_random
from tests.harness.etcd import etcd_cluster_fixture
from tests.harness.processes import run_to_completion, script_path
from tests.harness.replicas import ReplicatedCluster
from tests.harness.requirements import ROOT

pytestmark = [pytest.mark.integration, ROOT]

#: Concurrent writers in the kill -9 test.
WRITERS = 8

#: Acknowledged creates each writer must make after the kill.
AFTER_KILL = 5

#: Bound on any one wait.
TIMEOUT = 30.0

etcd = etcd_cluster_fixture(3)


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def cluster(tmp_path, etcd):
    """Three replicas on a fresh prefix and two agents, all agents on replica 0."""
    local = ReplicatedCluster(etcd.endpoints, tmp_path / "cluster", nodes=2)
    try:
        local.start()
        yield local
    finally:
        local.close()


async def mounted_only_on(reactor, cluster, dataset_id: str, node_uuid: str) -> None:
    """Wait until the host shows ``dataset_id`` attached and mounted on ``node_uuid`` only."""
    def check():
        holders = cluster.holders(dataset_id)
        return (holders.mounted_on == {node_uuid} and len(holders.devices) == 1
                and holders.recorded_node == node_uuid)
    await poll(reactor, check, f"{dataset_id} mounted on {node_uuid} only", TIMEOUT)


def switch_times(cluster, killed_at: float) -> list[float]:
    """Seconds from ``killed_at`` (wall clock) to each agent's welcome by another replica."""
    times = []
    for agent in cluster.agents:
        event = agent.wait_for_event_sync("pyflock:agent:control-switched", timeout=TIMEOUT)
        times.append(event["time"] - killed_at)
    return times


@pytest_twisted.ensureDeferred
async def test_kill9_replica_while_clients_write(reactor, cluster):
    """
    8 clients create datasets through all three replicas while the agents' replica is
    killed (-9): every create acknowledged is listed afterwards by both survivors, each
    client (and the CLI) goes on through the others, the agents switch replica and still
    converge.
    """
    pools = [HTTPConnectionPool(reactor, persistent=True) for _ in range(WRITERS)]
    clients = [cluster.control_client(reactor, first=n % 3, pool=pools[n])
               for n in range(WRITERS)]
    nowhere = str(uuid4())  # a primary no agent is: nothing is created on the host
    acknowledged: set[str] = set()
    lost: list[str] = []
    refused: list[str] = []
    after_kill = [0] * WRITERS
    killed = [False]

    async def write(n: int) -> None:
        count = 0
        while after_kill[n] < AFTER_KILL:
            count += 1
            try:
                dataset = await clients[n].create_dataset(
                    nowhere, MINIMUM_SIZE, {"name": f"w{n}-{count}"})
            except AnswerLost as e:
                lost.append(str(e))
                continue
            except ControlError as e:
                refused.append(str(e))
                await deferLater(reactor, 0.05, lambda: None)
                continue
            acknowledged.add(dataset.dataset_id)
            if killed[0]:
                after_kill[n] += 1
    writers = gatherResults([Deferred.fromCoroutine(write(n)) for n in range(WRITERS)])
    try:
        await poll(reactor, lambda: len(acknowledged) >= 3 * WRITERS, "writes before kill")
        victim = cluster.replicas[0]
        killed_at = time.time()
        victim.kill9()
        killed[0] = True
        before = len(acknowledged)
        await writers.addTimeout(TIMEOUT, reactor)

        survivors = cluster.replicas[1:]
        for n, replica in enumerate(survivors, start=1):
            api = cluster.api_client(reactor, replica=n)

            async def missing():
                listed = {d["dataset_id"] for d in (await api.get(
                    "/v1/configuration/datasets")).json}
                return acknowledged - listed
            try:
                # A create acknowledged by the other survivor reaches this one by its
                # watch within milliseconds: wait for that, not for anything lost.
                try:
                    await poll(reactor, lambda: Deferred.fromCoroutine(missing()).addCallback(
                        lambda left: not left), "every acknowledged create listed", 5.0)
                except TimeoutError:
                    pass
                assert await missing() == set(), f"lost by replica {replica.host}"
            finally:
                await api.close()
        switched = switch_times(cluster, killed_at)
        print(f"\n[ha] {WRITERS} writers: {len(acknowledged)} creates acknowledged "
              f"({before} before the kill), 0 of them missing on {len(survivors)} "
              f"survivors; {len(lost)} answers lost (may have been done), "
              f"{len(refused)} refused; agents switched replica "
              f"{', '.join(f'{t * 1000:.0f}' for t in switched)} ms after the kill")
        assert all(count >= AFTER_KILL for count in after_kill)

        # The CLI given every replica, the dead one first, answers through the others.
        listed = run_to_completion([
            script_path("pyflock"), "--control-service", ",".join(cluster.replica_hosts),
            "--control-port", str(victim.port), "--certs-path", str(cluster.certificates.path),
            "--user", "alice", "list"])
        assert listed.returncode == 0, listed.stderr
        assert "w0-1" in listed.stdout

        # The agents converge through their new replica.
        node = cluster.node_uuids[0]
        api = cluster.api_client(reactor, replica=1)
        try:
            created = await api.post("/v1/configuration/datasets", {
                "primary": node, "maximum_size": MINIMUM_SIZE,
                "metadata": {"name": "after-the-kill"}})
            assert created.code == 201, created
        finally:
            await api.close()
        await mounted_only_on(reactor, cluster, created.json["dataset_id"], node)
    finally:
        writers.cancel()
        for pool in pools:
            await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_agents_replica_dies_during_a_move(reactor, cluster):
    """
    The replica both agents use is killed (-9) right after it acknowledged a move: the
    move completes through another replica, the data intact, and a sampler never sees
    the dataset on two nodes at once.
    """
    n1, n2 = cluster.node_uuids
    client = cluster.control_client(reactor, first=0)
    dataset = await client.create_dataset(n1, MINIMUM_SIZE, {"name": "moving"})
    await mounted_only_on(reactor, cluster, dataset.dataset_id, n1)
    written = write_random(cluster.agent(n1).mount_point(dataset.dataset_id))
    sampler = HolderSampler(cluster, dataset.dataset_id)
    sampler.start()
    try:
        await client.move_dataset(dataset.dataset_id, n2)
        killed_at = time.time()
        cluster.replicas[0].kill9()
        await mounted_only_on(reactor, cluster, dataset.dataset_id, n2)
        took = time.time() - killed_at
    finally:
        sampler.stop()
    switched = switch_times(cluster, killed_at)
    print(f"\n[ha] move completed through another replica {took * 1000:.0f} ms after the "
          f"kill (agents switched after {', '.join(f'{t * 1000:.0f}' for t in switched)} "
          f"ms); {sampler.samples} samples, holders seen "
          f"{[cluster.node_uuids.index(h) + 1 for h in sampler.sequence]}")
    assert sampler.violations == []
    assert sampler.sequence[-1] == n2
    assert checksum(cluster.agent(n2).mount_point(dataset.dataset_id)) == written
