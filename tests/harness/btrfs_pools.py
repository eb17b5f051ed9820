"""
Real btrfs pools for tests: each a sparse file in a fresh temporary folder, formatted and
attached as a loop device by ``BtrfsPool`` itself, and released (unmounted, its loop
device detached, its folder removed) when the test ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
from typing import Optional

from pyflock.agent._backends._btrfs import BtrfsBackend
from pyflock.agent._backends._btrfs_pool import BtrfsPool
from pyflock.agent._backends._interface import MiB
from tests.contracts.peer_backends import PeerHarness
from tests.harness.requirements import require_commands, require_root

__all__ = ["POOL_SIZE", "btrfs_backend", "btrfs_peer_harness", "new_pool", "send_command",
           "send_stream", "shared_btrfs_backend"]

#: Big enough for mkfs.btrfs and the contract suite's small files.
POOL_SIZE = 160 * MiB


def new_pool(test_case, size: Optional[int] = POOL_SIZE) -> BtrfsPool:
    """A pool over a file not yet created (``size`` None: none will be), released at
    the end of ``test_case``."""
    require_root()
    require_commands("btrfs", "mkfs.btrfs", "blkid")
    folder = tempfile.mkdtemp(prefix="pyflock-btrfs-")
    pool = BtrfsPool(os.path.join(folder, "pool.img"), os.path.join(folder, "mnt"), size)

    def clean() -> None:
        problems = pool.release()
        shutil.rmtree(folder, ignore_errors=not problems)
        assert not problems, problems
    test_case.addCleanup(clean)
    return pool


def btrfs_backend(test_case, node_uuid: str, size: Optional[int] = POOL_SIZE) -> BtrfsBackend:
    """A ``BtrfsBackend`` for ``node_uuid`` over a new pool of its own."""
    return BtrfsBackend.open(new_pool(test_case, size), node_uuid, default_size=64 * MiB)


def _write(backend, dataset_id: str, name: str, data: bytes) -> None:
    with open(os.path.join(backend.get_dataset(dataset_id).path, name), "wb") as f:
        f.write(data)


def _remove(backend, dataset_id: str, name: str) -> None:
    os.remove(os.path.join(backend.get_dataset(dataset_id).path, name))


def _read(backend, dataset_id: str, name: str) -> Optional[bytes]:
    try:
        with open(os.path.join(backend.get_dataset(dataset_id).path, name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


#: One pool per node uuid for the whole run, emptied before and after each test that
#: uses it: making a pool (mkfs, loop device, mount) costs more than most tests.
_SHARED: dict = {}


def _empty(backend: BtrfsBackend) -> None:
    """Destroy every copy in ``backend``'s pool."""
    for copy in backend.list_datasets():
        backend.destroy_dataset(copy.dataset_id)


def _release_shared() -> None:
    """Release the shared pools and remove their folders (at the end of the run)."""
    for backend in _SHARED.values():
        if not backend.release():
            shutil.rmtree(os.path.dirname(backend.pool.pool_path), ignore_errors=True)
    _SHARED.clear()


def shared_btrfs_backend(test_case, node_uuid: str) -> BtrfsBackend:
    """``node_uuid``'s backend over the run's pool for that node, empty, and emptied
    again at the end of ``test_case``; the pools are released when the run ends."""
    backend = _SHARED.get(node_uuid)
    if backend is None:
        require_root()
        require_commands("btrfs", "mkfs.btrfs", "blkid")
        folder = tempfile.mkdtemp(prefix="pyflock-btrfs-")
        pool = BtrfsPool(os.path.join(folder, "pool.img"), os.path.join(folder, "mnt"),
                         POOL_SIZE)
        if not _SHARED:
            atexit.register(_release_shared)
        backend = _SHARED[node_uuid] = BtrfsBackend.open(pool, node_uuid,
                                                         default_size=64 * MiB)
    _empty(backend)
    test_case.addCleanup(_empty, backend)
    return backend


def btrfs_peer_harness(test_case) -> PeerHarness:
    """A contract-suite harness whose every node has its own loop-file btrfs pool."""
    return PeerHarness(backend_for=lambda node_uuid: shared_btrfs_backend(test_case, node_uuid),
                       write=_write, remove=_remove, read=_read)


# -- crafted send streams ----------------------------------------------------------------

def _crc32c(data: bytes) -> int:
    """CRC-32C as ``btrfs send`` computes it: seed 0, no final inversion."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


#: Command and attribute numbers of send streams, version 1 (btrfs-progs send.h).
SUBVOL, SNAPSHOT, MKFILE, SYMLINK, CLONE, END = 1, 2, 3, 8, 16, 21
A_UUID, A_CTRANSID, A_INO, A_PATH, A_PATH_LINK, A_CLONE_UUID = 1, 2, 3, 15, 17, 20


def send_command(command: int, *attributes: tuple) -> bytes:
    """One send-stream command with ``(kind, bytes)`` attributes and its checksum."""
    body = b"".join(struct.pack("<HH", kind, len(value)) + value for kind, value in attributes)
    unchecked = struct.pack("<IHI", len(body), command, 0) + body
    return struct.pack("<IHI", len(body), command, _crc32c(unchecked)) + body


def send_stream(*commands: bytes) -> bytes:
    """A version-1 send stream of ``commands`` (give the END command yourself)."""
    return b"btrfs-stream\0" + struct.pack("<I", 1) + b"".join(commands)
