"""
Block-device backends: the ``IBlockDeviceBackend`` interface the agent converges through,
its typed errors, the in-memory fake used by agent tests, and the ``loopback`` backend
(sparse files attached as loop devices, one shared folder acting as the block store). Every
backend passes the conformance suite in ``tests.contracts.backends``.
"""

from pyflock.agent._backends._interface import (
    GiB, MiB, AlreadyAttached, BackendError, BlockVolume, IBlockDeviceBackend,
    InvalidVolumeRequest, UnattachedVolume, UnknownVolume, VolumeBusy, VolumeExists,
)
from pyflock.agent._backends._loopback import (
    AttachmentRecord, Leftovers, LoopbackBackend, LoopbackSnapshot, LoopDevice,
    find_leftovers, volumes_from_snapshot,
)
from pyflock.agent._backends._memory import MemoryBackend, MemoryBlockStore

__all__ = [
    "GiB", "MiB", "AlreadyAttached", "AttachmentRecord", "BackendError", "BlockVolume",
    "IBlockDeviceBackend", "InvalidVolumeRequest", "Leftovers", "LoopDevice",
    "LoopbackBackend", "LoopbackSnapshot", "MemoryBackend", "MemoryBlockStore",
    "UnattachedVolume", "UnknownVolume", "VolumeBusy", "VolumeExists", "find_leftovers",
    "volumes_from_snapshot",
]
