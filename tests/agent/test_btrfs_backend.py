"""
The ``btrfs`` backend on real loop-file pools: the ``IPeerBackend`` contract suite, and
what only btrfs does (pools, frozen subvolumes, checked receives, a full pool).
"""

import errno
import io
import mmap
import os
import subprocess
import tempfile
import uuid

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import BadStream, InvalidVolumeRequest, MiB, VolumeBusy
from pyflock.agent._backends._btrfs import BtrfsBackend, _read_only
from pyflock.agent._backends._btrfs_pool import Writeback
from pyflock.agent._backends._btrfs_model import (
    STAGING, PoolFull, PoolRefused, StreamHeader, Subvolume, live_path,
    parse_subvolume_list, snapshot_path,
)
from pyflock.agent._fs import read_mountinfo, unmount
from tests.contracts.backends import NODE_A, NODE_B, SIZE
from tests.contracts.peer_backends import make_ipeerbackend_tests
from tests.harness.btrfs_pools import (
    A_CTRANSID, A_INO, A_PATH, A_PATH_LINK, A_UUID, END, MKFILE, POOL_SIZE, SUBVOL, SYMLINK,
    btrfs_backend, btrfs_peer_harness, new_pool, send_command, send_stream,
    shared_btrfs_backend,
)
from tests.harness.requirements import ROOT

pytestmark = [pytest.mark.integration, ROOT]


class BtrfsBackendConformanceTests(make_ipeerbackend_tests(btrfs_peer_harness)):
    """``BtrfsBackend`` honours ``IPeerBackend`` on real btrfs pools."""


def _live_mount(test_case, backend, dataset_id: str) -> str:
    """Bind-mount the dataset's live subvolume as the agent does; unmounted at the end."""
    target = tempfile.mkdtemp(prefix="pyflock-btrfs-mnt-")
    subprocess.run(["mount", "--bind", backend.get_dataset(dataset_id).path, target],
                   check=True)
    test_case.addCleanup(os.rmdir, target)
    test_case.addCleanup(unmount, target)
    return target


def _subvolume(backend, path: str) -> Subvolume:
    """The pool's subvolume at ``path`` (relative to its root)."""
    listing = subprocess.run(["btrfs", "subvolume", "list", "-q", "-R", "-u", backend.root],
                             check=True, capture_output=True, text=True).stdout
    return next(s for s in parse_subvolume_list(listing) if s.path == path)


class BtrfsOnlyTests(SynchronousTestCase):
    """What the btrfs backend does beyond the contract: btrfs's own rules."""

    def setUp(self) -> None:
        self.a = shared_btrfs_backend(self, NODE_A)
        self.b = shared_btrfs_backend(self, NODE_B)

    def moved(self, data: bytes = b"alpha") -> str:
        """A dataset on A holding file ``a``, bulk-sent to B (partial there)."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        with open(os.path.join(self.a.get_dataset(dataset_id).path, "a"), "wb") as f:
            f.write(data)
        stream = io.BytesIO()
        self.a.export_dataset(dataset_id, stream)
        self.b.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))
        return dataset_id

    def test_complete_is_a_writable_snapshot(self) -> None:
        """Completing leaves the received snapshot read-only with its received uuid; the
        live dataset is a writable snapshot of it with none (so later sends still work)."""
        dataset_id = self.moved()
        done = self.b.complete_dataset(dataset_id)
        received = _subvolume(self.b, snapshot_path(dataset_id, done.latest))
        live = _subvolume(self.b, live_path(dataset_id))
        self.assertTrue(received.received_uuid)
        self.assertEqual((None, received.uuid), (live.received_uuid, live.parent_uuid))
        self.assertTrue(_read_only(self.b.root + "/" + snapshot_path(dataset_id, done.latest)))
        self.assertFalse(done.frozen)

    def test_moves_back_and_forth_send_deltas(self) -> None:
        """Moved A to B, back to A and to B again (demoting and pruning to the newest
        common snapshot each time), each move after the first sends about its delta."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        bulk = os.urandom(8 * MiB)
        with open(os.path.join(self.a.get_dataset(dataset_id).path, "bulk"), "wb") as f:
            f.write(bulk)
        sizes = []
        old, new = self.a, self.b
        for round_ in range(3):
            base = new.get_dataset(dataset_id).latest if round_ else None
            stream = io.BytesIO()
            name = old.export_dataset(dataset_id, stream, base)
            sizes.append(len(stream.getvalue()))
            new.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))
            done = new.complete_dataset(dataset_id)
            old.demote_dataset(dataset_id)
            for node in (old, new):
                self.assertEqual((name,), node.prune_snapshots(dataset_id, [name]).snapshots)
            with open(os.path.join(done.path, f"delta{round_}"), "wb") as f:
                f.write(os.urandom(64 * 1024))
            old, new = new, old
        self.assertGreater(sizes[0], 8 * MiB)
        self.assertLess(max(sizes[1:]), 256 * 1024, sizes)
        here = self.b.get_dataset(dataset_id)
        with open(os.path.join(here.path, "bulk"), "rb") as f:
            self.assertEqual(bulk, f.read())
        self.assertEqual(["bulk", "delta0", "delta1", "delta2"], sorted(os.listdir(here.path)))

    def test_cut_stream_discarded_and_retried(self) -> None:
        """A stream cut in the middle of its data (a broken connection) is discarded, the
        copy stays at its last snapshot, and the same delta sent again is taken."""
        dataset_id = self.moved()
        base = self.b.get_dataset(dataset_id).latest
        with open(os.path.join(self.a.get_dataset(dataset_id).path, "b"), "wb") as f:
            f.write(os.urandom(2 * MiB))
        stream = io.BytesIO()
        self.a.export_dataset(dataset_id, stream, base)
        whole = stream.getvalue()
        before = self.b.get_dataset(dataset_id)
        with self.assertRaises(BadStream):
            self.b.import_dataset(dataset_id, io.BytesIO(whole[:len(whole) // 2]))
        self.assertEqual(before, self.b.get_dataset(dataset_id))
        self.assertEqual([], os.listdir(os.path.join(self.b.root, STAGING)))
        self.b.import_dataset(dataset_id, io.BytesIO(whole))
        with open(os.path.join(self.b.complete_dataset(dataset_id).path, "a"), "rb") as f:
            self.assertEqual(b"alpha", f.read())

    def test_freeze_while_mounted(self) -> None:
        """A frozen dataset refuses new files through its mount; thawed, it takes them;
        a bind of it is nosuid,nodev like the pool's mount."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        mounted = _live_mount(self, self.a, dataset_id)
        self.a.freeze_dataset(dataset_id)
        with self.assertRaises(OSError) as raised:
            open(os.path.join(mounted, "new"), "wb").close()
        self.assertEqual(errno.EROFS, raised.exception.errno)
        self.a.thaw_dataset(dataset_id)
        open(os.path.join(mounted, "new"), "wb").close()
        mount = next(m for m in read_mountinfo() if m.mount_point == mounted)
        self.assertLessEqual({"nosuid", "nodev"}, set(mount.options.split(",")))

    def test_demote_mounted_refused(self) -> None:
        """A mounted live dataset is not demoted: ``VolumeBusy`` names the mount."""
        dataset_id = self.moved()
        mounted = _live_mount(self, self.a, dataset_id)
        with self.assertRaises(VolumeBusy) as raised:
            self.a.demote_dataset(dataset_id)
        self.assertEqual((mounted,), raised.exception.devices)
        self.assertTrue(self.a.get_dataset(dataset_id).complete)

    def test_demote_without_snapshot_refused(self) -> None:
        """A copy with no snapshot is not demoted: nothing would be left of it."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        with self.assertRaises(InvalidVolumeRequest):
            self.a.demote_dataset(dataset_id)

    def test_crafted_paths_change_nothing_outside(self) -> None:
        """A stream writing through ``..`` or a symlink is refused; nothing is left
        outside the staging folder (or in it), and no copy is made."""
        dataset_id = str(uuid.uuid4())
        header = StreamHeader(dataset_id=dataset_id, size=SIZE, snapshot="s1",
                              uuid=str(uuid.uuid4()))
        begin = send_command(SUBVOL, (A_PATH, b"s1"), (A_UUID, uuid.UUID(header.uuid).bytes),
                             (A_CTRANSID, bytes(8)))
        ino = (A_INO, b"\x01" + bytes(7))
        streams = [
            send_stream(begin, send_command(MKFILE, (A_PATH, b"../../../escaped"), ino),
                        send_command(END)),
            send_stream(begin, send_command(SYMLINK, (A_PATH, b"link"), ino,
                                            (A_PATH_LINK, b"/")),
                        send_command(MKFILE, (A_PATH, b"link/escaped"), ino),
                        send_command(END)),
        ]
        outside = os.path.dirname(self.b.root)
        before = (sorted(os.listdir(outside)), sorted(os.listdir(self.b.root)))
        for stream in streams:
            with self.assertRaises(BadStream):
                self.b.import_dataset(dataset_id, io.BytesIO(header.encode() + stream))
            self.assertEqual(before, (sorted(os.listdir(outside)),
                                      sorted(os.listdir(self.b.root))))
            self.assertEqual([], os.listdir(os.path.join(self.b.root, STAGING)))
            self.assertEqual([], self.b.list_datasets())

    def test_pool_full(self) -> None:
        """A receive into a full pool is ``PoolFull`` naming what holds the space; the
        partial receive is discarded."""
        self.b = btrfs_backend(self, NODE_B)  # a pool of its own, to be filled
        filler = self.b.create_dataset("filler", SIZE)
        with self.assertRaises(OSError):
            # Allocated, not written: as full, and much faster.
            with open(os.path.join(filler.path, "big"), "wb") as f:
                for at in range(0, POOL_SIZE, 4 * MiB):
                    os.posix_fallocate(f.fileno(), at, 4 * MiB)
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        with open(os.path.join(self.a.get_dataset(dataset_id).path, "data"), "wb") as f:
            f.write(os.urandom(16 * MiB))
        stream = io.BytesIO()
        self.a.export_dataset(dataset_id, stream)
        with self.assertRaises(PoolFull) as raised:
            self.b.import_dataset(dataset_id, io.BytesIO(stream.getvalue()))
        self.assertEqual("filler", raised.exception.holders[0].dataset_id)
        self.assertIn(f"no space left for dataset {dataset_id}", str(raised.exception))
        self.assertEqual(["filler"], [d.dataset_id for d in self.b.list_datasets()])
        self.assertEqual([], os.listdir(os.path.join(self.b.root, STAGING)))

    def test_usage(self) -> None:
        """The bytes a dataset's files take are reported (its size is not enforced)."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        with open(os.path.join(self.a.get_dataset(dataset_id).path, "data"), "wb") as f:
            f.write(b"\x01" * MiB)
        self.assertEqual(MiB, self.a.usage(dataset_id))


    def test_estimate_matches_stream(self) -> None:
        """``estimate_export`` gives the size of the stream an export then writes (but its
        header), whole and incremental, writable or frozen, and leaves staging empty."""
        dataset_id = self.a.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        path = self.a.get_dataset(dataset_id).path
        with open(os.path.join(path, "big"), "wb") as f:
            f.write(os.urandom(3 * MiB + 12345))
        for n in range(20):
            with open(os.path.join(path, f"small-{n}"), "wb") as f:
                f.write(os.urandom(n * 1000))
        base = None
        for freeze in (False, True):
            if freeze:
                with open(os.path.join(path, "big"), "r+b") as f:
                    f.seek(MiB)
                    f.write(os.urandom(300_000))
                self.a.freeze_dataset(dataset_id)
            estimate = self.a.estimate_export(dataset_id, base)
            self.assertEqual([], os.listdir(os.path.join(self.a.root, STAGING)))
            stream = io.BytesIO()
            base = self.a.export_dataset(dataset_id, stream, base)
            sent = len(stream.getvalue()) - stream.getvalue().index(b"\n") - 1
            # Exact on this machine's kernel; 1% leaves room for another kernel's splits.
            self.assertLessEqual(abs(sent - estimate), sent / 100, (sent, estimate))


class PoolTests(SynchronousTestCase):
    """The pool: formatted only when blank, mounted again, released."""

    def test_refuses_occupied(self) -> None:
        """A file holding another filesystem, another btrfs or any data is refused,
        unchanged; a missing file without ``pool_size`` too."""
        pool = new_pool(self, size=None)
        with self.assertRaises(PoolRefused):
            pool.open()
        self.assertFalse(os.path.exists(pool.pool_path))
        for make, reason in [(["mkfs.ext4", "-q"], "it holds ext4"),
                             (["mkfs.btrfs", "-q", "-L", "mine"], "labelled 'mine'"),
                             (None, "it holds data")]:
            with open(pool.pool_path, "wb") as f:
                f.truncate(POOL_SIZE)
                if make is None:
                    f.seek(50 * MiB)
                    f.write(b"precious")
            if make is not None:
                subprocess.run(make + [pool.pool_path], check=True, capture_output=True)
            before = os.stat(pool.pool_path).st_mtime_ns
            with self.assertRaises(PoolRefused) as raised:
                pool.open()
            self.assertIn(reason, str(raised.exception))
            self.assertEqual(before, os.stat(pool.pool_path).st_mtime_ns)  # not written
            self.assertIsNone(pool.mounted_device())

    def test_mounted_again_after_release(self) -> None:
        """A released pool (unmounted, loop device gone, as after a reboot) is mounted
        again by the next start with its datasets; opening a mounted pool changes nothing."""
        pool = new_pool(self)
        backend = BtrfsBackend.open(pool, NODE_A)
        created = backend.create_dataset("kept", SIZE)
        with open(os.path.join(created.path, "a"), "wb") as f:
            f.write(b"still here")
        device = pool.mounted_device()
        BtrfsBackend.open(pool, NODE_A)
        self.assertEqual(device, pool.mounted_device())
        self.assertEqual([], backend.release())
        self.assertIsNone(pool.mounted_device())
        self.assertEqual([], pool.loop_devices())
        again = BtrfsBackend.open(pool, NODE_A)
        self.assertEqual([created], again.list_datasets())
        with open(os.path.join(created.path, "a"), "rb") as f:
            self.assertEqual(b"still here", f.read())

    def test_pool_file_device_does_direct_io(self) -> None:
        """A pool file's loop device reads and writes it with direct I/O (its data is not
        cached a second time for the file), where the file's filesystem allows it."""
        pool = new_pool(self)
        BtrfsBackend.open(pool, NODE_A)
        [device] = pool.loop_devices()
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            dio = f.read().strip()
        probe = os.path.join(os.path.dirname(pool.pool_path), "dio-probe")
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT))
            supported = "1"
        except OSError:
            supported = "0"
        self.assertEqual(supported, dio)

    def test_writeback_while_receiving(self) -> None:
        """``Writeback`` writes the pool's dirty data back once enough was fed, in a thread,
        and ``close`` waits for it: data written before is on disk after, not delayed
        allocation in memory (``filefrag``'s ``delalloc``)."""
        pool = new_pool(self)
        backend = BtrfsBackend.open(pool, NODE_A)
        path = os.path.join(backend.create_dataset("wb", SIZE).path, "data")

        def delayed() -> bool:
            return "delalloc" in subprocess.run(["filefrag", "-v", path], check=True,
                                                capture_output=True, text=True).stdout
        with open(path, "wb") as f:
            f.write(os.urandom(4 * MiB))
        self.assertTrue(delayed())
        with Writeback(pool.mount_path, every=2 * MiB) as writeback:
            writeback.fed(MiB)
            self.assertTrue(delayed(), "not before ``every`` bytes")
            writeback.fed(MiB)
        self.assertFalse(delayed())

    def test_mount_is_hardened(self) -> None:
        """The pool (and so every bind of a dataset) is mounted nosuid,nodev, root only."""
        pool = new_pool(self)
        BtrfsBackend.open(pool, NODE_A)
        mount = next(m for m in read_mountinfo() if m.mount_point == pool.mount_path)
        self.assertLessEqual({"nosuid", "nodev"}, set(mount.options.split(",")))
        self.assertEqual(0o700, os.stat(pool.mount_path).st_mode & 0o777)

    def test_interrupted_receive_discarded_at_start(self) -> None:
        """What a receive left in staging when the agent died is deleted at the next start."""
        pool = new_pool(self)
        backend = BtrfsBackend.open(pool, NODE_A)
        subprocess.run(["btrfs", "subvolume", "create",
                        os.path.join(backend.root, STAGING, "receive-x")],
                       check=True, capture_output=True)
        BtrfsBackend.open(pool, NODE_A)
        self.assertEqual([], os.listdir(os.path.join(backend.root, STAGING)))


def test_agent_script_wiring(tmp_path):
    """``dataset: {backend: btrfs}`` makes a btrfs backend whose pool the agent creates,
    and ``pyflock-agent release`` unmounts the pool and detaches its loop device."""
    from pyflock.agent import _script
    from pyflock.agent._config import parse_config
    from tests.harness.certificates import make_cluster_certificates
    certificates = make_cluster_certificates(tmp_path, nodes=1)
    node_uuid = certificates.node_uuids[0]
    config = parse_config({
        "version": 1, "control-service": {"hostname": "control.example"},
        "certificates": str(certificates.node_directory(node_uuid)),
        "data-path": str(tmp_path / "data"),
        "dataset": {"backend": "btrfs", "pool_path": str(tmp_path / "pool.img"),
                    "pool_size": "160M"}})
    backend = _script.make_backend(config, node_uuid)
    try:
        assert isinstance(backend, BtrfsBackend)
        assert backend.pool.mounted_device() is not None
    finally:
        assert _script.release(config) == []
    assert backend.pool.mounted_device() is None
    assert backend.pool.loop_devices() == []


class WritersTests(SynchronousTestCase):
    """Writers a freeze does not stop are found, so that a move can wait for them."""

    def test_open_descriptor_outlives_freeze(self) -> None:
        """A descriptor opened for writing before a freeze still writes (kernel 6.18);
        ``writers`` names its process until it is closed."""
        backend = shared_btrfs_backend(self, NODE_A)
        dataset_id = backend.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        mounted = _live_mount(self, backend, dataset_id)
        reader = open(os.path.join(mounted, "r"), "wb+")
        reader.close()
        reader = open(os.path.join(mounted, "r"), "rb")
        self.addCleanup(reader.close)
        self.assertEqual((), backend.writers(dataset_id))
        with open(os.path.join(mounted, "w"), "wb", buffering=0) as writer:
            backend.freeze_dataset(dataset_id)
            self.assertEqual((os.getpid(),), backend.writers(dataset_id))
            writer.write(b"after the freeze")
        self.assertEqual((), backend.writers(dataset_id))
        with open(os.path.join(mounted, "w"), "rb") as written:
            self.assertEqual(b"after the freeze", written.read())

    def test_shared_writable_mapping(self) -> None:
        """A shared writable mapping of a file of the dataset counts as a writer."""
        backend = shared_btrfs_backend(self, NODE_A)
        dataset_id = backend.create_dataset(str(uuid.uuid4()), SIZE).dataset_id
        path = os.path.join(backend.get_dataset(dataset_id).path, "m")
        with open(path, "wb") as f:
            f.write(bytes(4096))
        with open(path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), 4096)
        try:
            self.assertEqual((os.getpid(),), backend.writers(dataset_id))
        finally:
            mapped.close()
        self.assertEqual((), backend.writers(dataset_id))
