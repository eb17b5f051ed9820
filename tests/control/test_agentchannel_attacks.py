"""
The agent channel against a hostile node and a big cluster, black box (issue 8): a real
``pyflock-control`` process, real node certificates speaking the channel protocol over
real TLS. A node that asks for snapshots and never reads leaves the control service's
memory bounded and is dropped; an agent of a cluster whose snapshot is ~9 MB of
non-ASCII metadata gets all of it, in pages within the page size.
"""

import re
import socket
import ssl
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from pyflock.agent._channel import AgentChannel, control_endpoint
from pyflock.common._limits import SNAPSHOT_PAGE
from pyflock.common._tls import ClusterTLS, client_tls_options, tls_client_endpoint
from pyflock.common._wire import (
    DatasetReport, Heartbeat, Hello, MessageProtocol, Snapshot, StateReport, SyncRequest,
    Welcome, decode, encode, frame, inflate, join_pages,
)

pytestmark = pytest.mark.integration

#: Datasets in the test cluster, each with ~7.6 KB of UTF-8 metadata (~23 KB of JSON).
DATASETS = 400


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


def big_metadata(number: int) -> dict:
    """Metadata within the limits (8 KiB of UTF-8) that is big on the wire: characters
    outside the BMP are 4 bytes of UTF-8 and 12 of escaped JSON."""
    return {"name": f"vol-{number}", **{f"k{i}": "\U0001f600" * 126 for i in range(15)}}


async def create_datasets(client, primary: str, numbers) -> list[str]:
    """Create datasets ``numbers`` with ``big_metadata`` through the REST API, 25 at a
    time; their ids."""
    async def one(number):
        response = await client.post("/v1/configuration/datasets", {
            "primary": primary, "metadata": big_metadata(number)})
        assert response.code == 201, response
        return response.json["dataset_id"]
    numbers, ids = list(numbers), []
    for start in range(0, len(numbers), 25):
        ids += await gatherResults([ensureDeferred(one(n))
                                    for n in numbers[start:start + 25]])
    return ids


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes (/proc/PID/status, VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def hostile_socket(node_directory: Path, host: str, port: int) -> ssl.SSLSocket:
    """A TLS connection to the agent port with a node's certificate and a 4 KiB receive
    buffer, that the test never reads from."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(node_directory / "cluster.crt")
    context.load_cert_chain(node_directory / "node.crt", node_directory / "node.key")
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect((host, port))
    return context.wrap_socket(raw, server_hostname=host)


async def cluster_of(tmp_path, reactor, *extra):
    """Certificates, a started control service (with ``extra`` arguments), alice's client
    and ``DATASETS`` big datasets; (cluster, control, client, dataset ids)."""
    from tests.harness.certificates import make_cluster_certificates
    from tests.harness.control import APIClient, ControlProcess, free_address

    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=2, control_host=host)
    control = ControlProcess(tmp_path / "data", folder, host=host,
                             log_directory=tmp_path / "logs", extra_arguments=extra)
    client = APIClient(reactor, control.url, folder, "alice")
    control.start()
    ids = await create_datasets(client, cluster.node_uuids[0], range(DATASETS))
    return cluster, control, client, ids


@pytest_twisted.ensureDeferred
async def test_node_that_never_reads_is_dropped_and_memory_stays_bounded(reactor, tmp_path):
    """
    A node certificate says hello, asks for 200 snapshots of a ~9 MB view and never
    reads: the control service holds one snapshot under way (its memory grows by far less
    than one snapshot per sync: 1.8 GB before issue 8), and once more than the send limit
    waits for the node, it is dropped; the control service keeps serving.
    """
    cluster, control, client, ids = await cluster_of(
        tmp_path, reactor, "--agent-send-limit", str(1024 * 1024))
    try:
        a = cluster.node_uuids[0]
        before = rss(control.pid)
        attacker = hostile_socket(cluster.node_directory(a), control.host,
                                  control.agent_port)
        attacker.sendall(frame(encode(Hello(node_uuid=a, era="e", address=control.host))))
        attacker.sendall(frame(encode(SyncRequest())) * 200)
        # Sent after the syncs, so the control service has read them all once it shows.
        attacker.sendall(frame(encode(StateReport(node_uuid=a, datasets=(
            DatasetReport(dataset_id=ids[0], state="mounted", path="/m"),)))))
        for _ in range(100):
            if (await client.get("/v1/state/datasets")).json:
                break
            await deferLater(reactor, 0.1, lambda: None)
        grown = rss(control.pid) - before
        print(f"\ncontrol RSS {before / 2**20:.1f} MiB before the attack, grown by "
              f"{grown / 2**20:.1f} MiB after 200 syncs of a "
              f"{DATASETS}-dataset view (not read)")
        assert grown < 64 * 2**20

        # Each create is a ~23 KB diff for the node that does not read.
        for start in range(DATASETS, DATASETS + 300, 10):
            await create_datasets(client, a, range(start, start + 10))
            if control.log_events("pyflock:control:channel-overflow"):
                break
        [event] = control.log_events("pyflock:control:channel-overflow")
        assert event["limit"] == 1024 * 1024
        await control.wait_for_event(reactor, "pyflock:control:agent-disconnected",
                                     lambda e: e["node_uuid"] == a)
        assert rss(control.pid) - before < 64 * 2**20
        attacker.close()
        assert (await client.get("/v1/configuration/datasets")).code == 200
        assert control.stop() == 0
    finally:
        await client.close()
        control.close()


class PageCollector(MessageProtocol):
    """A version 3 agent's connection that collects a snapshot's pages and their sizes."""

    def __init__(self, hello):
        super().__init__()
        self.hello = hello
        self.sizes = []
        # the size of each frame's JSON (a compressed one expanded: protocol 3)
        self.expanded = []
        self.pages = []
        self.done = Deferred()

    def connectionMade(self):
        super().connectionMade()
        self.send(self.hello)

    def stringReceived(self, payload):
        self.sizes.append(len(payload))
        self.expanded.append(len(inflate(payload, self.protocol_version)))
        super().stringReceived(payload)

    def message_received(self, message):
        if isinstance(message, Welcome):
            self.protocol_version = message.protocol
        elif isinstance(message, Snapshot):
            self.pages.append(message)
            if not message.more:
                self.transport.loseConnection()
                self.done.callback(self.pages)


@pytest_twisted.ensureDeferred
async def test_big_cluster_snapshot_arrives_whole_in_pages(reactor, tmp_path):
    """
    400 datasets with large non-ASCII metadata (a ~9 MB snapshot): an agent's channel
    gets every one of them, and the snapshot comes in pages of at most the page size.
    """
    cluster, control, client, ids = await cluster_of(tmp_path, reactor)
    channel = None
    try:
        a, b = cluster.node_uuids
        options = client_tls_options(cluster.node_directory(a), "node", control.host)
        collector = PageCollector(Hello(node_uuid=a, era="e", address=control.host))
        await tls_client_endpoint(reactor, control.host, control.agent_port,
                                  options).connect(Factory.forProtocol(lambda: collector))
        pages = await collector.done.addTimeout(60, reactor)
        assert len(pages) > 5 and max(collector.expanded) <= SNAPSHOT_PAGE
        assert sum(collector.expanded) > 8 * 2**20
        assert {d.dataset_id for d in join_pages(pages).datasets} == set(ids)

        views = []
        seen = Deferred()

        def on_view(view):
            views.append(view)
            if len(view.datasets) == DATASETS and not seen.called:
                seen.callback(view)
        channel = AgentChannel(
            reactor, control_endpoint(reactor, control.host, control.agent_port,
                                      ClusterTLS.load(cluster.node_directory(b), "node")),
            b, "era-b", on_view, retry_policy=lambda failures: 0.5)
        channel.start()
        view = await seen.addTimeout(60, reactor)
        assert dict(view.datasets[ids[7]].metadata) == big_metadata(7)
        assert len(views) == 1
        assert control.log_events("pyflock:agent:view-out-of-step") == []
    finally:
        await (channel.stop() if channel is not None else succeed(None))
        await client.close()
        control.close()


def read_message(sock: ssl.SSLSocket, protocol: int = 3):
    """The next message on a blocking socket (``ConnectionError`` once it is closed)."""
    def exactly(count):
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data
    (length,) = struct.unpack("!I", exactly(4))
    return decode(exactly(length), protocol)


@pytest_twisted.ensureDeferred
async def test_hostile_node_small_attacks(reactor, tmp_path):
    """
    Against a real control service, a node certificate's huge frame, false address and
    made-up datasets are refused or ignored, saying why; never acknowledging a view holds
    back a purge only until the deadline; and the REST API refuses metadata over 8 KiB.
    """
    from tests.harness.certificates import make_cluster_certificates
    from tests.harness.control import APIClient, ControlProcess, free_address

    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=1, control_host=host)
    [a] = cluster.node_uuids
    control = ControlProcess(tmp_path / "data", folder, host=host,
                             log_directory=tmp_path / "logs", extra_arguments=[
                                 "--node-expiry", "2", "--purge-deadline", "3"])
    client = APIClient(reactor, control.url, folder, "alice")
    sockets = []

    def connect():
        sock = hostile_socket(cluster.node_directory(a), host, control.agent_port)
        sockets.append(sock)
        return sock
    try:
        control.start()
        response = await client.post("/v1/configuration/datasets", {
            "primary": a, "metadata": {f"k{i}": "\U0001f600" * 200 for i in range(16)}})
        assert response.code == 400 and "8192 bytes" in response.json["errors"][0]

        sock = connect()
        sock.sendall(struct.pack("!I", 2 * 1024 * 1024))
        error = read_message(sock)
        assert (error.code, error.reason) == ("too-large", "a message of 2097152 bytes "
                                                          "exceeds the limit of 1048576 bytes")

        sock = connect()
        sock.sendall(frame(encode(Hello(node_uuid=a, era="e", address=host))
                           .replace(host.encode(), b"evil host")))
        error = read_message(sock)
        assert error.code == "bad-message" and "must be an IP address" in error.reason

        sock = connect()
        sock.sendall(frame(encode(Hello(node_uuid=a, era="e", address=host))))
        assert isinstance(read_message(sock), Welcome)
        made_up = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(500)]
        sock.sendall(frame(encode(StateReport(node_uuid=a, datasets=tuple(
            DatasetReport(dataset_id=i, state="mounted") for i in made_up)))))
        event = await control.wait_for_event(reactor,
                                             "pyflock:control:report-unknown-datasets")
        assert (event["node_uuid"], event["count"]) == (a, 500)
        assert (await client.get("/v1/state/datasets")).json == []

        # The node stays alive and never acknowledges a view; past the start's grace
        # (one node expiry), the deletion is purged only at the deadline.
        for _ in range(7):
            sock.sendall(frame(encode(Heartbeat(view=None))))
            await deferLater(reactor, 0.3, lambda: None)
        response = await client.post("/v1/configuration/datasets", {"primary": a})
        dataset_id = response.json["dataset_id"]
        # Purged at once (not kept in the recycle bin): its data may go now.
        assert (await client.delete(
            f"/v1/configuration/datasets/{dataset_id}?purge=true")).code == 200
        deleted = reactor.seconds()
        purged = None
        while purged is None and reactor.seconds() - deleted < 10:
            sock.sendall(frame(encode(Heartbeat(view=None))))
            await deferLater(reactor, 0.3, lambda: None)
            if [e for e in control.log_events("pyflock:control:dataset-purged")
                    if e["dataset_id"] == dataset_id]:
                purged = reactor.seconds() - deleted
        assert purged is not None and 3 <= purged < 5, purged
        assert control.log_events("pyflock:control:node-dead") == []
        assert control.stop() == 0
    finally:
        for sock in sockets:
            sock.close()
        await client.close()
        control.close()
