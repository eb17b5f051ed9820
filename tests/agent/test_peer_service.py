"""
The peer transfer service over real mutual TLS on 127.0.0.x, between nodes whose
storage is a ``MemoryPeerBackend``: moves complete with every write made while the old
node still wrote, a broken round restarts from the newest common snapshot, and a node not
named in the move, another cluster's certificate or a revoked one is refused.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import threading

from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python.failure import Failure

from pyflock.agent._backends import MemoryPeerBackend
from pyflock.agent._peer_move import MovePolicy, MoveView
from pyflock.agent._peer_receive import PeerReceiver
from pyflock.agent._peer_rounds import TransferRefused
from pyflock.agent._peer_service import (
    ConnectionBroken, PeerTransferService, Slots, TransferSettings,
)
from pyflock.common._ca import common_name_of
from pyflock.common._threads import in_reactor_pool
from pyflock.common._tls import ClusterTLS
from tests.harness.certificates import make_cluster_certificates

DS = "5f0c9a1e-7d2b-4c3e-8f1a-2b3c4d5e6f70"
POLICY = MovePolicy(small_delta=2000, max_rounds=4)


class HookedBackend(MemoryPeerBackend):
    """A memory backend that calls ``on_export(base, into)`` before each export."""

    on_export = staticmethod(lambda base, into: None)

    def export_dataset(self, dataset_id, into, base=None):
        """Call the hook (from the export's thread), then export."""
        self.bases = getattr(self, "bases", []) + [base]
        self.on_export(base, into)
        return super().export_dataset(dataset_id, into, base)


class Cluster:
    """Nodes with their peer services listening on 127.0.0.(2+i), and one shared view."""

    def __init__(self, reactor, certs, count: int = 3):
        self.reactor = reactor
        self.certs = certs
        self.moves: dict = {}
        self.addresses: dict = {}
        self.nodes: dict = {}
        self.ports: list = []
        self.services: list = []
        self.uuids = list(certs.node_uuids[:count])

    async def start(self, uuid: str, index: int, certificates=None, is_revoked=None,
                    backend=None):
        """Start node ``uuid``'s service on 127.0.0.(2+index) over ``backend`` (a new
        one by default: the node's storage); its backend."""
        folder = certificates or self.certs.node_directory(uuid)
        tls = (ClusterTLS.load(folder, "node") if is_revoked is None else
               ClusterTLS.load(folder, "node", is_revoked=is_revoked))
        backend = backend or HookedBackend(uuid)
        slots = Slots(2)
        host = f"127.0.0.{2 + index}"
        service = PeerTransferService(
            self.reactor, backend, tls, view_of=self.moves.get, slots=slots,
            settings=TransferSettings(bandwidth=None))
        port = service.listen(host, 0)
        self.ports.append(port)
        self.services.append(service)
        self.addresses[uuid] = (host, port.getHost().port)
        receiver = PeerReceiver(
            self.reactor, backend, tls, view_of=self.moves.get,
            address_of=self.addresses.get, run_blocking=in_reactor_pool(self.reactor),
            slots=slots, policy=POLICY)
        self.nodes[uuid] = (backend, service, receiver)
        return backend

    async def stop(self):
        """Close every connection and stop listening."""
        for port in self.ports:
            await port.stopListening()
        for service in self.services:
            await service.stop()


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def certs(tmp_path):
    """A test cluster's certificates, three nodes."""
    return make_cluster_certificates(tmp_path, nodes=3)


@pytest_twisted.async_yield_fixture
async def cluster(reactor, certs):
    """Three started nodes A, B, C; A holds the dataset (files "a" and "big")."""
    cluster = Cluster(reactor, certs)
    for index, uuid in enumerate(cluster.uuids):
        await cluster.start(uuid, index)
    a = cluster.nodes[cluster.uuids[0]][0]
    a.create_dataset(DS, 64 * 1024 * 1024)
    a.write_file(DS, "a", b"alpha")
    a.write_file(DS, "big", bytes(range(256)) * 4096)   # 1 MiB: several frames
    yield cluster
    await cluster.stop()


async def settled(reactor, predicate) -> None:
    """Wait (up to 10 s) until ``predicate()`` holds: a round's thread logs a move sent
    and gives its slot back after the end frame, which the receiver may see first."""
    for _ in range(200):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)


def move(cluster, source: int, target: int):
    """Tell every node that ``DS`` moves from node ``source`` to ``target``: the view."""
    uuids = cluster.uuids
    cluster.moves[DS] = MoveView(primary=uuids[target], holders=(uuids[source],))
    return cluster.nodes[uuids[source]], cluster.nodes[uuids[target]]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_move_completes(cluster):
    """A move brings the whole dataset; the old copy is frozen; totals are logged."""
    (a, sender, _), (b, _, receiver) = move(cluster, 0, 1)
    state = await receiver.receive(DS, cluster.uuids[0])
    assert state.done and state.rounds >= 1
    assert b.get_dataset(DS).complete and not b.get_dataset(DS).frozen
    assert (b.read_file(DS, "a"), b.read_file(DS, "big")) == (
        b"alpha", bytes(range(256)) * 4096)
    assert a.get_dataset(DS).frozen
    await settled(cluster.reactor, lambda: sender.finished and sender.slots.used == 0)
    [event] = sender.finished
    assert event["bytes_done"] == state.bytes_received
    assert event["bytes_total"] >= event["bytes_done"] > 1024 * 1024
    assert sender.progress == {} and sender.slots.used == 0
    assert b.get_dataset(DS).snapshots == (a.get_dataset(DS).latest,), \
        "the receiver keeps only the newest common snapshot"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_writes_during_phase_one_arrive(cluster):
    """Every write the old node acknowledged while it still wrote is on the new node."""
    (a, _, _), (b, _, receiver) = move(cluster, 0, 1)
    acknowledged = []

    def write(base, into):
        # Before each export: a container on A writes, until the move froze A's copy.
        try:
            a.write_file(DS, "log", f"write {len(acknowledged)}".encode() * 400)
            acknowledged.append(len(acknowledged))
        except OSError:
            pass

    a.on_export = write
    await receiver.receive(DS, cluster.uuids[0])
    assert len(acknowledged) >= 2, "writes happened during phase 1"
    assert b.read_file(DS, "log") == f"write {acknowledged[-1]}".encode() * 400


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_broken_connection_restarts_from_last_common_snapshot(cluster, reactor):
    """A round cut mid-stream fails the move and leaves the last complete round; the
    next move starts from that snapshot and completes with the data intact."""
    (a, sender, _), (b, _, receiver) = move(cluster, 0, 1)
    rounds = []

    def cut_second_round(base, into):
        rounds.append(base)
        if len(rounds) == 2:
            a.write_file(DS, "big", b"x" * (1024 * 1024))   # a delta of several frames
            into.write(b"{")                                 # part of the stream goes
            blockingCallFromThread(reactor, abort_all, cluster)

    a.on_export = cut_second_round
    with pytest.raises(ConnectionBroken):
        await receiver.receive(DS, cluster.uuids[0])
    partial = b.get_dataset(DS)
    assert (partial.complete, len(partial.snapshots)) == (False, 1)
    a.on_export = lambda base, into: None
    a.bases = []
    await receiver.receive(DS, cluster.uuids[0])
    assert a.bases[0] == partial.latest, "the restart streams from the common snapshot"
    assert b.read_file(DS, "big") == b"x" * (1024 * 1024)
    await settled(reactor, lambda: sender.slots.used == 0)
    assert sender.slots.used == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_bandwidth_limit_and_busy_sender(cluster):
    """A throttled sender still completes the move; a sender making its most transfers
    at once answers that it is busy, and the move can be made once it is not."""
    (a, sender, _), (b, _, receiver) = move(cluster, 0, 1)
    sender.settings = TransferSettings(bandwidth=8 * 1024 * 1024)
    sender.slots.used = sender.slots.limit
    with pytest.raises(TransferRefused, match="already makes 2 transfers at once"):
        await receiver.receive(DS, cluster.uuids[0])
    sender.slots.used = 0
    await receiver.receive(DS, cluster.uuids[0])
    assert b.read_file(DS, "big") == bytes(range(256)) * 4096


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_sender_crash_mid_round_then_restart(cluster):
    """The sender dying mid-stream (its export fails after part of it went) fails the
    move; restarted over the same storage, it completes it from the common snapshot."""
    a_uuid = cluster.uuids[0]
    (a, _, _), (b, _, receiver) = move(cluster, 0, 1)

    def die_in_second_round(base, into):
        if len(a.bases) == 2:
            into.write(b'{"format": "pyflock-memory')
            raise RuntimeError("killed -9")

    a.on_export = die_in_second_round
    with pytest.raises(ConnectionBroken):
        await receiver.receive(DS, a_uuid)
    partial = b.get_dataset(DS)
    a.on_export = lambda base, into: None
    a.bases = []
    await cluster.start(a_uuid, 7, backend=a)      # the agent restarted: a new service
    await receiver.receive(DS, a_uuid)
    assert a.bases[0] == partial.latest
    assert b.read_file(DS, "big") == bytes(range(256)) * 4096


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_stalled_sender_is_given_up(cluster, reactor):
    """A sender that answers nothing is given up after the idle timeout, slots freed."""
    (a, sender, _), (b, _, receiver) = move(cluster, 0, 1)
    stalled = threading.Event()
    a.on_export = lambda base, into: stalled.wait(20)     # the stream never starts
    receiver._idle_timeout = 0.2
    try:
        with pytest.raises(ConnectionBroken, match="no data from the sender for 0.2 s"):
            await receiver.receive(DS, cluster.uuids[0])
    finally:
        stalled.set()
    assert b.list_datasets() == [] and receiver._slots.used == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_final_round_waits_for_writers(cluster):
    """While processes still write to the frozen copy (files opened before the freeze),
    the final round is refused, saying why; once they stop, the move completes."""
    (a, _, _), (b, _, receiver) = move(cluster, 0, 1)
    a.writers = lambda dataset_id: (4242,)
    with pytest.raises(TransferRefused, match=r"1 process\(es\) still hold its files open "
                                              r"for writing \(pids 4242\)"):
        await receiver.receive(DS, cluster.uuids[0])
    assert a.get_dataset(DS).frozen and not b.get_dataset(DS).complete
    a.writers = lambda dataset_id: ()
    await receiver.receive(DS, cluster.uuids[0])
    assert b.get_dataset(DS).complete


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_stop_ends_transfers_under_way(cluster, reactor):
    """Stopping both sides mid-stream (the agent shutting down) ends the move's threads:
    the move fails as a broken round, nothing waits on, and no copy is completed."""
    (a, sender, _), (b, _, receiver) = move(cluster, 0, 1)
    started, stopped = threading.Event(), threading.Event()

    def stall(base, into):
        into.write(b'{"format": ')
        started.set()
        stopped.wait(20)                 # the rest is written after the stop

    a.on_export = stall
    outcome: list = []
    # Its result is kept at once: a failure must never be left for the garbage collector
    # to log (it would fail whatever test runs next).
    receiver.receive(DS, cluster.uuids[0]).addBoth(outcome.append)
    while not started.is_set():
        await deferLater(reactor, 0.01, lambda: None)
    ends = DeferredList([sender.stop(), receiver.stop()])
    stopped.set()
    await ends
    for _ in range(500):
        if outcome:
            break
        await deferLater(reactor, 0.01, lambda: None)
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(ConnectionBroken), failure
    assert b.list_datasets() == []
    assert sender.connections == set() and sender.slots.used == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_silent_stranger_dropped_after_handshake_timeout(cluster, reactor):
    """A connection to the peer port that never completes its handshake (anyone who can
    reach the port) holds its thread only for the handshake timeout, not the idle one."""
    import socket as sockets
    service = cluster.nodes[cluster.uuids[0]][1]
    service.settings = TransferSettings(handshake_timeout=0.3)
    stranger = sockets.create_connection(cluster.addresses[cluster.uuids[0]])
    try:
        stranger.settimeout(10)
        closed = await deferToThread(stranger.recv, 1)      # b"": the server hung up
        assert closed == b""
    finally:
        stranger.close()


def abort_all(cluster) -> None:
    """Abort every connection to every node's peer port (a network failure)."""
    for service in cluster.services:
        for connection in list(service.connections):
            connection.abort()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_node_not_named_in_the_move_is_refused(cluster):
    """A node that is not the dataset's primary gets nothing, and the copy is untouched."""
    (a, _, _), _ = move(cluster, 0, 1)
    c, _, receiver_c = cluster.nodes[cluster.uuids[2]]
    # C's own view names it the primary: only A's view (B) decides what A sends.
    views_of_c = {DS: MoveView(primary=cluster.uuids[2], holders=(cluster.uuids[0],))}
    receiver_c._view_of = views_of_c.get
    with pytest.raises(TransferRefused, match=f"not moving to node {cluster.uuids[2]}"):
        await receiver_c.receive(DS, cluster.uuids[0])
    assert not a.get_dataset(DS).frozen and c.list_datasets() == []
    assert getattr(a, "bases", []) == [], "nothing was exported"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_receiver_refuses_a_move_it_was_not_told_of(cluster):
    """A node receives only as the primary, from a node that holds the dataset."""
    (_, _, _), (b, _, receiver) = move(cluster, 0, 1)
    with pytest.raises(TransferRefused, match="does not hold"):
        await receiver.receive(DS, cluster.uuids[2])
    cluster.moves[DS] = MoveView(primary=cluster.uuids[2], holders=(cluster.uuids[0],))
    with pytest.raises(TransferRefused, match="not moving to this node"):
        await receiver.receive(DS, cluster.uuids[0])
    assert b.list_datasets() == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_other_clusters_certificate_refused(cluster, reactor, tmp_path):
    """A node of another cluster cannot take a dataset, even when named in the move."""
    (tmp_path / "other").mkdir()
    other = make_cluster_certificates(tmp_path / "other", nodes=1)
    stranger = other.node_uuids[0]
    backend = await cluster.start(stranger, 5, certificates=other.node_directory(stranger))
    a, sender, _ = cluster.nodes[cluster.uuids[0]]
    cluster.moves[DS] = MoveView(primary=stranger, holders=(cluster.uuids[0],))
    # Neither side trusts the other's CA: the handshake fails, before any request.
    with pytest.raises(ConnectionBroken, match="certificate verify failed"):
        await cluster.nodes[stranger][2].receive(DS, cluster.uuids[0])
    assert not a.get_dataset(DS).frozen and backend.list_datasets() == []
    assert getattr(a, "bases", []) == [] and sender.slots.used == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_revoked_certificate_refused(cluster):
    """A sender whose revocation list names the receiver's certificate refuses it."""
    c_uuid = cluster.uuids[2]
    a_uuid = cluster.uuids[0]
    revoked = await cluster.start(
        a_uuid, 6, is_revoked=lambda certificate: common_name_of(certificate) ==
        f"node-{c_uuid}")
    revoked.create_dataset(DS, 64 * 1024 * 1024)
    cluster.moves[DS] = MoveView(primary=c_uuid, holders=(a_uuid,))
    # The sender's verify callback fails the handshake: no request is read.
    with pytest.raises(ConnectionBroken, match="alert"):
        await cluster.nodes[c_uuid][2].receive(DS, a_uuid)
    assert not revoked.get_dataset(DS).frozen
    assert cluster.nodes[c_uuid][0].list_datasets() == []


class _Arriving:
    """A connection whose data arrive in the given pieces, then break."""

    def __init__(self, pieces):
        self._pieces = list(pieces)

    def receive(self) -> bytes:
        if not self._pieces:
            raise ConnectionBroken("cut")
        return self._pieces.pop(0)


def test_incoming_stream_reads_any_sizes():
    """The import's reader gives the stream back whatever sizes it asks for, whatever
    pieces it arrived in (a read may give fewer bytes than asked, never none before the
    end, as a socket does), then b""; a stream that broke raises once what arrived is
    read."""
    from pyflock.agent._peer_protocol import END_FRAME, SendAnswer, framed
    from pyflock.agent._peer_receive import _IncomingStream
    wire = (SendAnswer(base="s1", estimate=1010).to_line()
            + framed(b"header\n" + b"x" * 1000) + framed(b"yz")
            + END_FRAME)
    stream = _IncomingStream(DS, _Arriving([wire[i:i + 7] for i in range(0, len(wire), 7)]))
    assert stream.read_answer() == SendAnswer(base="s1", estimate=1010)
    assert [stream.read(1) for _ in range(7)] == [bytes([c]) for c in b"header\n"]
    got = b""
    while len(got) < 999:
        piece = stream.read(999 - len(got))
        assert 0 < len(piece) <= 999 - len(got)
        got += piece
    assert got == b"x" * 999
    assert stream.read() == b"xyz" and stream.read(5) == b"" and stream.complete()
    assert stream.count == 1009
    broken = _IncomingStream(DS, _Arriving([SendAnswer().to_line(), bytes(framed(b"ab"))]))
    broken.read_answer()
    assert broken.read(2) == b"ab" and not broken.complete()
    with pytest.raises(ConnectionBroken, match="cut"):
        broken.read(1)
