"""
Two real ``pyflock-control run --store etcd`` replicas on one prefix of a three-member etcd
cluster (issue 9, point 2): a change through one is read back through the other with the
same tag; a compare-and-swap race and a race for one name across replicas each have
exactly one winner; an agent connected to replica 2 is pushed a dataset created through
replica 1, and is alive in replica 1's state (issue 9, point 3); a replica whose only
etcd member is stopped refuses changes with 503 within a
few seconds and takes them again once it answers; after its member comes back from a
kill -9 past a compaction, the replica serves the right configuration.

Replica 1 talks to members 0 and 1; replica 2 to member 2 alone, checking it every 0.5 s.
The tests run in order and share the replicas.
"""

from __future__ import annotations

import json
import time
import urllib.request
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from pyflock.common._tls import client_tls_options, tls_client_endpoint
from pyflock.common._wire import Diff, Hello, MessageProtocol, Snapshot
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, free_address
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"

#: Seconds between replica 2's checks of its member.
CHECK_INTERVAL = 0.5

etcd = etcd_cluster_fixture(3)


def _reactor():
    from twisted.internet import reactor
    return reactor


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, etcd):
    """The cluster's certificates and two started replicas on one fresh prefix."""
    root = tmp_path_factory.mktemp("replicas")
    folder = root / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=1, users=("alice",), control_host=host)
    prefix = f"/replicas-{uuid4().hex[:8]}/"
    endpoints = [",".join(etcd.endpoints[:2]), etcd.endpoints[2]]
    processes = [ControlProcess(root / f"data{n}", folder, host=host,
                                log_directory=root / "logs", extra_arguments=[
                                    "--store", "etcd", "--etcd-endpoints", endpoints[n],
                                    "--etcd-prefix", prefix,
                                    "--etcd-check-interval", str(CHECK_INTERVAL)])
                 for n in range(2)]
    try:
        for process in processes:
            process.start()
        yield cluster, processes
    finally:
        for process in processes:
            process.close()


@pytest_twisted.async_yield_fixture
async def clients(replicas):
    """A REST client of alice's for each replica."""
    cluster, processes = replicas
    made = [APIClient(_reactor(), p.url, cluster.path, "alice") for p in processes]
    yield made
    for client in made:
        await client.close()


def creation(cluster, name: str) -> dict:
    """The body creating a dataset called ``name`` on the cluster's node."""
    return {"primary": cluster.node_uuids[0], "metadata": {"name": name}}


def by_id(listing: list) -> dict:
    """A listing's datasets by id (listings need not keep one order)."""
    return {d["dataset_id"]: d for d in listing}


async def until_listed(client: APIClient, dataset_id: str, timeout: float = 5.0):
    """Poll ``client``'s listing until it has ``dataset_id``; (the listing, seconds)."""
    started = time.monotonic()
    while True:
        listed = await client.get(DATASETS)
        if dataset_id in {d["dataset_id"] for d in listed.json}:
            return listed, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{dataset_id} not listed in time"
        await deferLater(_reactor(), 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_change_through_one_replica_is_read_through_the_other(replicas, clients):
    """Created through replica 1, read through replica 2 within 1 s with the same tag."""
    cluster, _ = replicas
    one, two = clients
    for n in range(3):
        created = await one.post(DATASETS, creation(cluster, f"seen{n}"))
        assert created.code == 201, created
        listed, took = await until_listed(two, created.json["dataset_id"], timeout=1.0)
        assert listed.headers["x-configuration-tag"] == created.headers["x-configuration-tag"]
        assert by_id(listed.json) == by_id((await one.get(DATASETS)).json)
    moved = await two.post(f"{DATASETS}/{created.json['dataset_id']}",
                           {"metadata": {"name": "renamed"}})
    assert moved.code == 200, moved
    again = await one.get(DATASETS)
    for _ in range(100):
        if again.headers["x-configuration-tag"] == moved.headers["x-configuration-tag"]:
            break
        await deferLater(_reactor(), 0.01, lambda: None)
        again = await one.get(DATASETS)
    assert again.headers["x-configuration-tag"] == moved.headers["x-configuration-tag"]
    assert {d["metadata"].get("name") for d in again.json} >= {"renamed"}


@pytest_twisted.ensureDeferred
async def test_compare_and_swap_race_across_replicas(replicas, clients):
    """Two creates with one X-If-Configuration-Matches through each replica: one wins."""
    cluster, _ = replicas
    for n in range(4):
        tag = (await clients[0].get(DATASETS)).headers["x-configuration-tag"]
        await until_tag(clients[1], tag)
        answers = await DeferredList([
            Deferred.fromCoroutine(client.post(
                DATASETS, creation(cluster, f"cas{n}-{i}"),
                headers={"x-if-configuration-matches": tag}))
            for i, client in enumerate(clients)], fireOnOneErrback=True)
        codes = sorted(answer.code for _, answer in answers)
        assert codes == [201, 412], [a for _, a in answers]


async def until_tag(client: APIClient, tag: str, timeout: float = 2.0) -> None:
    """Poll ``client``'s listing until its tag is ``tag``."""
    deadline = time.monotonic() + timeout
    while (await client.get(DATASETS)).headers["x-configuration-tag"] != tag:
        assert time.monotonic() < deadline, f"tag {tag} not reached in time"
        await deferLater(_reactor(), 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_same_name_through_both_replicas_once(replicas, clients):
    """Two creates of one name at once through each replica: one 201, one 409."""
    cluster, _ = replicas
    for n in range(4):
        answers = await DeferredList([
            Deferred.fromCoroutine(client.post(DATASETS, creation(cluster, f"twin{n}")))
            for client in clients], fireOnOneErrback=True)
        codes = sorted(answer.code for _, answer in answers)
        assert codes == [201, 409], [a for _, a in answers]
    names = [d["metadata"]["name"] for d in (await clients[0].get(DATASETS)).json]
    assert all(names.count(f"twin{n}") == 1 for n in range(4))


class _Listener(MessageProtocol):
    """An agent's end of the channel: says hello, keeps every message; ``seen`` by type."""

    def __init__(self, hello):
        super().__init__()
        self.hello = hello
        self.messages: list = []

    def connectionMade(self):
        self.send(self.hello)

    def message_received(self, message):
        self.messages.append(message)

    def datasets(self) -> set:
        """The dataset ids the snapshot and diffs received told."""
        return {entry.dataset_id for m in self.messages if isinstance(m, (Snapshot, Diff))
                for entry in m.datasets}


async def connect_agent(cluster, replica, era: str) -> "_Listener":
    """The cluster's node's agent connected to ``replica``'s channel, hello said."""
    node = cluster.node_uuids[0]
    options = client_tls_options(cluster.node_directory(node), "node", replica.host)
    endpoint = tls_client_endpoint(_reactor(), replica.host, replica.agent_port, options)
    agent = _Listener(Hello(node_uuid=node, era=era, address=replica.host))
    await endpoint.connect(Factory.forProtocol(lambda: agent))
    return agent


@pytest_twisted.ensureDeferred
async def test_agent_on_replica_2_is_pushed_a_change_made_through_replica_1(
        replicas, clients):
    """An agent connected to replica 2 receives the dataset created through replica 1."""
    cluster, processes = replicas
    reactor = _reactor()
    agent = await connect_agent(cluster, processes[1], "era-test")
    try:
        deadline = time.monotonic() + 5
        while not any(isinstance(m, Snapshot) for m in agent.messages):
            assert time.monotonic() < deadline, agent.messages
            await deferLater(reactor, 0.01, lambda: None)
        created = await clients[0].post(DATASETS, creation(cluster, "pushed"))
        dataset_id = created.json["dataset_id"]
        while dataset_id not in agent.datasets():
            assert time.monotonic() < deadline + 5, agent.messages
            await deferLater(reactor, 0.01, lambda: None)
    finally:
        agent.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_node_on_replica_2_is_alive_on_replica_1(replicas, clients):
    """
    Issue 9, point 3: a node whose agent says hello to replica 2 is alive in replica 1's
    state API (replica 2 published it in etcd), and ``GET /v1/state/control`` through
    either replica lists both replicas and the three etcd members.
    """
    cluster, processes = replicas
    reactor = _reactor()
    node = cluster.node_uuids[0]
    agent = await connect_agent(cluster, processes[1], "era-shared")
    try:
        deadline = time.monotonic() + 5
        while not [n for n in (await clients[0].get("/v1/state/nodes")).json
                   if n["uuid"] == node and n["alive"]]:
            assert time.monotonic() < deadline, "replica 1 does not show the node alive"
            await deferLater(reactor, 0.05, lambda: None)
        for client in clients:
            status = (await client.get("/v1/state/control")).json
            assert (status["store"], len(status["replicas"]), len(status["etcd_members"])) \
                == ("etcd", 2, 3), status
    finally:
        agent.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_replica_with_a_stopped_member_refuses_changes(replicas, clients, etcd):
    """
    Replica 2's only member is SIGSTOPped: within a few seconds replica 2 answers changes
    with 503 naming the member; once the member runs again it takes them again.
    """
    cluster, processes = replicas
    reactor = _reactor()
    two = processes[1]
    member = etcd.members[2]
    member.pause()
    try:
        started = time.monotonic()
        await two.wait_for_event(reactor, "pyflock:control:store-unhealthy", timeout=10)
        assert time.monotonic() - started < CHECK_INTERVAL + 4
        refused = await clients[1].post(DATASETS, creation(cluster, "refused"))
        assert refused.code == 503, refused
        assert member.url in refused.json["description"]
        meanwhile = await post_through(clients[0], creation(cluster, "meanwhile"))
        assert meanwhile.code == 201, meanwhile
    finally:
        member.resume()
    await two.wait_for_event(reactor, "pyflock:control:store-healthy", timeout=10)
    taken = await post_through(clients[1], creation(cluster, "after"))
    assert taken.code in (201, 409), taken
    names = {d["metadata"]["name"] for d in (await clients[1].get(DATASETS)).json}
    assert {"meanwhile", "after"} <= names and "refused" not in names


async def post_through(client: APIClient, body: dict, timeout: float = 10.0):
    """
    POST ``body`` until it is answered other than 503 (an etcd election the pause or kill
    of a member may cause makes replicas refuse changes for a moment); the answer.
    """
    deadline = time.monotonic() + timeout
    while (answer := await client.post(DATASETS, body)).code == 503:
        assert time.monotonic() < deadline, answer
        await deferLater(_reactor(), 0.1, lambda: None)
    return answer


def compact(endpoint: str) -> int:
    """Compact etcd's history up to its current revision, through ``endpoint``; that revision."""
    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{endpoint}/v3/{path}",
                                         data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    revision = int(post("kv/range", {"key": "AA=="})["header"]["revision"])
    post("kv/compaction", {"revision": str(revision), "physical": True})
    return revision


@pytest_twisted.ensureDeferred
async def test_replica_serves_the_right_configuration_after_compaction(
        replicas, clients, etcd):
    """
    Replica 2's member is killed; changes go through replica 1 and etcd compacts past
    replica 2's watch; the member comes back: replica 2 serves replica 1's configuration,
    with its tag.
    """
    cluster, processes = replicas
    member = etcd.members[2]
    member.kill9()
    try:
        created = [await post_through(clients[0], creation(cluster, f"late{n}"))
                   for n in range(3)]
        assert all(c.code in (201, 409) for c in created), created
        compact(etcd.endpoints[0])
    finally:
        member.restart()
    deadline = time.monotonic() + 10
    while not {"late0", "late1", "late2"} <= {
            d["metadata"]["name"] for d in (await clients[1].get(DATASETS)).json}:
        assert time.monotonic() < deadline, "replica 2 did not catch up"
        await deferLater(_reactor(), 0.02, lambda: None)
    first = await clients[0].get(DATASETS)
    await until_tag(clients[1], first.headers["x-configuration-tag"])
    assert by_id((await clients[1].get(DATASETS)).json) == by_id(first.json)


@pytest_twisted.ensureDeferred
async def test_watch_on_a_member_without_leader_ends(replicas, clients, etcd):
    """
    Members 0 and 1 stop, so member 2 has no leader: replica 2's watch, which asks for a
    leader, ends with etcd's error instead of hanging, and changes are refused with 503;
    once the members run again, replica 2 takes changes.
    """
    cluster, processes = replicas
    reactor = _reactor()
    two = processes[1]

    def no_leader(event: dict) -> bool:
        return "leader" in str(event.get("reason", ""))
    seen = len([e for e in two.log_events("pyflock:control:etcd-watch-failed")
                if no_leader(e)])
    for member in etcd.members[:2]:
        member.pause()
    try:
        await two.wait_for_event(reactor, "pyflock:control:etcd-watch-failed", no_leader,
                                 timeout=20, after=seen)
        refused = await clients[1].post(DATASETS, creation(cluster, "leaderless"))
        assert refused.code == 503, refused
    finally:
        for member in etcd.members[:2]:
            member.resume()
    taken = await post_through(clients[1], creation(cluster, "led again"), timeout=20)
    assert taken.code in (201, 409), taken
