"""
Dataset backends, of two kinds. Block devices (attach/detach): the ``IBlockDeviceBackend``
interface, its typed errors, the in-memory fake used by agent tests, and the ``loopback``
backend (sparse files attached as loop devices, one shared folder acting as the block
store); every one passes the conformance suite in ``tests.contracts.backends``. Peer to
peer (copy between nodes, as btrfs will): the ``IPeerBackend`` interface and its in-memory
fake, checked by ``tests.contracts.peer_backends``. docs/backends.md describes both.
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
from pyflock.agent._backends._memory_peer import MemoryPeerBackend
from pyflock.agent._backends._peer import (
    BadStream, IncompleteCopy, IPeerBackend, PeerDataset, UnknownSnapshot,
)

__all__ = [
    "BadStream", "IPeerBackend", "IncompleteCopy", "MemoryPeerBackend", "PeerDataset",
    "UnknownSnapshot",
    "GiB", "MiB", "AlreadyAttached", "AttachmentRecord", "BackendError", "BlockVolume",
    "IBlockDeviceBackend", "InvalidVolumeRequest", "Leftovers", "LoopDevice",
    "LoopbackBackend", "LoopbackSnapshot", "MemoryBackend", "MemoryBlockStore",
    "UnattachedVolume", "UnknownVolume", "VolumeBusy", "VolumeExists", "find_leftovers",
    "volumes_from_snapshot",
]
