"""
Tests for the loopback backend on real loop devices (as root): the conformance suite, the
layout of its root, the busy-detach trap, leftovers discovery and two nodes on one root.
"""

import json
import os
import struct
import subprocess
import threading
import uuid

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import (
    AlreadyAttached, BlockVolume, InvalidVolumeRequest, Leftovers, LoopbackBackend,
    UnattachedVolume, UnknownVolume, VolumeBusy, VolumeExists,
)
from pyflock.agent._backends._loopback import (
    LoopAttachFailed, attach_loop_device, release_loop_device, scan_loop_devices,
)
from tests.contracts.backends import (
    NODE_A, NODE_B, SIZE, detach_loop_devices_under, loopback_harness, loopback_root,
    make_iblockdevicebackend_tests,
)
from pyflock.agent._fs import (
    filesystem_type, is_mounted, make_filesystem, mount, probe_filesystem, unmount,
)
from pyflock.agent._backends._loopback import UnsafeRoot


@pytest.mark.integration
class LoopbackBackendConformanceTests(make_iblockdevicebackend_tests(loopback_harness)):
    """The loopback backend passes the ``IBlockDeviceBackend`` conformance suite."""


@pytest.mark.integration
class LoopbackBackendTests(SynchronousTestCase):
    """What is particular to the loopback backend."""

    def setUp(self) -> None:
        self.root = loopback_root(self)
        self.a = LoopbackBackend(self.root, NODE_A)
        self.b = LoopbackBackend(self.root, NODE_B)

    def losetup(self, path: str) -> str:
        """
        Attach ``path`` to a loop device behind the backend's back; detached at cleanup,
        unless a test already did (the device is checked to still be ours first).
        """
        device = subprocess.run(["losetup", "-f", "--show", path], check=True,
                                capture_output=True, text=True).stdout.strip()
        self.addCleanup(release_loop_device, device, os.path.realpath(path))
        return device

    def mount(self, device: str, name: str) -> str:
        """Mount ``device`` under the root in this namespace (unmounted at cleanup)."""
        path = os.path.join(self.root, name)
        mount(device, path)
        self.addCleanup(unmount, path)
        return path

    def devices_under_root(self) -> list:
        prefix = os.path.realpath(self.root) + "/"
        return [d for d in scan_loop_devices() if d.backing_file.startswith(prefix)]

    def attached(self, path: str) -> str:
        """``attach_loop_device(path)``, detached at cleanup."""
        device = attach_loop_device(path)
        self.addCleanup(release_loop_device, device, os.path.realpath(path))
        return device

    def test_detach_syncs_the_file_unless_discarded(self) -> None:
        """A detach makes the volume file durable (another node may take it next); a
        detach with ``discard`` (the volume is destroyed next) skips that sync."""
        import pyflock.agent._backends._loopback as loopback
        synced = []
        real = loopback.fsync_path

        def spy(path, **kwargs):
            synced.append(path)
            return real(path, **kwargs)
        self.patch(loopback, "fsync_path", spy)
        for name, discard in (("kept", False), ("dropped", True)):
            self.a.create_volume(name, SIZE)
            self.a.attach_volume(name, NODE_A)
            synced.clear()
            self.a.detach_volume(name, discard=discard)
            files = [p for p in synced if os.path.basename(p).startswith(name)]
            self.assertEqual(not discard, bool(files), (name, synced))
            self.a.destroy_volume(name)

    def test_attach_binds_read_write(self) -> None:
        """A loop device bound by ioctls is read-write, backed by the file, named after it
        as ``losetup`` shows it, and what is written through it lands in the file."""
        path = os.path.join(self.root, "direct.img")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        device = self.attached(path)
        listing = subprocess.run(["losetup", "--list", "--noheadings", "--raw",
                                  "--output", "RO,BACK-FILE", device], check=True,
                                 capture_output=True, text=True).stdout.split()
        self.assertEqual(["0", os.path.realpath(path)], listing)
        with open(device, "r+b") as f:
            f.seek(4096)
            f.write(b"through the device")
        with open(path, "rb") as f:
            f.seek(4096)
            self.assertEqual(b"through the device", f.read(18))

    def test_attach_in_parallel_gets_distinct_devices(self) -> None:
        """Attaches racing for the free device (threads here, as several agents on one
        machine would) each end with a device of their own."""
        paths = []
        for i in range(12):
            paths.append(os.path.join(self.root, f"race-{i}.img"))
            with open(paths[-1], "wb") as f:
                f.truncate(SIZE)
        devices, errors = {}, []

        def attach(path: str) -> None:
            try:
                devices[path] = self.attached(path)
            except Exception as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=attach, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        self.assertEqual(len(paths), len(set(devices.values())))
        for path, device in devices.items():
            self.assertEqual(os.path.realpath(path),
                             {d.device: d.backing_file for d in scan_loop_devices()}[device])

    def test_attach_missing_file_says_which(self) -> None:
        """Attaching a file that is not there fails naming the file, binding nothing."""
        path = os.path.join(self.root, "missing.img")
        with self.assertRaises(LoopAttachFailed) as caught:
            attach_loop_device(path)
        self.assertIn(path, str(caught.exception))
        self.assertEqual([], self.devices_under_root())

    def test_layout(self) -> None:
        """A volume is a sparse file; an attachment, a JSON record naming node and device."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        image = os.path.join(self.root, "volumes", f"{dataset_id}.img")
        self.assertEqual(SIZE, os.stat(image).st_size)
        self.assertLess(os.stat(image).st_blocks * 512, SIZE)
        device = self.a.attach_volume(dataset_id, NODE_A).device_path
        with open(os.path.join(self.root, "attachments", f"{dataset_id}.json")) as f:
            record = json.load(f)
        self.assertEqual({"version": 1, "dataset_id": dataset_id, "node_uuid": NODE_A,
                          "device": device}, record)
        found = subprocess.run(["losetup", "-j", image], check=True, capture_output=True,
                               text=True).stdout
        self.assertTrue(found.startswith(device + ":"), found)
        self.assertEqual(Leftovers(), self.a.leftovers())

    def test_destroy_leaves_nothing(self) -> None:
        """After attach, detach and destroy, no file, record or loop device remains."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        self.a.attach_volume(dataset_id, NODE_A)
        self.a.detach_volume(dataset_id)
        self.a.destroy_volume(dataset_id)
        self.assertEqual(([], []), (os.listdir(os.path.join(self.root, "volumes")),
                                    os.listdir(os.path.join(self.root, "attachments"))))
        self.assertEqual([], self.devices_under_root())

    def test_state_on_disk(self) -> None:
        """A new backend object on the same root sees the volumes and attachments."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        attached = self.a.attach_volume(dataset_id, NODE_A)
        self.assertEqual([attached], LoopbackBackend(self.root, NODE_B).list_volumes())

    def test_busy_detach_trap(self) -> None:
        """
        When a child mount namespace keeps the filesystem after the node unmounts it, the
        detach raises ``VolumeBusy``, the record stays and the other node is refused; once
        the child exits, the other node attaches the volume and finds the data.
        """
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        device = self.a.attach_volume(dataset_id, NODE_A).device_path
        make_filesystem(device)
        path = self.mount(device, "mnt-a")
        with open(os.path.join(path, "data"), "w") as f:
            f.write("kept")
        # A container's namespace: a copy of our mounts, private so our unmount stays ours.
        child = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "echo ready && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.addCleanup(child.stdout.close)
        self.assertEqual("ready\n", child.stdout.readline())
        unmount(path)
        self.assertFalse(is_mounted(path))

        e = self.assertRaises(VolumeBusy, self.a.detach_volume, dataset_id)
        self.assertEqual((device,), e.devices)
        self.assertTrue(os.path.exists(os.path.join(self.root, "attachments",
                                                    f"{dataset_id}.json")))
        self.assertEqual([device], [d.device for d in self.a.leftovers().pending_detaches])
        self.assertEqual((), self.b.leftovers().pending_detaches)
        e = self.assertRaises(AlreadyAttached, self.b.attach_volume, dataset_id, NODE_B)
        self.assertEqual(NODE_A, e.holder)

        child.kill()
        child.wait()
        self.assertEqual([BlockVolume(dataset_id=dataset_id, size=SIZE)],
                         self.b.list_volumes())
        device = self.b.attach_volume(dataset_id, NODE_B).device_path
        path = self.mount(device, "mnt-b")
        with open(os.path.join(path, "data")) as f:
            self.assertEqual("kept", f.read())

    def test_stale_record_is_this_nodes_leftover(self) -> None:
        """A record whose device vanished (a reboot) is a leftover of its node only."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        self.a.attach_volume(dataset_id, NODE_A)
        detach_loop_devices_under(self.root)
        self.assertEqual(Leftovers(stale_records=(dataset_id,)), self.a.leftovers())
        self.assertEqual(Leftovers(), self.b.leftovers())

    def test_unrecorded_device(self) -> None:
        """
        A loop device on a volume file with no record is reported as unrecorded, listed
        with no holder, and blocks attaching.
        """
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        device = self.losetup(os.path.join(self.root, "volumes", f"{dataset_id}.img"))
        self.assertEqual([device], [d.device for d in self.b.leftovers().unrecorded_devices])
        self.assertEqual([BlockVolume(dataset_id=dataset_id, size=SIZE, device_path=device)],
                         self.a.list_volumes())
        e = self.assertRaises(AlreadyAttached, self.a.attach_volume, dataset_id, NODE_A)
        self.assertEqual((None, device), (e.holder, e.device))
        self.assertIn(f"losetup -d {device}", str(e))
        self.a.detach_volume(dataset_id)
        self.assertEqual([], self.devices_under_root())

    def test_stray_files_ignored(self) -> None:
        """Files in the volumes folder that cannot be volumes are not listed."""
        self.a.list_volumes()
        for name in ["not a volume.img", "notes.txt"]:
            open(os.path.join(self.root, "volumes", name), "w").close()
        self.assertEqual([], self.a.list_volumes())

    def test_crash_after_losetup(self) -> None:
        """
        A record still without its device (the agent died right after losetup) still
        names the device's owner, which can detach it.
        """
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        with open(os.path.join(self.root, "attachments", f"{dataset_id}.json"), "w") as f:
            json.dump({"version": 1, "dataset_id": dataset_id, "node_uuid": NODE_A,
                       "device": None}, f)
        device = self.losetup(os.path.join(self.root, "volumes", f"{dataset_id}.img"))
        self.assertEqual([BlockVolume(dataset_id=dataset_id, size=SIZE, attached_to=NODE_A,
                                      device_path=device)], self.b.list_volumes())
        self.assertEqual(device, self.a.get_device_path(dataset_id))
        self.a.detach_volume(dataset_id)
        self.assertEqual(([], Leftovers()), (self.devices_under_root(), self.a.leftovers()))

    def test_other_leftovers(self) -> None:
        """
        Orphan records, unreadable records, temporary files and devices on deleted volume
        files are all reported.
        """
        orphan, deleted = str(uuid.uuid4()), str(uuid.uuid4())
        records = os.path.join(self.root, "attachments")
        self.a.list_volumes()
        with open(os.path.join(records, f"{orphan}.json"), "w") as f:
            json.dump({"version": 1, "dataset_id": orphan, "node_uuid": NODE_A,
                       "device": None}, f)
        with open(os.path.join(records, "garbage.json"), "w") as f:
            f.write("{not json")
        with open(os.path.join(records, f".{orphan}.json.tmp"), "w") as f:
            f.write("{")
        self.a.create_volume(deleted, SIZE)
        image = os.path.join(self.root, "volumes", f"{deleted}.img")
        device = self.losetup(image)
        os.unlink(image)
        leftovers = self.a.leftovers()
        self.assertEqual(
            ((orphan,), [(device, image)], (os.path.join(records, "garbage.json"),),
             (os.path.join(records, f".{orphan}.json.tmp"),)),
            (leftovers.orphan_records,
             [(d.device, d.backing_file) for d in leftovers.deleted_file_devices],
             leftovers.unreadable_records, leftovers.temporary_files))
        self.assertEqual((), self.b.leftovers().orphan_records)
        self.a.create_volume(orphan, SIZE)
        self.assertEqual((), self.a.leftovers().orphan_records)

    def test_foreign_devices_ignored(self) -> None:
        """Loop devices backed by files outside the root are none of the backend's business."""
        outside = os.path.join(self.root + "-outside.img")
        self.addCleanup(os.unlink, outside)
        with open(outside, "wb") as f:
            f.truncate(SIZE)
        self.losetup(outside)
        self.assertEqual(((), Leftovers()), (self.a.snapshot().devices, self.a.leftovers()))

    def test_concurrent_attach(self) -> None:
        """Two nodes attaching one volume at once: exactly one wins, the other is refused."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        barrier = threading.Barrier(2)
        results = {}

        def attach(backend: LoopbackBackend) -> None:
            barrier.wait()
            try:
                results[backend.node_uuid] = backend.attach_volume(dataset_id,
                                                                   backend.node_uuid)
            except AlreadyAttached as e:
                results[backend.node_uuid] = e
        threads = [threading.Thread(target=attach, args=(b,)) for b in (self.a, self.b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [v for v in results.values() if isinstance(v, BlockVolume)]
        losers = [v for v in results.values() if isinstance(v, AlreadyAttached)]
        self.assertEqual((1, 1), (len(winners), len(losers)))
        self.assertEqual(winners[0].attached_to, losers[0].holder)
        self.assertEqual(1, len(self.devices_under_root()))

    def test_get_device_path_of_stale_record(self) -> None:
        """After a reboot, the former holder's ``get_device_path`` raises UnattachedVolume."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        self.a.attach_volume(dataset_id, NODE_A)
        detach_loop_devices_under(self.root)
        self.assertRaises(UnattachedVolume, self.a.get_device_path, dataset_id)

    def write_record(self, dataset_id: str, node_uuid: str, device) -> None:
        """Write an attachment record by hand, as an earlier run of some agent left it."""
        with open(os.path.join(self.root, "attachments", f"{dataset_id}.json"), "w") as f:
            json.dump({"version": 1, "dataset_id": dataset_id, "node_uuid": node_uuid,
                       "device": device}, f)

    def assert_get_volume_agrees(self) -> None:
        """Each volume as ``get_volume`` reads it alone is as ``list_volumes`` lists it."""
        for backend in (self.a, self.b):
            listed = backend.list_volumes()
            self.assertEqual(listed, [backend.get_volume(v.dataset_id) for v in listed])

    def test_get_volume(self) -> None:
        """
        ``get_volume`` reads one volume as ``list_volumes`` lists it: unattached,
        attached, held busy, with a stale record, a record without its device, or a
        device no record explains; an unknown one raises ``UnknownVolume``.
        """
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for dataset_id in ids:
            self.a.create_volume(dataset_id, SIZE)
        self.a.attach_volume(ids[0], NODE_A)
        self.b.attach_volume(ids[1], NODE_B)
        self.write_record(ids[2], NODE_A, None)
        self.losetup(os.path.join(self.root, "volumes", f"{ids[2]}.img"))
        self.losetup(os.path.join(self.root, "volumes", f"{ids[3]}.img"))
        self.assert_get_volume_agrees()
        self.assertRaises(UnknownVolume, self.a.get_volume, str(uuid.uuid4()))
        self.assertEqual(BlockVolume(dataset_id=ids[4], size=SIZE), self.b.get_volume(ids[4]))
        detach_loop_devices_under(self.root)
        self.assert_get_volume_agrees()
        self.assertEqual([BlockVolume(dataset_id=i, size=SIZE) for i in sorted(ids)],
                         self.a.list_volumes())

    def test_stale_record_naming_a_reused_device(self) -> None:
        """
        A stale record naming a loop device that now backs another volume does not make
        its volume attached: that device is the other volume's.
        """
        stale, current = str(uuid.uuid4()), str(uuid.uuid4())
        self.a.create_volume(stale, SIZE)
        self.a.create_volume(current, SIZE)
        device = self.b.attach_volume(current, NODE_B).device_path
        self.write_record(stale, NODE_A, device)
        self.assertEqual(BlockVolume(dataset_id=stale, size=SIZE), self.a.get_volume(stale))
        self.assertRaises(UnattachedVolume, self.a.get_device_path, stale)
        self.assertEqual(device, self.b.get_device_path(current))
        self.assertEqual(NODE_A, self.b.attach_volume(stale, NODE_A).attached_to)
        self.assert_get_volume_agrees()

    def test_record_naming_another_device(self) -> None:
        """
        When a volume's record names a device that is not (or no longer) the one backing
        its file, the device really backing it is found, and named with the record's node.
        """
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        device = self.losetup(os.path.join(self.root, "volumes", f"{dataset_id}.img"))
        for named in ["/dev/loop-nonexistent", "/dev/mapper/../" + os.path.basename(device)]:
            self.write_record(dataset_id, NODE_A, named)
            self.assertEqual(BlockVolume(dataset_id=dataset_id, size=SIZE, attached_to=NODE_A,
                                         device_path=device), self.b.get_volume(dataset_id))
            self.assertEqual(device, self.a.get_device_path(dataset_id))
            self.assert_get_volume_agrees()

    def test_scan_under(self) -> None:
        """
        ``scan_loop_devices(under)`` gives only the devices on files below that path, with
        the autoclear flag of a device whose detach was put off.
        """
        outside = self.root + "-outside.img"
        self.addCleanup(os.unlink, outside)
        with open(outside, "wb") as f:
            f.truncate(SIZE)
        self.losetup(outside)
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, SIZE)
        image = os.path.join(self.root, "volumes", f"{dataset_id}.img")
        device = self.losetup(image)
        with open(device, "rb"):
            # Held open, so the release only marks the device to go when we let go.
            release_loop_device(device, image)
            [found] = scan_loop_devices(os.path.realpath(self.root) + "/")
            self.assertEqual((device, image, False, True),
                             (found.device, found.backing_file, found.deleted, found.autoclear))
        self.assertEqual([], scan_loop_devices(os.path.realpath(self.root) + "/"))

    def test_default_size(self) -> None:
        """``default_size`` sets the size of volumes created without one, rounded up."""
        backend = LoopbackBackend(self.root, NODE_A, default_size=SIZE + 1)
        self.assertEqual(SIZE + 1024 * 1024, backend.create_volume(str(uuid.uuid4())).size)

    def test_new_volume_takes_a_spare_of_its_size(self) -> None:
        """``make_spares`` leaves finished ext4 files (none attached); a volume of their
        size takes one (already a finished, empty ext4 of that size: mounted as is), one
        of another size is a blank file, and the next ``make_spares`` tops up."""
        backend = LoopbackBackend(self.root, NODE_A, default_size=SIZE, spares=2)
        self.assertEqual(2, backend.make_spares())
        self.assertEqual([], self.devices_under_root())
        spares = os.path.join(self.root, "spares")
        self.assertEqual(2, len(os.listdir(spares)))
        dataset_id, other = str(uuid.uuid4()), str(uuid.uuid4())
        self.assertEqual(BlockVolume(dataset_id, SIZE), backend.create_volume(dataset_id))
        self.assertEqual(1, len(os.listdir(spares)))
        backend.create_volume(other, 2 * SIZE)
        self.assertEqual(1, len(os.listdir(spares)))
        self.assertEqual(None, filesystem_type(os.path.join(self.root, "volumes",
                                                            f"{other}.img")))
        device = backend.attach_volume(dataset_id, NODE_A).device_path
        self.addCleanup(backend.detach_volume, dataset_id)
        self.assertEqual(("ext4", ((".", 0o40777),)), probe_filesystem(device))
        path = self.mount(device, "mounted")
        self.assertEqual([], os.listdir(path))
        with open(device, "rb") as f:
            superblock = f.read(2048)[1024:]
        blocks, log_block_size = struct.unpack_from("<I", superblock, 4)[0], \
            struct.unpack_from("<I", superblock, 0x18)[0]
        self.assertEqual(SIZE, blocks * (1024 << log_block_size))  # the asked size
        self.assertEqual(1, backend.make_spares())
        self.assertEqual(2, len(os.listdir(spares)))

    def test_too_large(self) -> None:
        """A size no file can have is refused with ``InvalidVolumeRequest``, leaving nothing."""
        e = self.assertRaises(InvalidVolumeRequest, self.a.create_volume,
                              str(uuid.uuid4()), 2 ** 63)
        self.assertIn("too large", str(e))
        self.assertEqual([], os.listdir(os.path.join(self.root, "volumes")))


@pytest.mark.integration
class LoopbackRootSafetyTests(SynchronousTestCase):
    """Symbolic links planted in the loopback root are never followed (issue 8, point 8)."""

    def setUp(self) -> None:
        self.root = loopback_root(self)
        self.backend = LoopbackBackend(self.root, NODE_A)
        self.backend.list_volumes()  # makes the root's folders
        self.victim = os.path.join(self.root, "victim")
        with open(self.victim, "wb") as f:
            f.write(b"precious")

    def test_temporary_file_symlink_not_followed(self) -> None:
        """A symlink at a temporary file's name is replaced, its target left untouched."""
        dataset_id = str(uuid.uuid4())
        os.symlink(self.victim, os.path.join(self.root, "volumes", f".{dataset_id}.img.tmp"))
        os.symlink(self.victim,
                   os.path.join(self.root, "attachments", f".{dataset_id}.json.tmp"))
        self.backend.create_volume(dataset_id, SIZE)
        device = self.backend.attach_volume(dataset_id, NODE_A).device_path
        self.addCleanup(release_loop_device, device,
                        os.path.join(os.path.realpath(self.root), "volumes",
                                     f"{dataset_id}.img"))
        with open(self.victim, "rb") as f:
            self.assertEqual(b"precious", f.read())
        image = os.path.join(self.root, "volumes", f"{dataset_id}.img")
        self.assertFalse(os.path.islink(image))
        self.assertEqual(SIZE, os.stat(image).st_size)
        self.backend.detach_volume(dataset_id)

    def test_symlinked_image_refused(self) -> None:
        """An image that is a symlink is no volume: not listed, not attached, not found."""
        dataset_id = str(uuid.uuid4())
        os.symlink(self.victim, os.path.join(self.root, "volumes", f"{dataset_id}.img"))
        self.assertEqual([], self.backend.list_volumes())
        for call in (self.backend.get_volume, self.backend.detach_volume):
            e = self.assertRaises(UnsafeRoot, call, dataset_id)
            self.assertIn("symbolic link", str(e))
        self.assertRaises(UnsafeRoot, self.backend.attach_volume, dataset_id, NODE_A)
        self.assertRaises(VolumeExists, self.backend.create_volume, dataset_id, SIZE)
        self.assertEqual([], self.devices_under_root())

    def test_symlinked_folders_and_lock_refused(self) -> None:
        """A folder or the lock of the root replaced by a symlink stops every call."""
        elsewhere = os.path.join(self.root, "elsewhere")
        os.mkdir(elsewhere)
        for name in ("attachments", "lock"):
            path = os.path.join(self.root, name)
            moved = path + ".moved"
            os.rename(path, moved)
            os.symlink(elsewhere if name != "lock" else self.victim, path)
            e = self.assertRaises(UnsafeRoot, self.backend.list_volumes)
            self.assertIn(path, str(e))
            os.unlink(path)
            os.rename(moved, path)
        self.assertEqual([], self.backend.list_volumes())

    def test_symlinked_spare_not_taken(self) -> None:
        """A spare that is a symlink is not renamed into a volume."""
        os.symlink(self.victim, os.path.join(self.root, "spares", f"{SIZE}-{'0' * 32}.img"))
        dataset_id = str(uuid.uuid4())
        self.backend.create_volume(dataset_id, SIZE)
        self.assertFalse(os.path.islink(
            os.path.join(self.root, "volumes", f"{dataset_id}.img")))

    def test_root_folders_are_private(self) -> None:
        """The root's folders are made mode 0700."""
        for name in ("volumes", "attachments", "spares"):
            self.assertEqual(0o700, os.stat(os.path.join(self.root, name)).st_mode & 0o777)

    def devices_under_root(self) -> list:
        """The loop devices backed by files in the root."""
        prefix = os.path.realpath(self.root) + "/"
        return [d for d in scan_loop_devices() if d.backing_file.startswith(prefix)]
