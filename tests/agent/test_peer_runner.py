"""
Agents' convergence on a peer-to-peer backend, end to end in one process: two nodes'
``peer_convergence_loop``s over ``MemoryPeerBackend``s, their peer transfer services
talking real mutual TLS on 127.0.0.x, and a tiny control service that pushes each
change of the configuration, and of who holds what, to both as an ``AgentView``.
"""

from __future__ import annotations

import io
import os
import threading

import pytest
import pytest_twisted
from pyrsistent import pmap
from twisted.internet.task import Clock, deferLater

from pyflock.agent._backends import MemoryPeerBackend
from pyflock.agent._backends._peer import PeerDataset
from pyflock.agent._convergence import PeerState
from pyflock.agent._discovery import Mount
from pyflock.agent._peer_move import MovePolicy, MoveView
from pyflock.agent._peer_runner import (
    PeerTransfers, ProgressReports, classify_copies, peer_convergence_loop, with_transfers,
)
from pyflock.agent._peer_service import TransferSettings
from pyflock.agent._view import AgentView
from pyflock.common._records import Dataset, DatasetEntry, DatasetReport, Node, Transfer
from pyflock.common._tls import ClusterTLS
from tests.harness.certificates import make_cluster_certificates

DS = "5f0c9a1e-7d2b-4c3e-8f1a-2b3c4d5e6f71"
SIZE = 64 * 1024 * 1024


def test_classify_copies():
    """A partial copy, a mounted and an unmounted complete one, and a stray mount."""
    copies = [PeerDataset("a", SIZE, None, ("s1",)),
              PeerDataset("b", SIZE, "/p/b", ("s2",), frozen=True),
              PeerDataset("c", SIZE, "/p/c")]
    found = classify_copies("n", "/m", copies, frozenset({"b", "x"}), frozenset({"c"}))
    assert {k: v.state for k, v in found.datasets.items()} == {
        "a": PeerState.PARTIAL, "b": PeerState.MOUNTED, "c": PeerState.UNMOUNTED,
        "x": PeerState.STRAY_MOUNT}
    assert (found.datasets["a"].snapshot, found.datasets["b"].frozen,
            found.datasets["c"].mount_point_left) == ("s1", True, True)


def test_with_transfers():
    """The progress of each dataset being moved away joins its report, and only its (a
    cancelled move's progress is not shown on the mounted dataset)."""
    reports = pmap({"a": DatasetReport("a", "moving"), "b": DatasetReport("b", "mounted")})
    joined = with_transfers(reports, {"a": Transfer(5, 10), "b": Transfer(1, 2)})
    assert (joined["a"].transfer, joined["b"].transfer) == (Transfer(5, 10), None)


def test_progress_reported_at_a_steady_rate():
    """While a dataset is sent, its progress is reported again every interval when it
    changed, though the loop reports nothing new; no transfer, no reports; none after
    ``stop``."""
    clock = Clock()
    reported = []
    progress: dict = {}
    reports = ProgressReports(clock, reported.append, progress, interval=0.5)
    moving = pmap({"a": DatasetReport("a", "moving"), "b": DatasetReport("b", "mounted")})
    reports.report(moving)
    clock.advance(0.5)
    assert reported == [moving]                     # nothing sent yet
    for done in (100, 250, 250, 400):
        progress["a"] = Transfer(done, 1000)
        clock.advance(0.5)
    assert [r["a"].transfer for r in reported[1:]] == [
        Transfer(100, 1000), Transfer(250, 1000), Transfer(400, 1000)]
    assert all(r["b"] == moving["b"] for r in reported)
    # The loop's own report (the move ended) is the base of the ticks from then on.
    del progress["a"]
    done = pmap({"a": DatasetReport("a", "mounted")})
    reports.report(done)
    clock.advance(5)
    assert reported[-1] == done
    progress["a"] = Transfer(1, 2)
    reports.stop()
    clock.advance(5)
    assert (reported[-1], clock.getDelayedCalls()) == (done, [])


class GatedBackend(MemoryPeerBackend):
    """A memory backend whose exports stop halfway until ``gate`` is set (set at first)."""

    def __init__(self, node_uuid):
        super().__init__(node_uuid)
        self.gate = threading.Event()
        self.gate.set()

    def export_dataset(self, dataset_id, into, base=None):
        """Export, writing the stream's second half only once the gate is open."""
        stream = io.BytesIO()
        name = super().export_dataset(dataset_id, stream, base)
        data = stream.getvalue()
        into.write(data[:len(data) // 2])
        assert self.gate.wait(20), "the test never opened the gate"
        into.write(data[len(data) // 2:])
        return name


class Filesystems:
    """A node's mount table, as ``IFilesystems`` gives it to the peer runner."""

    def __init__(self):
        self.mounted: dict = {}
        self.directories: set = set()

    def mounts(self, root):
        """The mounts under ``root``."""
        return [Mount(path, device) for path, device in self.mounted.items()]

    def empty_directories(self, root):
        """Mount points left without a mount."""
        return frozenset(os.path.basename(p) for p in self.directories - set(self.mounted))

    def mount(self, device, path):
        """Mount a copy's folder."""
        self.mounted[path] = device
        self.directories.add(path)

    def unmount(self, path):
        """Unmount whatever is at ``path``."""
        self.mounted.pop(path, None)

    def remove_mount_point(self, path):
        """Remove the empty mount point."""
        assert path not in self.mounted
        self.directories.discard(path)


class MiniControl:
    """The configuration and who reports what, pushed to every node as an AgentView."""

    def __init__(self):
        self.version = 0
        self.primary = None
        self.nodes: dict = {}
        self.reports: dict = {}
        self.loops: dict = {}

    def view(self) -> AgentView:
        """The view every node gets now."""
        datasets = {}
        if self.primary is not None:
            holders = [n for n, r in self.reports.items() if DS in r]
            datasets[DS] = DatasetEntry.of(Dataset(DS, self.primary, SIZE), holders=holders)
        return AgentView(epoch="e", version=self.version, datasets=pmap(datasets),
                         nodes=pmap(self.nodes))

    def push(self) -> None:
        """Push the current view to every loop."""
        self.version += 1
        view = self.view()
        for loop in self.loops.values():
            loop.update(view)

    def reporter(self, node):
        """``report_state`` of ``node``'s loop."""
        def report(reports):
            self.reports[node] = reports
            self.push()
        return report

    async def until(self, condition, reactor):
        """Wait until ``condition()`` holds (looking every 10 ms, for at most 20 s)."""
        for _ in range(2000):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("the nodes did not get there")


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_agents_move_a_dataset_and_back(reactor, tmp_path):
    """Node A creates and mounts the dataset; moved to B, B mounts a copy with A's data
    and A keeps only its last snapshot; moved back, A mounts it again with B's writes,
    having received only the delta."""
    certs = make_cluster_certificates(tmp_path, nodes=2)
    control = MiniControl()
    nodes = {}
    ports = []
    try:
        for index, uuid in enumerate(certs.node_uuids):
            backend = GatedBackend(uuid)
            tls = ClusterTLS.load(certs.node_directory(uuid), "node")
            transfers = PeerTransfers(reactor, backend, tls, current_view=control.view,
                                      settings=TransferSettings(), policy=MovePolicy(
                                          small_delta=4096))
            host = f"127.0.0.{20 + index}"
            port = await transfers.listen(host, 0)
            ports.append(port)
            control.nodes[uuid] = Node(uuid, host, port.getHost().port)
            filesystems = Filesystems()
            loop = peer_convergence_loop(reactor, backend, filesystems, "/m",
                                         control.reporter(uuid), transfers,
                                         poll_interval=0.05, interval=0.2)
            control.loops[uuid] = loop
            nodes[uuid] = (backend, filesystems, transfers)
        a, b = certs.node_uuids
        for loop in control.loops.values():
            loop.start()
        control.primary = a
        control.push()
        await control.until(lambda: "/m/" + DS in nodes[a][1].mounted, reactor)
        nodes[a][0].write_file(DS, "data", b"x" * 100_000)

        # The move's first round stops halfway: A reports how far it got.
        nodes[a][0].gate.clear()
        control.primary = b
        control.push()
        await control.until(lambda: DS in control.reports.get(a, {}) and
                            control.reports[a][DS].transfer is not None, reactor)
        moving = control.reports[a][DS]
        assert moving.state == "moving"
        assert 0 < moving.transfer.bytes_done < moving.transfer.bytes_total
        # B counts what it received of the same round (its Docker plugin quotes it).
        await control.until(lambda: nodes[b][2].receiver.progress(DS) is not None and
                            nodes[b][2].receiver.progress(DS).bytes_done > 0, reactor)
        received = nodes[b][2].receiver.progress(DS)
        assert received.bytes_done < received.bytes_total == moving.transfer.bytes_total
        nodes[a][0].gate.set()
        await control.until(lambda: "/m/" + DS in nodes[b][1].mounted and
                            not nodes[a][0].get_dataset(DS).complete, reactor)
        assert nodes[b][0].read_file(DS, "data") == b"x" * 100_000
        assert nodes[a][0].get_dataset(DS).snapshots == nodes[b][0].get_dataset(DS).snapshots
        [first] = nodes[a][2].service.finished
        assert nodes[b][2].receiver.progress(DS) is None       # the move ended
        nodes[b][0].write_file(DS, "more", b"y" * 100)

        control.primary = a
        control.push()
        await control.until(lambda: "/m/" + DS in nodes[a][1].mounted and
                            not nodes[b][0].get_dataset(DS).complete, reactor)
        assert (nodes[a][0].read_file(DS, "data"), nodes[a][0].read_file(DS, "more")) == (
            b"x" * 100_000, b"y" * 100)
        [back] = nodes[b][2].service.finished
        assert back["bytes_done"] < first["bytes_done"] / 10, (back, first)
    finally:
        for loop in control.loops.values():
            await loop.stop()
        for port in ports:
            await port.stopListening()


def test_transfers_judge_by_the_current_view(tmp_path):
    """Both sides read the agent's current view: a dataset's move, and where a node's
    peer port is (4525 when its record names none)."""
    certs = make_cluster_certificates(tmp_path, nodes=1)
    node = certs.node_uuids[0]
    views = [AgentView()]
    transfers = PeerTransfers(None, MemoryPeerBackend(node),
                              ClusterTLS.load(certs.node_directory(node), "node"),
                              current_view=lambda: views[-1], run_blocking=lambda *a: None)
    assert (transfers.view_of(DS), transfers.address_of(node)) == (None, None)
    views.append(AgentView(epoch="e", version=1, nodes=pmap({
        node: Node(node, "10.0.0.9", None), "other": Node("other", "10.0.0.8", 14525)}),
        datasets=pmap({DS: DatasetEntry.of(Dataset(DS, node, SIZE), holders=["other"])})))
    assert transfers.view_of(DS) == MoveView(primary=node, holders=("other",))
    assert transfers.address_of(node) == ("10.0.0.9", 4525)
    assert transfers.address_of("other") == ("10.0.0.8", 14525)
