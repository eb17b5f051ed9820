"""
The peer-to-peer rows driving ``MemoryPeerBackend`` nodes through a move: the new primary
receives the dataset (bulk while the old primary still writes, then the last delta once
the old primary froze its copy), mounts it, and only then does the old primary let go of
its copy, demoting it to the last snapshot sent. A tiny in-test runner makes the rounds
in process (``tests.agent.test_peer_service`` makes them over TLS).
"""

import errno
import io

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsistent import pmap

from pyflock.agent._backends import MemoryPeerBackend
from pyflock.agent._convergence import (
    CreateDataset, DemoteDataset, Desired, DesiredDataset, DestroyDataset, Discovered,
    DiscoveredDataset, MountFilesystem, PeerState, ReceiveDataset, RemoveMountPoint,
    ThawDataset, UnmountFilesystem, calculate_peer_changes, is_nothing, leaves,
    peer_dataset_states,
)
from pyflock.agent._peer_move import MovePolicy, MoveState
from pyflock.agent._peer_rounds import (
    prepare_receive, prepare_send, receive_move, send_stream,
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
                frozen=copy.frozen,
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
        #: Called before each round of a move with its request (writes "during" it).
        self.before_round = lambda request: None
        #: The byte counts of every round made, in order.
        self.rounds: list = []

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
            self.receive(backend, leaf)
        elif isinstance(leaf, DemoteDataset):
            assert leaf.dataset_id not in here.mounted, "a mounted copy is never demoted"
            backend.demote_dataset(leaf.dataset_id)
            backend.prune_snapshots(leaf.dataset_id, [leaf.keep])
        elif isinstance(leaf, ThawDataset):
            backend.thaw_dataset(leaf.dataset_id)
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

    def receive(self, backend, leaf: ReceiveDataset) -> None:
        """Make a whole move in process, as the transfer service does over TLS."""
        sender = self.nodes[leaf.from_node].backend

        def one_round(request) -> int:
            self.before_round(request)
            answer = prepare_send(sender, request)
            prepare_receive(backend, leaf.dataset_id, answer)
            stream = io.BytesIO()
            send_stream(sender, leaf.dataset_id, answer, stream)
            backend.import_dataset(leaf.dataset_id, io.BytesIO(stream.getvalue()))
            self.rounds.append(len(stream.getvalue()))
            return len(stream.getvalue())

        receive_move(backend, MovePolicy(small_delta=1000), MoveState(DS, leaf.from_node),
                     one_round)

    def write(self, number: int, nodes=(A, B)) -> bool:
        """A container writes ``number`` on each of ``nodes`` that has the dataset
        mounted; whether a write was acknowledged (a frozen copy refuses it)."""
        acknowledged = False
        for name in nodes:
            node = self.nodes[name]
            if DS in node.mounted:
                try:
                    node.backend.write_file(DS, "data", str(number).encode())
                    acknowledged = True
                except OSError as e:
                    assert e.errno == errno.EROFS
        return acknowledged

    def writable(self) -> set:
        """The nodes holding a writable (complete, not frozen) copy."""
        return {n for n, node in self.nodes.items()
                if any(c.complete and not c.frozen for c in node.backend.list_datasets())}

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
    written = []

    def write_while_in_use(request):
        # Phase 1: A still has it mounted and writable; the next round brings the write.
        if request.phase == 1:
            written.append(f"round {len(written)}".encode())
            a.backend.write_file(DS, "data", written[-1])

    cluster.before_round = write_while_in_use
    finish(cluster)
    b = cluster.nodes[B]
    assert (DS in b.mounted, b.backend.read_file(DS, "data")) == (True, written[-1])
    demoted = a.backend.get_dataset(DS)
    assert (demoted.complete, a.mounted, a.directories) == (False, set(), set())
    assert demoted.snapshots == b.backend.get_dataset(DS).snapshots, \
        "both sides keep exactly the newest common snapshot"
    assert len(demoted.snapshots) == 1
    assert set(cluster.reports[B]) == {DS} and cluster.reports[A] == pmap()


def test_move_back_sends_only_the_delta():
    """A move back to the old node starts from the snapshot both kept, not from scratch."""
    cluster = Cluster(primary=A)
    finish(cluster)
    cluster.nodes[A].backend.write_file(DS, "bulk", b"x" * 100_000)
    cluster.primary = B
    finish(cluster)
    first = sum(cluster.rounds)
    cluster.nodes[B].backend.write_file(DS, "more", b"y" * 1000)
    cluster.rounds.clear()
    cluster.primary = A
    finish(cluster)
    a = cluster.nodes[A]
    assert (a.backend.read_file(DS, "bulk"), a.backend.read_file(DS, "more")) == (
        b"x" * 100_000, b"y" * 1000)
    assert sum(cluster.rounds) < first / 10, (cluster.rounds, first)


def test_cancelled_move_thaws():
    """A move cancelled after the old node froze its copy leaves it writable again."""
    cluster = Cluster(primary=A)
    finish(cluster)
    a = cluster.nodes[A]
    a.backend.freeze_dataset(DS)          # as phase 2 of a move to B would
    finish(cluster)
    assert cluster.writable() == {A} and DS in a.mounted
    a.backend.write_file(DS, "data", b"after the cancel")


def test_redirected_move_goes_to_the_new_primary():
    """A move redirected to another node before it finished ends there, with the data."""
    cluster = Cluster(primary=A)
    finish(cluster)
    a = cluster.nodes[A]
    a.backend.write_file(DS, "data", b"payload")
    cluster.primary = B

    def redirect(request):
        # After B's first round the move goes back to A: B's partial copy stays as a base.
        cluster.primary = A

    cluster.before_round = redirect
    cluster.step(B)
    cluster.before_round = lambda request: None
    finish(cluster)
    assert cluster.writable() == {A} and a.backend.read_file(DS, "data") == b"payload"


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
    assert not cluster.nodes[A].backend.get_dataset(DS).complete, "A's copy is demoted"


def finish(cluster: Cluster) -> None:
    """Step both nodes until neither has anything left to do (a bounded number of rounds)."""
    for _ in range(10):
        acted = [cluster.step(n) for n in (A, B)]
        assert cluster.holding_complete() or cluster.deleted and not cluster.retained, \
            "some node always holds a complete copy until the data may go"
        assert len(cluster.writable()) <= 1, "never two writable copies"
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
    cluster.primary = B
    last = play(cluster, after, writers=[A]) or b"0"
    finish(cluster)
    b = cluster.nodes[B]
    assert DS in b.mounted and b.backend.read_file(DS, "data") == last
    assert not a.backend.get_dataset(DS).complete


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([A, B, "write", "move"]), max_size=30))
def test_moves_back_and_forth_keep_every_write(actions):
    """Moves cancelled, redirected back or made again at any point, with writes wherever
    the dataset is mounted and writable: every acknowledged write survives on the final
    primary, and there is never more than one writable copy."""
    cluster = Cluster(primary=A)
    finish(cluster)
    last = play(cluster, actions)
    finish(cluster)
    home = cluster.nodes[cluster.primary]
    assert DS in home.mounted and home.backend.read_file(DS, "data") == last
    assert cluster.writable() == {cluster.primary}


def play(cluster: Cluster, actions, writers=(A, B)):
    """
    Play ``actions`` on ``cluster``: a node's name is its step, "write" a container's
    write on ``writers`` where mounted, "move" a change of primary; checking after each
    that some node holds a complete copy and at most one a writable copy. The last
    acknowledged write's data (None if none).
    """
    last = None
    for number, action in enumerate(actions, 1):
        if action == "move":
            cluster.primary = B if cluster.primary == A else A
        elif action == "write":
            if cluster.write(number, writers):
                last = str(number).encode()
        else:
            cluster.step(action)
        assert cluster.holding_complete(), "some node always holds a complete copy"
        assert len(cluster.writable()) <= 1, "never two writable copies"
    return last
