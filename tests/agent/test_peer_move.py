"""
The peer-to-peer rows driving ``MemoryPeerBackend`` nodes through a move: the new primary
receives the dataset (bulk while the old primary still writes, then the last delta once
it has unmounted it), mounts it, and only then does the old primary destroy its copy.
A tiny in-test runner stands in for the agent's (peer transfer is a later issue).
"""

import io

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsistent import pmap

from pyflock.agent._backends import MemoryPeerBackend
from pyflock.agent._convergence import (
    CreateDataset, Desired, DesiredDataset, DestroyDataset, Discovered, DiscoveredDataset,
    MountFilesystem, PeerState, ReceiveDataset, RemoveMountPoint, UnmountFilesystem,
    calculate_peer_changes, is_nothing, leaves, peer_dataset_states,
)

A = "node-a"
B = "node-b"
DS = "ds-1"
ROOT = "/mnt"
SIZE = 64 * 1024 * 1024


@attr.s(auto_attribs=True)
class Node:
    """One node: its peer backend, what is mounted, and which mount points exist."""

    backend: MemoryPeerBackend
    mounted: set = attr.ib(factory=set)
    directories: set = attr.ib(factory=set)

    def discover(self) -> Discovered:
        """What this node finds of its copies and mounts."""
        found = {}
        for copy in self.backend.list_datasets():
            if not copy.complete:
                state = PeerState.PARTIAL
            elif copy.dataset_id in self.mounted:
                state = PeerState.MOUNTED
            else:
                state = PeerState.UNMOUNTED
            found[copy.dataset_id] = DiscoveredDataset(
                dataset_id=copy.dataset_id, state=state, mount_point=f"{ROOT}/{DS}",
                size=copy.size, device=copy.path, snapshot=copy.latest,
                mount_point_left=DS in self.directories and DS not in self.mounted)
        return Discovered(node_uuid=self.backend.node_uuid, mount_root=ROOT,
                          datasets=pmap(found))


class Cluster:
    """Two nodes, the configuration's primary, and the holders their reports give."""

    def __init__(self, primary: str):
        self.nodes = {n: Node(MemoryPeerBackend(n)) for n in (A, B)}
        self.primary = primary
        self.reports = {n: pmap() for n in self.nodes}
        #: Whether the dataset is deleted, and if so whether its data is still kept.
        self.deleted = self.retained = False

    def desired(self, node: str) -> Desired:
        """What ``node`` wants, with the holders the latest reports give."""
        holders = tuple(sorted(n for n, r in self.reports.items() if DS in r and n != node))
        return Desired(node_uuid=node, nodes=pmap({A: True, B: True}), datasets=pmap({
            DS: DesiredDataset(DS, primary=self.primary, maximum_size=SIZE,
                               holders=holders, deleted=self.deleted,
                               retained=self.retained)}))

    def step(self, node: str) -> bool:
        """One discover-calculate-run round on ``node``, then its report; whether it acted."""
        here = self.nodes[node]
        change = calculate_peer_changes(self.desired(node), here.discover())
        for leaf in leaves(change):
            self.run(here, leaf)
        self.reports[node] = peer_dataset_states(self.desired(node), here.discover())
        return not is_nothing(change)

    def run(self, here: Node, leaf) -> None:
        """Run one leaf change on ``here``, checking the rows never break a rule."""
        backend = here.backend
        if isinstance(leaf, CreateDataset):
            backend.create_dataset(leaf.dataset_id, leaf.size)
        elif isinstance(leaf, ReceiveDataset):
            sender = self.nodes[leaf.from_node]
            stream = io.BytesIO()
            sender.backend.export_dataset(leaf.dataset_id, stream, leaf.base)
            backend.import_dataset(leaf.dataset_id, io.BytesIO(stream.getvalue()))
            if leaf.dataset_id not in sender.mounted:
                backend.complete_dataset(leaf.dataset_id)
        elif isinstance(leaf, DestroyDataset):
            assert leaf.dataset_id not in here.mounted, "a mounted copy is never destroyed"
            backend.destroy_dataset(leaf.dataset_id)
        elif isinstance(leaf, MountFilesystem):
            assert backend.get_dataset(leaf.dataset_id).complete
            here.mounted.add(leaf.dataset_id)
            here.directories.add(leaf.dataset_id)
        elif isinstance(leaf, UnmountFilesystem):
            here.mounted.discard(leaf.dataset_id)
        elif isinstance(leaf, RemoveMountPoint):
            here.directories.discard(leaf.dataset_id)
        else:
            raise AssertionError(f"a peer row made {leaf!r}")

    def holding_complete(self) -> set:
        """The nodes holding a complete copy."""
        return {n for n, node in self.nodes.items()
                if any(c.complete for c in node.backend.list_datasets())}


def test_move_copies_then_lets_go():
    """A move receives the data, late writes included, and never loses the last copy."""
    cluster = Cluster(primary=A)
    finish(cluster)
    a = cluster.nodes[A]
    assert DS in a.mounted
    a.backend.write_file(DS, "data", b"before the move")

    cluster.primary = B
    cluster.step(B)                       # bulk copy, while A still has it in use
    assert not cluster.nodes[B].backend.get_dataset(DS).complete
    a.backend.write_file(DS, "data", b"written during the bulk copy")
    finish(cluster)
    b = cluster.nodes[B]
    assert (DS in b.mounted, b.backend.read_file(DS, "data")) == (
        True, b"written during the bulk copy")
    assert a.backend.list_datasets() == [] and a.mounted == set() and a.directories == set()
    assert set(cluster.reports[B]) == {DS} and cluster.reports[A] == pmap()


def test_retained_copy_kept_until_purged():
    """A deleted dataset still retained keeps its copy, unmounted, and comes back intact
    when restored; once its data may go, every copy is destroyed."""
    cluster = Cluster(primary=A)
    finish(cluster)
    a = cluster.nodes[A]
    a.backend.write_file(DS, "data", b"precious")
    cluster.deleted = cluster.retained = True
    finish(cluster)
    assert (a.mounted, a.backend.read_file(DS, "data")) == (set(), b"precious")
    cluster.deleted = cluster.retained = False
    finish(cluster)
    assert (a.mounted, a.backend.read_file(DS, "data")) == ({DS}, b"precious")
    cluster.deleted, cluster.retained = True, False
    finish(cluster)
    assert cluster.holding_complete() == set()


def test_claimed_then_deleted_restores_from_the_kept_copy():
    """A dataset moved to node B and deleted before B had its copy (the plugin's Remove of
    a volume living elsewhere) keeps A's copy; restored, B receives it from A intact."""
    cluster = Cluster(primary=A)
    finish(cluster)
    cluster.nodes[A].backend.write_file(DS, "data", b"precious")
    cluster.primary = B
    cluster.deleted = cluster.retained = True
    finish(cluster)
    assert cluster.holding_complete() == {A}
    cluster.deleted = cluster.retained = False
    cluster.step(B)                       # B first: it knows of A's copy from A's reports
    finish(cluster)
    b = cluster.nodes[B]
    assert (b.mounted, b.backend.read_file(DS, "data")) == ({DS}, b"precious")
    assert cluster.nodes[A].backend.list_datasets() == []


def finish(cluster: Cluster) -> None:
    """Step both nodes until neither has anything left to do (a bounded number of rounds)."""
    for _ in range(10):
        acted = [cluster.step(n) for n in (A, B)]
        assert cluster.holding_complete() or cluster.deleted and not cluster.retained, \
            "some node always holds a complete copy until the data may go"
        if not any(acted):
            return
    raise AssertionError("the nodes did not converge in 10 rounds")


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.sampled_from([A, B]), max_size=6),
       after=st.lists(st.sampled_from([A, B, "write"]), max_size=25))
def test_any_schedule_of_a_move_keeps_the_data(before, after):
    """Whatever order the nodes act in, a move keeps a complete copy and every write."""
    cluster = Cluster(primary=A)
    for node in before:
        cluster.step(node)
    finish(cluster)
    a = cluster.nodes[A]
    a.backend.write_file(DS, "data", b"0")
    last = b"0"
    cluster.primary = B
    for number, action in enumerate(after, 1):
        if action == "write":
            if DS in a.mounted:
                last = str(number).encode()
                a.backend.write_file(DS, "data", last)
        else:
            cluster.step(action)
        assert cluster.holding_complete(), "some node always holds a complete copy"
    finish(cluster)
    b = cluster.nodes[B]
    assert DS in b.mounted and b.backend.read_file(DS, "data") == last
    assert a.backend.list_datasets() == []
