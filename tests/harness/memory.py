"""
In-memory filesystems for the agent's tests: ``MemoryFilesystems``, the ``IFilesystems``
that goes with ``MemoryBlockStore``, and ``MemoryDisks``, what the store's volumes hold.
Mounting holds the volume's device, as a real mount holds a loop device, so a detach of a
mounted volume fails with ``VolumeBusy`` with both the fake and the real thing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Optional

from zope.interface import implementer

from pyflock.agent._discovery import FilesystemCondition, FilesystemProbe, Mount
from pyflock.agent._fs import FilesystemError
from pyflock.agent._runner import IFilesystems


class MemoryDisks:
    """
    What the volumes of a ``MemoryBlockStore`` hold, shared by every node's
    ``MemoryFilesystems``: each dataset's volume is blank, holds a half-made filesystem,
    or a ready one (``FilesystemCondition``). Kept by dataset id, which pyflock never
    reuses (deleted datasets keep theirs).
    """

    def __init__(self, store):
        self.store = store
        self.conditions: dict[str, FilesystemCondition] = {}

    def condition(self, dataset_id: str) -> FilesystemCondition:
        """What the dataset's volume holds."""
        return self.conditions.get(dataset_id, FilesystemCondition.NONE)

    def set_condition(self, dataset_id: str, condition: FilesystemCondition) -> None:
        """Make the dataset's volume hold ``condition`` (to build test worlds)."""
        self.conditions[dataset_id] = condition


_PROBES = {
    FilesystemCondition.NONE: FilesystemProbe(fstype=None),
    FilesystemCondition.UNFINISHED: FilesystemProbe(
        fstype="ext4", root=((".", 0o40755), ("..", 0o40755), ("lost+found", 0o40700))),
    FilesystemCondition.READY: FilesystemProbe(
        fstype="ext4", root=((".", 0o40777), ("..", 0o40777))),
}


@implementer(IFilesystems)
class MemoryFilesystems:
    """
    One node's filesystems over ``MemoryDisks``: its own mount table and directories.
    A mount holds the volume's device (``MemoryBlockStore.hold``) until it is unmounted.
    Devices are only usable on the node they are attached to.
    """

    @contextmanager
    def hold(self, device: str):
        """Memory devices are never reused while a change runs: nothing to hold."""
        yield

    def __init__(self, disks: MemoryDisks, backend):
        self.disks = disks
        self.backend = backend
        self.table: dict[str, tuple[str, Optional[Callable[[], None]]]] = {}
        self.directories: set[str] = set()

    def _volume(self, device: str):
        for volume in self.backend.list_volumes():
            if volume.device_path == device and volume.attached_to == self.backend.node_uuid:
                return volume
        raise FilesystemError(f"device {device} does not exist on node "
                              f"{self.backend.node_uuid}")

    def mounts(self, root: str) -> list:
        """The mounts directly under ``root``."""
        return [Mount(mount_point=path, source=source)
                for path, (source, _) in sorted(self.table.items())
                if os.path.dirname(path) == root]

    def device_number(self, device: str) -> Optional[tuple]:
        """Unknown: fake devices are told apart by path."""
        return None

    def probe(self, device: str) -> FilesystemProbe:
        """What the device's volume holds."""
        return _PROBES[self.disks.condition(self._volume(device).dataset_id)]

    def empty_directories(self, root: str) -> frozenset:
        """Every directory under ``root`` (nothing is ever stored in a fake one)."""
        return frozenset(os.path.basename(p) for p in self.directories
                         if os.path.dirname(p) == root)

    def make_filesystem(self, device: str) -> None:
        """Make the device's volume hold a ready filesystem; refuses a non-blank one."""
        dataset_id = self._volume(device).dataset_id
        if self.disks.condition(dataset_id) is not FilesystemCondition.NONE:
            raise FilesystemError(f"{device} already holds a filesystem")
        self.disks.set_condition(dataset_id, FilesystemCondition.READY)

    def finish_filesystem(self, device: str) -> None:
        """Make a half-made filesystem ready; refuses anything else."""
        dataset_id = self._volume(device).dataset_id
        if self.disks.condition(dataset_id) is not FilesystemCondition.UNFINISHED:
            raise FilesystemError(f"{device} does not hold a half-made filesystem")
        self.disks.set_condition(dataset_id, FilesystemCondition.READY)

    def mount(self, device: str, path: str) -> None:
        """Mount the device here, holding it; refuses a blank device or a taken path."""
        current = self.table.get(path)
        if current is not None:
            if current[0] == device:
                return
            raise FilesystemError(f"cannot mount {device} at {path}: {current[0]} is "
                                  f"already mounted there")
        dataset_id = self._volume(device).dataset_id
        if self.disks.condition(dataset_id) is FilesystemCondition.NONE:
            raise FilesystemError(f"{device} holds no filesystem to mount")
        self.table[path] = (device, self.disks.store.hold(dataset_id))
        self.directories.add(path)

    def mount_foreign(self, source: str, path: str) -> None:
        """Mount something that is no volume (a tmpfs, say) at ``path`` (for tests)."""
        self.table[path] = (source, None)
        self.directories.add(path)

    def unmount(self, path: str) -> None:
        """Unmount, letting go of the device."""
        current = self.table.pop(path, None)
        if current is not None and current[1] is not None:
            current[1]()

    def remove_mount_point(self, path: str) -> None:
        """Remove the directory; refuses while something is mounted there."""
        if path in self.table:
            raise FilesystemError(f"{path} is still mounted; unmount it first")
        self.directories.discard(path)

    def make_directory(self, path: str) -> None:
        """Create an (empty) directory (for tests)."""
        self.directories.add(path)

    def crash(self) -> None:
        """Lose every mount without unmounting, as the node's host dying does."""
        for _, release in self.table.values():
            if release is not None:
                release()
        self.table.clear()
