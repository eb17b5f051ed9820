"""
Peer-to-peer moves between real agents: one real ``pyflock-control`` and three
``pyflock-agent`` processes on 127.0.0.x, each on the btrfs backend over a loop-file pool
of its own, their peer transfer services talking mutual TLS (needs root). Data written
on one node is checksummed on the next; a move back sends only the delta; writes made
during the bulk copy all arrive; agents killed (-9) mid-transfer finish the move after a
restart; a stranger is refused at the peer port. Durations and byte counts are printed
(``pytest -s``).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import os
import time
import uuid

import pytest
import pytest_twisted
import yaml
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from pyflock.agent._fs import read_mountinfo
from tests.agent.test_agents_integration import move, poll, state_of
from tests.harness.agents import LocalCluster, write_agent_config
from tests.harness.certificates import make_cluster_certificates
from tests.harness.requirements import ROOT, require_commands

pytestmark = [pytest.mark.integration, ROOT]

DATASETS = "/v1/configuration/datasets"
STATE = "/v1/state/datasets"
MiB = 1024 * 1024

#: Bound on any one wait for the cluster to converge or a move to finish.
TIMEOUT = 60.0

#: The test-only throttle of the kill tests (bytes per second per transfer): an 8 MiB
#: dataset takes about 4 s to send, long enough to kill an agent in the middle.
THROTTLE = 2 * MiB


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One control service and three btrfs agents (a 1 GiB sparse pool each) for the
    whole module: starting them is the slow part."""
    require_commands("btrfs", "mkfs.btrfs")
    local = LocalCluster(tmp_path_factory.mktemp("btrfs-agents"), nodes=3,
                         btrfs_pool_size="1G", control_arguments=["--node-expiry", "10"])
    try:
        local.start()
        yield local
    finally:
        local.close()


@pytest_twisted.async_yield_fixture
async def api(reactor, cluster):
    """Alice's REST API client; every agent runs when the test starts; the datasets a
    test made are deleted after it."""
    for agent in cluster.agents:
        if not agent.running:
            agent.start()
    client = cluster.api_client(reactor)
    client.created = []
    yield client
    for dataset_id in client.created:
        try:
            await client.delete(f"{DATASETS}/{dataset_id}")
        except Exception:
            pass
    await client.close()


async def create(api, node_uuid: str, size: int = 512 * MiB) -> str:
    """Create a dataset on ``node_uuid``; its id."""
    r = await api.post(DATASETS, {"primary": node_uuid, "maximum_size": size,
                                  "metadata": {"name": f"b-{uuid.uuid4().hex[:8]}"}})
    assert r.code == 201, r
    api.created.append(r.json["dataset_id"])
    return r.json["dataset_id"]


def writable_mounts(cluster, dataset_id: str) -> dict:
    """The nodes whose mount point of ``dataset_id`` has something writable mounted:
    uuid -> its mountinfo line."""
    mounts = {m.mount_point: m for m in read_mountinfo()}
    found = {}
    for agent in cluster.agents:
        mount = mounts.get(str(agent.mount_point(dataset_id)))
        if mount is not None and "rw" in mount.options.split(","):
            found[agent.node_uuid] = mount
    return found


async def wait_mounted(reactor, cluster, api, dataset_id: str, node_uuid: str,
                       timeout: float = TIMEOUT) -> dict:
    """Wait until ``dataset_id`` is mounted writable on ``node_uuid`` only, and the only
    state entry says so with its path; that entry."""
    mount_point = str(cluster.agent(node_uuid).mount_point(dataset_id))

    async def check():
        if set(writable_mounts(cluster, dataset_id)) != {node_uuid}:
            return None
        entries = await state_of(api, dataset_id)
        if [(e["primary"], e["state"], e.get("path")) for e in entries] \
                == [(node_uuid, "mounted", mount_point)]:
            return entries[0]
        return None
    return await poll(reactor, check, f"{dataset_id} mounted on {node_uuid} only", timeout)


def write_random(folder, size: int, name: str = "data") -> str:
    """Write ``size`` random bytes to ``folder/name`` durably; their sha256."""
    digest = hashlib.sha256()
    with open(os.path.join(folder, name), "wb") as f:
        for _ in range(0, size, 4 * MiB):
            block = os.urandom(min(4 * MiB, size))
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def checksum(folder, name: str = "data") -> str:
    """The sha256 of ``folder/name``."""
    digest = hashlib.sha256()
    with open(os.path.join(folder, name), "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def sent_events(agent, dataset_id: str) -> list:
    """The ``pyflock:peer:move-sent`` events of ``agent`` about ``dataset_id``, all runs."""
    return [e for e in agent.log_events("pyflock:peer:move-sent", every_run=True)
            if e.get("dataset_id") == dataset_id]


async def timed_move(reactor, cluster, api, dataset_id: str, node_uuid: str) -> float:
    """Move ``dataset_id`` to ``node_uuid`` and wait until it is mounted there only;
    the seconds it took."""
    started = time.monotonic()
    await move(api, dataset_id, node_uuid)
    await wait_mounted(reactor, cluster, api, dataset_id, node_uuid)
    return time.monotonic() - started


# -----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mounted_as_bind_of_live_subvolume(reactor, cluster, api):
    """A new dataset is mounted on its node as a bind of its subvolume, nosuid,nodev,
    and each agent's peer port listens on its node address."""
    a = cluster.node_uuids[0]
    dataset_id = await create(api, a)
    await wait_mounted(reactor, cluster, api, dataset_id, a)
    mount = writable_mounts(cluster, dataset_id)[a]
    assert mount.fstype == "btrfs"
    assert {"nosuid", "nodev"} <= set(mount.options.split(","))
    assert mount.root.endswith(dataset_id) or dataset_id in mount.root, mount.root
    for agent in cluster.agents:
        [event] = agent.log_events("pyflock:agent:peer-listening")
        assert (event["address"], event["port"]) == (agent.config.address,
                                                     agent.config.peer_port)


@pytest_twisted.ensureDeferred
async def test_move_and_back_sends_only_the_delta(reactor, cluster, api):
    """200 MiB written on A arrive intact on B; 1 MiB more written on B goes back to A
    by a move that sends about that delta, not the dataset, in less time."""
    a, b = cluster.node_uuids[:2]
    dataset_id = await create(api, a)
    await wait_mounted(reactor, cluster, api, dataset_id, a)
    first_sum = await deferToThread(write_random, cluster.agent(a).mount_point(dataset_id),
                                    200 * MiB)
    first = await timed_move(reactor, cluster, api, dataset_id, b)
    on_b = cluster.agent(b).mount_point(dataset_id)
    assert await deferToThread(checksum, on_b) == first_sum
    second_sum = await deferToThread(write_random, on_b, MiB, "more")
    second = await timed_move(reactor, cluster, api, dataset_id, a)
    on_a = cluster.agent(a).mount_point(dataset_id)
    assert await deferToThread(checksum, on_a) == first_sum
    assert await deferToThread(checksum, on_a, "more") == second_sum
    [there] = sent_events(cluster.agent(a), dataset_id)
    [back] = sent_events(cluster.agent(b), dataset_id)
    print(f"\n[btrfs move] 200 MiB A->B: {first:.2f} s, {there['bytes_done']} bytes; "
          f"1 MiB delta B->A: {second:.2f} s, {back['bytes_done']} bytes")
    assert there["bytes_done"] >= 200 * MiB
    assert MiB <= back["bytes_done"] < 8 * MiB


def append_until_refused(path: str, acknowledged: list, stop: threading.Event) -> None:
    """Append numbered lines to ``path``, each durable (fsync, close) before it counts in
    ``acknowledged``, until a write is refused (the dataset frozen) or ``stop`` is set."""
    number = 0
    while not stop.is_set():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"%d\n" % number)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return
        acknowledged.append(number)
        number += 1


@pytest_twisted.ensureDeferred
async def test_writes_during_bulk_copy_all_arrive(reactor, cluster, api):
    """Writes go on while a move copies 64 MiB; every acknowledged one is on the new
    node once the move is done."""
    a, b, c = cluster.node_uuids
    dataset_id = await create(api, c)
    await wait_mounted(reactor, cluster, api, dataset_id, c)
    on_c = cluster.agent(c).mount_point(dataset_id)
    await deferToThread(write_random, on_c, 64 * MiB)
    acknowledged: list = []
    stop = threading.Event()
    writer = threading.Thread(target=append_until_refused,
                              args=(os.path.join(on_c, "log"), acknowledged, stop))
    writer.start()
    try:
        await poll(reactor, lambda: len(acknowledged) > 10, "writes acknowledged")
        await timed_move(reactor, cluster, api, dataset_id, a)
    finally:
        stop.set()
        await deferToThread(writer.join)
    with open(os.path.join(cluster.agent(a).mount_point(dataset_id), "log"), "rb") as f:
        arrived = {int(line) for line in f.read().split()}
    print(f"\n[btrfs move] {len(acknowledged)} writes acknowledged during the move")
    assert set(acknowledged) <= arrived


def peer_handshake(address: str, port: int, folder) -> bytes:
    """Connect to a peer port presenting ``folder``'s node certificate; what the service
    sends before closing (``OSError`` if it refuses the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(folder / "node.crt", folder / "node.key")
    with socket.create_connection((address, port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"{}\n")
            return tls.recv(1024)


def test_other_cluster_refused(cluster, tmp_path):
    """A node of another cluster gets nothing from a peer port: the handshake fails."""
    other = make_cluster_certificates(tmp_path, nodes=1)
    agent = cluster.agent(0)
    with pytest.raises(OSError):
        answer = peer_handshake(agent.config.address, agent.config.peer_port,
                                other.node_directory(other.node_uuids[0]))
        assert answer == b"", answer
        raise ConnectionError("closed without a word")


def throttle(cluster, bandwidth: int) -> None:
    """Restart every agent with ``node.peer-bandwidth`` set (the test-only throttle)."""
    for agent in cluster.agents:
        document = yaml.safe_load(agent.config_path.read_text())
        document.setdefault("node", {})["peer-bandwidth"] = bandwidth
        write_agent_config(agent.config_path, document)
        agent._config = None
        agent.close()
        agent.start()


# Last in the module: the agents stay throttled.
@pytest.mark.parametrize("victim", [0, 1], ids=["sender", "receiver"])
@pytest_twisted.ensureDeferred
async def test_kill_mid_transfer(reactor, cluster, api, victim):
    """An agent killed (-9) while it sends or receives a move finishes it after a
    restart: the data intact, one writable copy."""
    if not cluster.agents[0].log_events("pyflock:agent:started") or \
            cluster.agent(0).config.peer_bandwidth != THROTTLE:
        await deferToThread(throttle, cluster, THROTTLE)
    a, b = cluster.node_uuids[:2]
    dataset_id = await create(api, a)
    await wait_mounted(reactor, cluster, api, dataset_id, a)
    digest = await deferToThread(write_random, cluster.agent(a).mount_point(dataset_id),
                                 8 * MiB)
    await move(api, dataset_id, b)

    await cluster.agent(b).wait_for_event(
        reactor, "pyflock:agent:converge",
        where=lambda e: f"ReceiveDataset({dataset_id})" in e.get("changes", ""))
    # A second into a transfer of about four: the kill lands mid-stream.
    await deferLater(reactor, 1.0, lambda: None)
    agent = cluster.agent([a, b][victim])
    agent.kill9()
    agent.start()
    await wait_mounted(reactor, cluster, api, dataset_id, b)
    assert await deferToThread(checksum, cluster.agent(b).mount_point(dataset_id)) == digest
