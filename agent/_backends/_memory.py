"""
An in-memory block store: the fake every agent test uses in place of a real backend.

It behaves like the loopback backend, traps included: ``hold`` makes a volume's device
busy the way a container's mount namespace does (a detach then raises ``VolumeBusy`` and the
device goes away by itself when the hold ends), and ``lose_devices`` does what a host reboot
does to loop devices. The same conformance suite runs against both.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import attr
from zope.interface import implementer

from pyflock.agent._backends._interface import (
    GiB, MiB, AlreadyAttached, BlockVolume, IBlockDeviceBackend, UnattachedVolume,
    UnknownVolume, VolumeBusy, VolumeExists, check_dataset_id, check_node_uuid, round_size,
)


@attr.s(auto_attribs=True)
class _Volume:
    size: int
    holder: Optional[str] = None        # the node recorded as holding it, even once stale
    device: Optional[str] = None        # set while a device really exists
    holds: int = 0
    detach_requested: bool = False


class MemoryBlockStore:
    """
    The shared state of a fake block store; ``backend(node_uuid)`` gives each node its view.
    Thread-safe, since the agent calls backends from threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._volumes: dict[str, _Volume] = {}
        self._next_device = 0

    def backend(self, node_uuid: str, allocation_unit: int = MiB,
                default_size: int = 10 * GiB) -> "MemoryBackend":
        """A backend for ``node_uuid`` over this store."""
        return MemoryBackend(self, node_uuid, allocation_unit, default_size)

    def hold(self, dataset_id: str) -> Callable[[], None]:
        """
        Keep the attached volume's device in use, as a container holding its filesystem
        does; returns a function that lets go (idempotent).
        """
        with self._lock:
            volume = self._volumes.get(dataset_id)
            if volume is None:
                raise UnknownVolume(dataset_id)
            if volume.device is None:
                raise UnattachedVolume(dataset_id)
            volume.holds += 1
            device = volume.device
        released = []

        def release() -> None:
            with self._lock:
                if released:
                    return
                released.append(True)
                if volume.device != device:
                    return
                volume.holds -= 1
                if volume.holds == 0 and volume.detach_requested:
                    volume.device = None
                    volume.detach_requested = False
        return release

    def lose_devices(self) -> None:
        """Make every device vanish, as a host reboot does; records of holders stay."""
        with self._lock:
            for volume in self._volumes.values():
                volume.device = None
                volume.holds = 0
                volume.detach_requested = False

    def _new_device(self) -> str:
        device = f"/dev/fake-loop{self._next_device}"
        self._next_device += 1
        return device


@implementer(IBlockDeviceBackend)
@attr.s(auto_attribs=True, eq=False)
class MemoryBackend:
    """One node's view of a ``MemoryBlockStore``."""

    store: MemoryBlockStore
    node_uuid: str
    _allocation_unit: int = MiB
    default_size: int = 10 * GiB

    def allocation_unit(self) -> int:
        """The granularity of volume sizes in bytes."""
        return self._allocation_unit

    def list_volumes(self) -> list[BlockVolume]:
        """Every volume in the store, sorted by dataset id."""
        with self.store._lock:
            return [self._record(dataset_id, volume)
                    for dataset_id, volume in sorted(self.store._volumes.items())]

    def create_volume(self, dataset_id: str, size: Optional[int] = None,
                      profile: Optional[str] = None) -> BlockVolume:
        """Create an unattached volume of ``size`` bytes (rounded up); the memory store
        has no storage profiles, so ``profile`` is ignored."""
        check_dataset_id(dataset_id)
        size = round_size(self.default_size if size is None else size, self._allocation_unit)
        with self.store._lock:
            if dataset_id in self.store._volumes:
                raise VolumeExists(dataset_id)
            volume = self.store._volumes[dataset_id] = _Volume(size=size)
            return self._record(dataset_id, volume)

    def attach_volume(self, dataset_id: str, node_uuid: str) -> BlockVolume:
        """Attach the volume to ``node_uuid`` unless it is attached anywhere."""
        check_node_uuid(node_uuid)
        with self.store._lock:
            volume = self._get(dataset_id)
            if volume.device is not None:
                raise AlreadyAttached(dataset_id, volume.holder, volume.device)
            volume.holder = node_uuid
            volume.device = self.store._new_device()
            return self._record(dataset_id, volume)

    def detach_volume(self, dataset_id: str, discard: bool = False) -> None:
        """Detach the volume; ``VolumeBusy`` while its device is held (everything here is
        durable at once, ``discard`` or not)."""
        with self.store._lock:
            volume = self._get(dataset_id)
            if volume.device is None:
                if volume.holder is None:
                    raise UnattachedVolume(dataset_id)
                volume.holder = None
                return
            if volume.holds:
                volume.detach_requested = True
                raise VolumeBusy(dataset_id, (volume.device,))
            volume.device = None
            volume.holder = None

    def destroy_volume(self, dataset_id: str) -> None:
        """Destroy an unattached volume."""
        with self.store._lock:
            volume = self._get(dataset_id)
            if volume.device is not None:
                raise AlreadyAttached(dataset_id, volume.holder, volume.device)
            del self.store._volumes[dataset_id]

    def get_volume(self, dataset_id: str) -> BlockVolume:
        """One volume as ``list_volumes`` lists it."""
        with self.store._lock:
            return self._record(dataset_id, self._get(dataset_id))

    def get_device_path(self, dataset_id: str) -> str:
        """The device path of a volume attached to this node."""
        with self.store._lock:
            volume = self._get(dataset_id)
            if volume.device is None or volume.holder != self.node_uuid:
                raise UnattachedVolume(dataset_id)
            return volume.device

    def _get(self, dataset_id: str) -> _Volume:
        check_dataset_id(dataset_id)
        volume = self.store._volumes.get(dataset_id)
        if volume is None:
            raise UnknownVolume(dataset_id)
        return volume

    @staticmethod
    def _record(dataset_id: str, volume: _Volume) -> BlockVolume:
        if volume.device is None:
            return BlockVolume(dataset_id=dataset_id, size=volume.size)
        return BlockVolume(dataset_id=dataset_id, size=volume.size,
                           attached_to=volume.holder, device_path=volume.device)
