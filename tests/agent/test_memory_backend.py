"""
Tests for the in-memory block store: the conformance suite, and the fake's own hooks.
"""

import uuid

from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import (
    MemoryBlockStore, UnattachedVolume, UnknownVolume, VolumeBusy,
)
from tests.contracts.backends import (
    NODE_A, NODE_B, SIZE, make_iblockdevicebackend_tests, memory_harness,
)


class MemoryBackendConformanceTests(make_iblockdevicebackend_tests(memory_harness)):
    """The in-memory backend passes the ``IBlockDeviceBackend`` conformance suite."""


class MemoryBlockStoreTests(SynchronousTestCase):
    """The fake's own hooks: holding devices, losing them, its parameters."""

    def setUp(self) -> None:
        self.store = MemoryBlockStore()
        self.a = self.store.backend(NODE_A)

    def test_hold_unknown(self) -> None:
        """Holding a volume that does not exist raises ``UnknownVolume``."""
        self.assertRaises(UnknownVolume, self.store.hold, str(uuid.uuid4()))

    def test_hold_unattached(self) -> None:
        """Holding an unattached volume raises ``UnattachedVolume``: it has no device."""
        volume = self.a.create_volume(str(uuid.uuid4()), SIZE)
        self.assertRaises(UnattachedVolume, self.store.hold, volume.dataset_id)

    def test_two_holds(self) -> None:
        """A busy-detached device goes away only when its last holder lets go."""
        volume = self.a.create_volume(str(uuid.uuid4()), SIZE)
        attached = self.a.attach_volume(volume.dataset_id, NODE_A)
        first, second = self.store.hold(volume.dataset_id), self.store.hold(volume.dataset_id)
        self.assertRaises(VolumeBusy, self.a.detach_volume, volume.dataset_id)
        first()
        first()
        self.assertEqual([attached], self.a.list_volumes())
        second()
        self.assertEqual([volume], self.a.list_volumes())

    def test_release_after_lost_devices(self) -> None:
        """Letting go after a reboot does not disturb a later attachment."""
        volume = self.a.create_volume(str(uuid.uuid4()), SIZE)
        self.a.attach_volume(volume.dataset_id, NODE_A)
        release = self.store.hold(volume.dataset_id)
        self.store.lose_devices()
        attached = self.store.backend(NODE_B).attach_volume(volume.dataset_id, NODE_B)
        release()
        self.assertEqual([attached], self.a.list_volumes())

    def test_new_device_each_attach(self) -> None:
        """Each attachment gets a fresh device path, as a new loop device would."""
        volume = self.a.create_volume(str(uuid.uuid4()), SIZE)
        first = self.a.attach_volume(volume.dataset_id, NODE_A).device_path
        self.a.detach_volume(volume.dataset_id)
        second = self.a.attach_volume(volume.dataset_id, NODE_A).device_path
        self.assertNotEqual(first, second)

    def test_parameters(self) -> None:
        """The allocation unit and default size are parameters of each backend."""
        backend = self.store.backend(NODE_A, allocation_unit=4096, default_size=5000)
        self.assertEqual(4096, backend.allocation_unit())
        self.assertEqual(8192, backend.create_volume(str(uuid.uuid4())).size)
