"""
The conformance suite every ``IBlockDeviceBackend`` passes, and harnesses that run it
against the in-memory fake and the real loopback backend.

``make_iblockdevicebackend_tests(harness_factory)`` returns a test case class; a test module
subclasses it once per backend. The harness gives the suite per-node backends over one
shared store, and the two hooks it needs to exercise the traps: keeping a device busy the
way a container's mount namespace does, and losing every device the way a reboot does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Callable

import attr
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pyflock.agent._backends._interface import (
    AlreadyAttached, BlockVolume, IBlockDeviceBackend, InvalidVolumeRequest,
    UnattachedVolume, UnknownVolume, VolumeBusy, VolumeExists,
)
from pyflock.agent._backends._loopback import (
    LoopbackBackend, release_loop_device, scan_loop_devices,
)
from pyflock.agent._backends._memory import MemoryBlockStore
from pyflock.agent._fs import has_filesystem, make_filesystem
from tests.harness.requirements import require_commands, require_root

#: Two node uuids the suite attaches volumes to.
NODE_A = "0b0c7e62-9a4f-4d36-9d54-2a1f7d3c0a01"
NODE_B = "5d3f2c8e-1b6a-4f7e-8c2d-9e0a4b6c0b02"

#: A size every backend accepts (64 MiB, the smallest dataset size pyflock allows).
SIZE = 64 * 1024 * 1024


@attr.s(frozen=True, auto_attribs=True)
class BackendHarness:
    """
    What the suite needs from one backend: ``backend_for(node_uuid)`` gives that node's
    backend over one shared store; ``hold(backend, dataset_id)`` keeps the attached volume's
    device in use as a container would and returns a function that lets go; ``lose_devices``
    makes every device vanish as a reboot does; ``real_devices`` says whether device paths
    are real block devices the suite can write to; ``size`` is a size the backend makes
    exactly (a multiple of its allocation unit: 64 MiB, or 1 GiB for EBS).
    """

    backend_for: Callable[[str], IBlockDeviceBackend]
    hold: Callable[[IBlockDeviceBackend, str], Callable[[], None]]
    lose_devices: Callable[[], None]
    real_devices: bool = False
    size: int = SIZE


def memory_harness(test_case: SynchronousTestCase) -> BackendHarness:
    """A harness over a fresh ``MemoryBlockStore``."""
    store = MemoryBlockStore()
    return BackendHarness(backend_for=store.backend,
                          hold=lambda backend, dataset_id: store.hold(dataset_id),
                          lose_devices=store.lose_devices)


def loopback_root(test_case: SynchronousTestCase) -> str:
    """
    A fresh root folder for loopback backends, removed after the test together with every
    loop device backed by a file in it (detached by name). Needs root (``require_root``:
    the test fails under ``$CI`` without it, and is skipped otherwise).
    """
    require_root()
    require_commands("losetup", "mkfs.ext4")
    root = tempfile.mkdtemp(prefix="pf-loop-")
    test_case.addCleanup(shutil.rmtree, root)
    test_case.addCleanup(detach_loop_devices_under, root)
    return root


#: Seconds a loop device marked to detach itself may take to go (see below).
_AUTOCLEAR_WAIT = 10.0


def detach_loop_devices_under(root: str) -> None:
    """
    Detach every loop device backed by a file under ``root``; raise if one stays (a test
    leaked a mount or a holder).
    """
    prefix = os.path.realpath(root) + "/"
    for device in scan_loop_devices():
        if device.backing_file.startswith(prefix):
            path = device.backing_file + (" (deleted)" if device.deleted else "")
            release_loop_device(device.device, path)
    # A device its last user let go of moments ago is detached by the kernel a little
    # later (autoclear runs in a work queue, after the filesystem's own close): wait for
    # those, never for one still in use.
    deadline = time.monotonic() + _AUTOCLEAR_WAIT
    while True:
        left = [d for d in scan_loop_devices() if d.backing_file.startswith(prefix)]
        if not left or time.monotonic() > deadline or not all(d.autoclear for d in left):
            break
        time.sleep(0.05)
    if left:
        raise AssertionError(f"loop devices still attached under {root}: {left}")


def hold_in_namespace(test_case: SynchronousTestCase, device: str, mount_point: str
                      ) -> Callable[[], None]:
    """
    Mount ``device`` (made into ext4 if it has no filesystem) at ``mount_point`` inside a
    child process's private mount namespace, as a container keeps a volume's filesystem;
    returns a function that kills the child (also called at cleanup).
    """
    if not has_filesystem(device):
        make_filesystem(device)
    os.makedirs(mount_point, exist_ok=True)
    child = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount "$0" "$1" && echo ready && exec sleep infinity', device, mount_point],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def release() -> None:
        if child.returncode is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    test_case.addCleanup(release)
    if child.stdout.readline() != "ready\n":
        release()
        raise AssertionError(f"could not hold {device}: {child.stderr.read()}")
    return release


def loopback_harness(test_case: SynchronousTestCase) -> BackendHarness:
    """A harness over real loopback backends sharing a fresh root (needs root)."""
    root = loopback_root(test_case)
    holders = []

    def hold(backend: IBlockDeviceBackend, dataset_id: str) -> Callable[[], None]:
        mount_point = os.path.join(root, "holders", str(len(holders)))
        holders.append(mount_point)
        return hold_in_namespace(test_case, backend.get_device_path(dataset_id), mount_point)

    def lose_devices() -> None:
        # Detaching behind the backend's back, records untouched: what a reboot leaves.
        detach_loop_devices_under(root)

    return BackendHarness(backend_for=lambda node: LoopbackBackend(root, node),
                          hold=hold, lose_devices=lose_devices, real_devices=True)


def make_iblockdevicebackend_tests(
        harness_factory: Callable[[SynchronousTestCase], BackendHarness]) -> type:
    """
    A ``SynchronousTestCase`` subclass checking that backends from ``harness_factory``
    (called once per test with the test case, for cleanups) honour ``IBlockDeviceBackend``.
    """

    class IBlockDeviceBackendTests(SynchronousTestCase):
        """Conformance tests for one ``IBlockDeviceBackend`` implementation."""

        def setUp(self) -> None:
            self.harness = harness_factory(self)
            self.a = self.harness.backend_for(NODE_A)
            self.b = self.harness.backend_for(NODE_B)
            self.size = self.harness.size

        def new_volume(self, size: int = 0) -> BlockVolume:
            return self.a.create_volume(str(uuid.uuid4()), size or self.size)

        def volume(self, backend: IBlockDeviceBackend, dataset_id: str) -> BlockVolume:
            [volume] = [v for v in backend.list_volumes() if v.dataset_id == dataset_id]
            return volume

        def test_interface(self) -> None:
            """The backend provides ``IBlockDeviceBackend``."""
            self.assertTrue(verifyObject(IBlockDeviceBackend, self.a))

        def test_node_uuid(self) -> None:
            """Each backend knows the node it serves."""
            self.assertEqual((NODE_A, NODE_B), (self.a.node_uuid, self.b.node_uuid))

        def test_allocation_unit(self) -> None:
            """The allocation unit is a positive number of bytes dividing the harness's size."""
            unit = self.a.allocation_unit()
            self.assertTrue(isinstance(unit, int) and unit > 0 and self.size % unit == 0, unit)

        def test_empty(self) -> None:
            """A fresh store has no volumes."""
            self.assertEqual([], self.a.list_volumes())

        def test_create(self) -> None:
            """A created volume is returned and listed, unattached, with its size."""
            dataset_id = str(uuid.uuid4())
            volume = self.a.create_volume(dataset_id, self.size)
            expected = BlockVolume(dataset_id=dataset_id, size=self.size)
            self.assertEqual((expected, [expected]), (volume, self.a.list_volumes()))

        def test_create_with_profile(self) -> None:
            """Every backend takes a storage profile: one with volume types maps it, the
            others ignore it; either way the volume is made with its size."""
            dataset_id = str(uuid.uuid4())
            volume = self.a.create_volume(dataset_id, self.size, profile="gold")
            self.assertEqual(BlockVolume(dataset_id=dataset_id, size=self.size), volume)

        def test_created_visible_from_other_node(self) -> None:
            """A volume created through one node is listed by every node."""
            volume = self.new_volume()
            self.assertEqual([volume], self.b.list_volumes())

        def test_size_rounded_up(self) -> None:
            """Sizes are rounded up to the allocation unit; exact multiples are kept."""
            unit = self.a.allocation_unit()
            volumes = [self.new_volume(self.size + 1), self.new_volume(self.size)]
            self.assertEqual([self.size + unit, self.size], [v.size for v in volumes])
            self.assertEqual(sorted([self.size, self.size + unit]),
                             sorted(v.size for v in self.a.list_volumes()))

        def test_default_size(self) -> None:
            """Without a size, a volume gets the backend's default, a whole number of units."""
            volume = self.a.create_volume(str(uuid.uuid4()))
            self.assertTrue(volume.size > 0 and volume.size % self.a.allocation_unit() == 0)

        def test_list_sorted(self) -> None:
            """Volumes are listed sorted by dataset id."""
            ids = [self.new_volume().dataset_id for _ in range(4)]
            self.assertEqual(sorted(ids), [v.dataset_id for v in self.b.list_volumes()])

        def test_create_existing(self) -> None:
            """Creating a volume whose dataset already has one raises ``VolumeExists``."""
            volume = self.new_volume()
            e = self.assertRaises(VolumeExists, self.b.create_volume, volume.dataset_id,
                                  self.size)
            self.assertEqual(volume.dataset_id, e.dataset_id)

        def test_invalid_requests(self) -> None:
            """Malformed ids and sizes raise ``InvalidVolumeRequest`` and create nothing."""
            for dataset_id, size in [("../etc", self.size), ("", self.size),
                                     ("a/b", self.size), (str(uuid.uuid4()), 0),
                                     (str(uuid.uuid4()), -1),
                                     (str(uuid.uuid4()), 1.5)]:
                self.assertRaises(InvalidVolumeRequest, self.a.create_volume, dataset_id, size)
            self.assertRaises(InvalidVolumeRequest, self.a.attach_volume, "../x", NODE_A)
            self.assertEqual([], self.a.list_volumes())

        def test_attach(self) -> None:
            """An attached volume has a device path and is listed as held by its node."""
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            self.assertEqual((volume.dataset_id, self.size, NODE_A),
                             (attached.dataset_id, attached.size, attached.attached_to))
            self.assertTrue(attached.device_path)
            self.assertEqual([attached], self.b.list_volumes())
            self.assertEqual(attached.device_path,
                             self.a.get_device_path(volume.dataset_id))

        def test_get_volume_as_listed(self) -> None:
            """``get_volume`` answers each volume exactly as ``list_volumes`` lists it,
            unattached, attached here and attached to another node."""
            unattached, here, there = (self.new_volume() for _ in range(3))
            self.a.attach_volume(here.dataset_id, NODE_A)
            self.b.attach_volume(there.dataset_id, NODE_B)
            for backend in (self.a, self.b):
                self.assertEqual(backend.list_volumes(),
                                 sorted((backend.get_volume(v.dataset_id)
                                         for v in (unattached, here, there)),
                                        key=lambda v: v.dataset_id))

        def test_attach_to_other_node_refused(self) -> None:
            """Attaching a volume held by another node raises ``AlreadyAttached`` naming it."""
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            e = self.assertRaises(AlreadyAttached, self.b.attach_volume,
                                  volume.dataset_id, NODE_B)
            self.assertEqual((volume.dataset_id, NODE_A), (e.dataset_id, e.holder))
            self.assertIn(NODE_A, str(e))
            self.assertEqual([attached], self.b.list_volumes())

        def test_attach_twice_refused(self) -> None:
            """Attaching a volume again to the node holding it raises ``AlreadyAttached``."""
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            e = self.assertRaises(AlreadyAttached, self.a.attach_volume,
                                  volume.dataset_id, NODE_A)
            self.assertEqual(NODE_A, e.holder)
            self.assertEqual([attached], self.a.list_volumes())

        def test_device_path_of_other_node(self) -> None:
            """``get_device_path`` raises ``UnattachedVolume`` on a node not holding it."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.assertRaises(UnattachedVolume, self.b.get_device_path, volume.dataset_id)

        def test_device_path_unattached(self) -> None:
            """``get_device_path`` of an unattached volume raises ``UnattachedVolume``."""
            volume = self.new_volume()
            self.assertRaises(UnattachedVolume, self.a.get_device_path, volume.dataset_id)

        def test_detach(self) -> None:
            """A detached volume is listed unattached and has no device path."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.a.detach_volume(volume.dataset_id)
            self.assertEqual([volume], self.b.list_volumes())
            self.assertRaises(UnattachedVolume, self.a.get_device_path, volume.dataset_id)

        def test_detach_from_any_node(self) -> None:
            """Any node's backend can detach a volume, whichever node holds it."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.b.detach_volume(volume.dataset_id)
            self.assertEqual([volume], self.a.list_volumes())

        def test_detach_unattached(self) -> None:
            """Detaching an unattached volume raises ``UnattachedVolume``."""
            volume = self.new_volume()
            self.assertRaises(UnattachedVolume, self.a.detach_volume, volume.dataset_id)

        def test_move(self) -> None:
            """After a detach from one node, the volume attaches to another."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.a.detach_volume(volume.dataset_id)
            attached = self.b.attach_volume(volume.dataset_id, NODE_B)
            self.assertEqual(NODE_B, attached.attached_to)
            self.assertEqual([attached], self.a.list_volumes())
            self.assertEqual(attached.device_path, self.b.get_device_path(volume.dataset_id))
            self.assertRaises(UnattachedVolume, self.a.get_device_path, volume.dataset_id)

        def test_data_moves(self) -> None:
            """Bytes written through the device on one node are read back on the next."""
            if not self.harness.real_devices:
                self.skipTest("not about the machine: this backend's device paths are "
                              "not block devices a test can write bytes to (the loopback "
                              "run of this suite checks that the bytes move)")
            volume = self.new_volume()
            device = self.a.attach_volume(volume.dataset_id, NODE_A).device_path
            data = os.urandom(4096)
            with open(device, "r+b") as f:
                f.seek(self.size - 8192)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.a.detach_volume(volume.dataset_id)
            device = self.b.attach_volume(volume.dataset_id, NODE_B).device_path
            with open(device, "rb") as f:
                f.seek(self.size - 8192)
                self.assertEqual(data, f.read(4096))

        def test_destroy(self) -> None:
            """A destroyed volume is gone, and its dataset id can be used again."""
            volume = self.new_volume()
            other = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.a.detach_volume(volume.dataset_id)
            self.b.destroy_volume(volume.dataset_id)
            self.assertEqual([other], self.a.list_volumes())
            self.assertRaises(UnknownVolume, self.a.attach_volume, volume.dataset_id, NODE_A)
            again = self.a.create_volume(volume.dataset_id, self.size)
            self.assertEqual(volume, again)

        def test_destroy_attached_refused(self) -> None:
            """Destroying an attached volume raises ``AlreadyAttached`` and keeps it."""
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            e = self.assertRaises(AlreadyAttached, self.a.destroy_volume, volume.dataset_id)
            self.assertEqual(NODE_A, e.holder)
            self.assertEqual([attached], self.a.list_volumes())

        def test_unknown_volume(self) -> None:
            """Every operation on a volume that does not exist raises ``UnknownVolume``."""
            dataset_id = str(uuid.uuid4())
            for call in [lambda: self.a.attach_volume(dataset_id, NODE_A),
                         lambda: self.a.detach_volume(dataset_id),
                         lambda: self.a.destroy_volume(dataset_id),
                         lambda: self.a.get_device_path(dataset_id),
                         lambda: self.a.get_volume(dataset_id)]:
                e = self.assertRaises(UnknownVolume, call)
                self.assertEqual(dataset_id, e.dataset_id)

        def test_busy_detach(self) -> None:
            """
            A detach while something holds the device raises ``VolumeBusy`` and the volume
            stays attached to its node, so no other node can take it.
            """
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            self.harness.hold(self.a, volume.dataset_id)
            e = self.assertRaises(VolumeBusy, self.a.detach_volume, volume.dataset_id)
            self.assertEqual((volume.dataset_id, (attached.device_path,)),
                             (e.dataset_id, e.devices))
            self.assertEqual([attached], self.b.list_volumes())
            e = self.assertRaises(AlreadyAttached, self.b.attach_volume,
                                  volume.dataset_id, NODE_B)
            self.assertEqual(NODE_A, e.holder)
            self.assertRaises(VolumeBusy, self.a.detach_volume, volume.dataset_id)

        def test_busy_detach_finishes_by_itself(self) -> None:
            """
            Once the holder of a busy-detached device lets go, the volume is unattached
            and another node can attach it.
            """
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            release = self.harness.hold(self.a, volume.dataset_id)
            self.assertRaises(VolumeBusy, self.a.detach_volume, volume.dataset_id)
            release()
            self.assertEqual([volume], self.b.list_volumes())
            attached = self.b.attach_volume(volume.dataset_id, NODE_B)
            self.assertEqual(NODE_B, attached.attached_to)

        def test_busy_detach_retried(self) -> None:
            """Retrying a busy detach after the holder let go returns normally, once."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            release = self.harness.hold(self.a, volume.dataset_id)
            self.assertRaises(VolumeBusy, self.a.detach_volume, volume.dataset_id)
            release()
            self.a.detach_volume(volume.dataset_id)
            self.assertRaises(UnattachedVolume, self.a.detach_volume, volume.dataset_id)

        def test_hold_released_without_detach(self) -> None:
            """A holder letting go of a device nobody asked to detach leaves it attached."""
            volume = self.new_volume()
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            self.harness.hold(self.a, volume.dataset_id)()
            self.assertEqual([attached], self.a.list_volumes())

        def test_lost_devices_reattach(self) -> None:
            """After a reboot loses the devices, the volume is unattached and reattaches."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.harness.lose_devices()
            self.assertEqual([volume], self.a.list_volumes())
            self.assertRaises(UnattachedVolume, self.a.get_device_path, volume.dataset_id)
            attached = self.a.attach_volume(volume.dataset_id, NODE_A)
            self.assertEqual([attached], self.b.list_volumes())

        def test_lost_devices_other_node(self) -> None:
            """After a reboot loses the devices, another node can attach the volume."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.harness.lose_devices()
            attached = self.b.attach_volume(volume.dataset_id, NODE_B)
            self.assertEqual(NODE_B, attached.attached_to)
            self.assertEqual(attached.device_path, self.b.get_device_path(volume.dataset_id))
            self.assertRaises(UnattachedVolume, self.a.get_device_path, volume.dataset_id)

        def test_lost_devices_new_attachment(self) -> None:
            """
            After a reboot, a volume attached anew (perhaps on the device another volume
            had before) is that volume's: the other one stays unattached.
            """
            first, second = self.new_volume(), self.new_volume()
            self.a.attach_volume(first.dataset_id, NODE_A)
            self.harness.lose_devices()
            attached = self.a.attach_volume(second.dataset_id, NODE_A)
            self.assertEqual(sorted([first, attached], key=lambda v: v.dataset_id),
                             self.b.list_volumes())
            self.assertRaises(UnattachedVolume, self.a.get_device_path, first.dataset_id)
            self.assertEqual(attached.device_path, self.a.get_device_path(second.dataset_id))

        def test_lost_devices_detach_and_destroy(self) -> None:
            """After a reboot, one detach tidies up and the volume can be destroyed."""
            volume = self.new_volume()
            self.a.attach_volume(volume.dataset_id, NODE_A)
            self.harness.lose_devices()
            self.a.detach_volume(volume.dataset_id)
            self.assertRaises(UnattachedVolume, self.a.detach_volume, volume.dataset_id)
            self.a.destroy_volume(volume.dataset_id)
            self.assertEqual([], self.a.list_volumes())

    return IBlockDeviceBackendTests
