"""
The conformance suite every ``IPeerBackend`` (peer-to-peer backend: btrfs) passes,
and the harness that runs it against the in-memory fake (``tests/harness/btrfs_pools.py``
runs it on real btrfs pools).

``make_ipeerbackend_tests(harness_factory)`` returns a test case class; a test module
subclasses it once per backend. The harness gives the suite one backend per node (each
with its own storage) and a way to write, remove and read files in a complete copy, as
containers do.
"""

from __future__ import annotations

import io
import uuid
from typing import Callable, Optional

import attr
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pyflock.agent._backends._interface import (
    InvalidVolumeRequest, UnknownVolume, VolumeExists,
)
from pyflock.agent._backends._memory_peer import MemoryPeerBackend
from pyflock.agent._backends._peer import (
    BadStream, IncompleteCopy, IPeerBackend, PeerDataset, UnknownSnapshot,
)
from tests.contracts.backends import NODE_A, NODE_B, SIZE

#: A third node, for copies sent on.
NODE_C = "9c1e5a7b-3d2f-4b8a-9e6c-1f0a2b3c0c03"


@attr.s(frozen=True, auto_attribs=True)
class PeerHarness:
    """
    What the suite needs from one peer backend: ``backend_for(node_uuid)`` gives that
    node's backend (its own storage); ``write(backend, dataset_id, name, data)``,
    ``remove(backend, dataset_id, name)`` and ``read(backend, dataset_id, name)`` (None
    if absent) act on files of a complete copy as a container would.
    """

    backend_for: Callable[[str], IPeerBackend]
    write: Callable[[IPeerBackend, str, str, bytes], None]
    remove: Callable[[IPeerBackend, str, str], None]
    read: Callable[[IPeerBackend, str, str], Optional[bytes]]


def memory_peer_harness(test_case: SynchronousTestCase) -> PeerHarness:
    """A harness over fresh ``MemoryPeerBackend`` nodes."""
    return PeerHarness(
        backend_for=MemoryPeerBackend,
        write=lambda backend, dataset_id, name, data: backend.write_file(
            dataset_id, name, data),
        remove=lambda backend, dataset_id, name: backend.remove_file(dataset_id, name),
        read=lambda backend, dataset_id, name: backend.read_file(dataset_id, name))


def make_ipeerbackend_tests(
        harness_factory: Callable[[SynchronousTestCase], PeerHarness]) -> type:
    """
    A ``SynchronousTestCase`` subclass checking that backends from ``harness_factory``
    (called once per test with the test case, for cleanups) honour ``IPeerBackend``.
    """

    class IPeerBackendTests(SynchronousTestCase):
        """Conformance tests for one ``IPeerBackend`` implementation."""

        def setUp(self) -> None:
            self.harness = harness_factory(self)
            self.a = self.harness.backend_for(NODE_A)
            self.b = self.harness.backend_for(NODE_B)

        def new_dataset(self, size: int = SIZE) -> PeerDataset:
            """A new complete copy on node A."""
            return self.a.create_dataset(str(uuid.uuid4()), size)

        def send(self, sender, receiver, dataset_id: str,
                 base: Optional[str] = None) -> tuple[str, PeerDataset]:
            """Export from ``sender`` and import into ``receiver``: snapshot, copy."""
            stream = io.BytesIO()
            snapshot = sender.export_dataset(dataset_id, stream, base)
            return snapshot, receiver.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))

        def moved(self, files: dict) -> tuple[str, PeerDataset]:
            """A dataset on A holding ``files``, bulk-sent to B: its id and B's copy."""
            dataset_id = self.new_dataset().dataset_id
            for name, data in files.items():
                self.harness.write(self.a, dataset_id, name, data)
            return dataset_id, self.send(self.a, self.b, dataset_id)[1]

        # -- creating and listing ---------------------------------------------------------

        def test_interface(self) -> None:
            """The backend provides ``IPeerBackend`` and knows its node."""
            self.assertTrue(verifyObject(IPeerBackend, self.a))
            self.assertEqual((NODE_A, NODE_B), (self.a.node_uuid, self.b.node_uuid))

        def test_allocation_unit(self) -> None:
            """The allocation unit is a positive number of bytes dividing 64 MiB."""
            unit = self.a.allocation_unit()
            self.assertTrue(isinstance(unit, int) and unit > 0 and SIZE % unit == 0, unit)

        def test_empty(self) -> None:
            """A fresh node has no copies."""
            self.assertEqual([], self.a.list_datasets())

        def test_create(self) -> None:
            """A created copy is complete, empty of snapshots, listed and got as returned."""
            created = self.new_dataset()
            self.assertTrue(created.complete)
            self.assertEqual((created.size, created.snapshots), (SIZE, ()))
            self.assertEqual([created], self.a.list_datasets())
            self.assertEqual(created, self.a.get_dataset(created.dataset_id))

        def test_copies_are_local(self) -> None:
            """A copy made on one node is not on another: nothing is shared."""
            self.new_dataset()
            self.assertEqual([], self.b.list_datasets())

        def test_size_rounded_up_and_default(self) -> None:
            """Sizes (quotas) are rounded up to the allocation unit; None is the default."""
            unit = self.a.allocation_unit()
            self.assertEqual(SIZE + unit, self.new_dataset(SIZE + 1).size)
            default = self.a.create_dataset(str(uuid.uuid4()))
            self.assertTrue(default.size > 0 and default.size % unit == 0)

        def test_create_twice_refused(self) -> None:
            """A second copy of one dataset on one node is refused."""
            created = self.new_dataset()
            with self.assertRaises(VolumeExists):
                self.a.create_dataset(created.dataset_id, SIZE)

        def test_invalid_requests(self) -> None:
            """Malformed dataset ids and sizes are refused as ``InvalidVolumeRequest``."""
            for dataset_id, size in [("../x", SIZE), ("", SIZE), ("ok", 0), ("ok", -1),
                                     ("ok", 1.5), ("ok", True)]:
                with self.assertRaises(InvalidVolumeRequest):
                    self.a.create_dataset(dataset_id, size)
            self.assertEqual([], self.a.list_datasets())

        def test_unknown(self) -> None:
            """Every method names a dataset with no copy here as ``UnknownVolume``."""
            missing = str(uuid.uuid4())
            for call in (lambda: self.a.get_dataset(missing),
                         lambda: self.a.export_dataset(missing, io.BytesIO()),
                         lambda: self.a.complete_dataset(missing),
                         lambda: self.a.destroy_dataset(missing)):
                with self.assertRaises(UnknownVolume):
                    call()

        # -- streams ----------------------------------------------------------------------

        def test_bulk_copy(self) -> None:
            """A whole stream makes a partial copy; completed, it holds the sender's data."""
            dataset_id, copy = self.moved({"a": b"alpha", "b": b"beta"})
            sender = self.a.get_dataset(dataset_id)
            self.assertFalse(copy.complete)
            self.assertEqual((copy.size, copy.snapshots), (SIZE, sender.snapshots))
            completed = self.b.complete_dataset(dataset_id)
            self.assertTrue(completed.complete)
            self.assertEqual([completed], self.b.list_datasets())
            self.assertEqual([b"alpha", b"beta"],
                             [self.harness.read(self.b, dataset_id, n) for n in "ab"])

        def test_incremental_copy(self) -> None:
            """An incremental stream from the receiver's latest snapshot brings changes."""
            dataset_id, copy = self.moved({"a": b"alpha", "b": b"beta"})
            self.harness.write(self.a, dataset_id, "a", b"ALPHA")
            self.harness.write(self.a, dataset_id, "c", b"gamma")
            self.harness.remove(self.a, dataset_id, "b")
            snapshot, copy = self.send(self.a, self.b, dataset_id, copy.latest)
            self.assertEqual((copy.latest, copy.complete), (snapshot, False))
            self.b.complete_dataset(dataset_id)
            self.assertEqual([b"ALPHA", None, b"gamma"],
                             [self.harness.read(self.b, dataset_id, n) for n in "abc"])

        def test_stream_is_of_its_moment(self) -> None:
            """Writes after an export are not in its stream: a stream is a snapshot's."""
            dataset_id = self.new_dataset().dataset_id
            self.harness.write(self.a, dataset_id, "a", b"before")
            stream = io.BytesIO()
            self.a.export_dataset(dataset_id, stream)
            self.harness.write(self.a, dataset_id, "a", b"after")
            self.b.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))
            self.b.complete_dataset(dataset_id)
            self.assertEqual(b"before", self.harness.read(self.b, dataset_id, "a"))
            self.assertEqual(b"after", self.harness.read(self.a, dataset_id, "a"))

        def test_complete_copy_can_be_sent_on(self) -> None:
            """A completed copy is a dataset like any: it can be exported to a third node."""
            dataset_id, _ = self.moved({"a": b"alpha"})
            self.b.complete_dataset(dataset_id)
            c = self.harness.backend_for(NODE_C)
            self.send(self.b, c, dataset_id)
            c.complete_dataset(dataset_id)
            self.assertEqual(b"alpha", self.harness.read(c, dataset_id, "a"))

        def test_complete_is_idempotent(self) -> None:
            """Completing a complete copy returns it unchanged."""
            created = self.new_dataset()
            self.assertEqual(created, self.a.complete_dataset(created.dataset_id))

        def test_partial_copy_cannot_be_exported(self) -> None:
            """Only a complete copy can be sent on."""
            dataset_id, _ = self.moved({})
            with self.assertRaises(IncompleteCopy):
                self.b.export_dataset(dataset_id, io.BytesIO())

        def test_export_from_unknown_snapshot(self) -> None:
            """An incremental export from a snapshot the copy lacks is refused."""
            created = self.new_dataset()
            with self.assertRaises(UnknownSnapshot):
                self.a.export_dataset(created.dataset_id, io.BytesIO(), "no-such")

        def test_import_onto_wrong_base_changes_nothing(self) -> None:
            """An incremental stream whose base is not the copy's latest is refused."""
            dataset_id, copy = self.moved({"a": b"1"})
            self.send(self.a, self.b, dataset_id, copy.latest)
            stream = io.BytesIO()
            self.a.export_dataset(dataset_id, stream, copy.latest)
            before = self.b.get_dataset(dataset_id)
            with self.assertRaises(UnknownSnapshot):
                self.b.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))
            self.assertEqual(before, self.b.get_dataset(dataset_id))

        def test_import_onto_existing_copies_refused(self) -> None:
            """A whole stream onto any copy, or any stream onto a complete one, is refused."""
            dataset_id, copy = self.moved({})
            whole = io.BytesIO()
            self.a.export_dataset(dataset_id, whole)
            with self.assertRaises(VolumeExists):
                self.b.import_dataset(dataset_id, io.BytesIO(whole.getvalue()))
            delta = io.BytesIO()
            self.a.export_dataset(dataset_id, delta, copy.latest)
            self.b.complete_dataset(dataset_id)
            with self.assertRaises(VolumeExists):
                self.b.import_dataset(dataset_id, io.BytesIO(delta.getvalue()))

        def test_incremental_without_copy(self) -> None:
            """An incremental stream onto a node with no copy is ``UnknownVolume``."""
            created = self.new_dataset()
            first = self.a.export_dataset(created.dataset_id, io.BytesIO())
            delta = io.BytesIO()
            self.a.export_dataset(created.dataset_id, delta, first)
            with self.assertRaises(UnknownVolume):
                self.b.import_dataset(created.dataset_id, io.BytesIO(delta.getvalue()))

        def test_bad_streams_refused(self) -> None:
            """Garbage, or another dataset's stream, is ``BadStream``; nothing is made."""
            created = self.new_dataset()
            stream = io.BytesIO()
            self.a.export_dataset(created.dataset_id, stream)
            for dataset_id, payload in [(created.dataset_id, b"garbage"),
                                        (created.dataset_id, stream.getvalue()[:20]),
                                        (str(uuid.uuid4()), stream.getvalue())]:
                with self.assertRaises(BadStream):
                    self.b.import_dataset(dataset_id, io.BytesIO(payload))
            self.assertEqual([], self.b.list_datasets())

        # -- freezing, demoting, pruning (a move's phase 2 and its end) -------------------

        def test_freeze_stops_writes(self) -> None:
            """A frozen copy refuses writes, keeps its data, and can still be exported."""
            dataset_id = self.new_dataset().dataset_id
            self.harness.write(self.a, dataset_id, "a", b"before")
            frozen = self.a.freeze_dataset(dataset_id)
            self.assertEqual((True, True), (frozen.frozen, frozen.complete))
            self.assertEqual(frozen, self.a.freeze_dataset(dataset_id))
            self.assertEqual(frozen, self.a.get_dataset(dataset_id))
            with self.assertRaises(OSError):
                self.harness.write(self.a, dataset_id, "a", b"after")
            self.assertEqual(b"before", self.harness.read(self.a, dataset_id, "a"))
            self.send(self.a, self.b, dataset_id)
            self.b.complete_dataset(dataset_id)
            self.assertEqual(b"before", self.harness.read(self.b, dataset_id, "a"))

        def test_thaw_restores_writes(self) -> None:
            """A thawed copy (a cancelled move) is writable again; thawing is idempotent."""
            dataset_id = self.new_dataset().dataset_id
            self.a.freeze_dataset(dataset_id)
            thawed = self.a.thaw_dataset(dataset_id)
            self.assertEqual(thawed, self.a.thaw_dataset(dataset_id))
            self.assertFalse(thawed.frozen)
            self.harness.write(self.a, dataset_id, "a", b"again")
            self.assertEqual(b"again", self.harness.read(self.a, dataset_id, "a"))

        def test_freeze_partial_refused(self) -> None:
            """Only a complete copy can be frozen or thawed."""
            dataset_id, _ = self.moved({})
            for call in (self.b.freeze_dataset, self.b.thaw_dataset):
                with self.assertRaises(IncompleteCopy):
                    call(dataset_id)

        def test_completed_copy_is_writable(self) -> None:
            """A copy completed from a frozen sender's stream is writable, not frozen."""
            dataset_id = self.new_dataset().dataset_id
            self.a.freeze_dataset(dataset_id)
            self.send(self.a, self.b, dataset_id)
            completed = self.b.complete_dataset(dataset_id)
            self.assertFalse(completed.frozen)
            self.harness.write(self.b, dataset_id, "a", b"new home")

        def test_demote_keeps_snapshots(self) -> None:
            """A demoted copy is partial with its snapshots; a move back sends the delta."""
            dataset_id, copy = self.moved({"a": b"alpha", "b": b"beta"})
            self.b.complete_dataset(dataset_id)
            demoted = self.a.demote_dataset(dataset_id)
            self.assertEqual((False, None, False), (demoted.complete, demoted.path,
                                                     demoted.frozen))
            self.assertEqual(copy.snapshots, demoted.snapshots)
            self.assertEqual(demoted, self.a.demote_dataset(dataset_id))
            self.harness.write(self.b, dataset_id, "a", b"ALPHA")
            self.send(self.b, self.a, dataset_id, demoted.latest)
            back = self.a.complete_dataset(dataset_id)
            self.assertTrue(back.complete)
            self.assertEqual([b"ALPHA", b"beta"],
                             [self.harness.read(self.a, dataset_id, n) for n in "ab"])

        def test_demoted_copy_cannot_be_exported(self) -> None:
            """A demoted copy holds no dataset to send."""
            created = self.new_dataset()
            self.a.export_dataset(created.dataset_id, io.BytesIO())
            self.a.demote_dataset(created.dataset_id)
            with self.assertRaises(IncompleteCopy):
                self.a.export_dataset(created.dataset_id, io.BytesIO())

        def test_prune_snapshots(self) -> None:
            """Pruning deletes every snapshot not kept; the kept one still bases a stream."""
            created = self.new_dataset()
            names = [self.a.export_dataset(created.dataset_id, io.BytesIO())
                     for _ in range(3)]
            pruned = self.a.prune_snapshots(created.dataset_id, iter([names[1], "absent"]))
            self.assertEqual((names[1],), pruned.snapshots)
            self.assertEqual(pruned, self.a.get_dataset(created.dataset_id))
            self.a.export_dataset(created.dataset_id, io.BytesIO(), names[1])
            with self.assertRaises(UnknownSnapshot):
                self.a.export_dataset(created.dataset_id, io.BytesIO(), names[0])

        def test_prune_partial_copy(self) -> None:
            """A partial copy's snapshots are pruned alike; it continues from the kept one."""
            dataset_id, first = self.moved({"a": b"1"})
            _, second = self.send(self.a, self.b, dataset_id, first.latest)
            pruned = self.b.prune_snapshots(dataset_id, [second.latest])
            self.assertEqual((second.latest,), pruned.snapshots)
            self.send(self.a, self.b, dataset_id, second.latest)

        def test_new_methods_unknown(self) -> None:
            """Freeze, thaw, demote and prune name a missing copy as ``UnknownVolume``."""
            missing = str(uuid.uuid4())
            for call in (self.a.freeze_dataset, self.a.thaw_dataset, self.a.demote_dataset,
                         lambda d: self.a.prune_snapshots(d, ())):
                with self.assertRaises(UnknownVolume):
                    call(missing)

        # -- destroying -------------------------------------------------------------------

        def test_destroy(self) -> None:
            """Destroying a copy, complete or partial, forgets it on its node only."""
            dataset_id, _ = self.moved({"a": b"1"})
            self.b.destroy_dataset(dataset_id)
            self.assertEqual([], self.b.list_datasets())
            self.assertEqual(b"1", self.harness.read(self.a, dataset_id, "a"))
            self.a.destroy_dataset(dataset_id)
            self.assertEqual([], self.a.list_datasets())
            with self.assertRaises(UnknownVolume):
                self.a.destroy_dataset(dataset_id)

        def test_destroyed_dataset_can_be_received_again(self) -> None:
            """Once destroyed, a copy can be received again from scratch."""
            dataset_id, _ = self.moved({"a": b"1"})
            self.b.destroy_dataset(dataset_id)
            _, copy = self.send(self.a, self.b, dataset_id)
            self.assertEqual(1, len(copy.snapshots))

    return IPeerBackendTests


__all__ = ["NODE_C", "PeerHarness", "make_ipeerbackend_tests", "memory_peer_harness"]
