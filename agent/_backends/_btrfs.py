"""
The ``btrfs`` backend: a peer-to-peer backend (``IPeerBackend``) keeping each dataset as
subvolumes of this node's pool (``BtrfsPool``): ``datasets/<id>/live`` is the writable
dataset, read-only snapshots sit beside it (layout in ``_btrfs_model``). Only the live
subvolume is ever mounted for containers, never a snapshot.

A stream is pyflock's header line (``StreamHeader``) and then ``btrfs send [-p base]``.
An import runs ``btrfs receive -e -C`` into an empty staging folder of its own on the
pool, with every command of the stream checked on its way in (``SendStreamChecker``);
afterwards exactly one subvolume must be there, read-only, named and ``received_uuid``'d
as the header says, or everything received is deleted (``BadStream``). Only then is the
staging folder renamed into the dataset's snapshots.

``maximum_size`` is recorded, carried by streams and reported, but not enforced: that
takes quota groups, whose costs btrfs-quota(8) warns about (docs/backends.md).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from typing import BinaryIO, Iterable, Optional

from zope.interface import implementer

from pyflock.agent._backends._btrfs_model import (
    MAX_HEADER, NO_SPACE, SIZE_FILE, SNAPSHOTS, STAGING, DatasetSubvolumes,
    Holder, PoolFull, SendStreamChecker, StreamHeader, StreamSizeEstimate, dataset_folder,
    decode_header,
    group_subvolumes, largest_first, live_path, parse_du_total, parse_subvolume_list,
    snapshot_folder, snapshot_name, snapshot_path,
)
from pyflock.agent._backends._btrfs_pool import BtrfsPool, Writeback
from pyflock.agent._backends._interface import (
    GiB, MiB, InvalidVolumeRequest, UnknownVolume, VolumeBusy, VolumeExists,
    check_dataset_id, check_node_uuid, round_size,
)
from pyflock.agent._backends._peer import (
    BadStream, IncompleteCopy, IPeerBackend, PeerDataset, UnknownSnapshot,
)
from pyflock.agent._fs import ROOT_MODE, CommandFailed, read_mountinfo, run_command
from pyflock.common._files import write_atomically

#: The btrfs backend's allocation unit.
ALLOCATION_UNIT = MiB

#: Bytes moved at a time between a stream and ``btrfs send``/``receive``.
CHUNK = MiB

# ioctls on a subvolume's root (linux/btrfs.h): its flags, read-only among them.
_SUBVOL_GETFLAGS = 0x80089419
_SUBVOL_SETFLAGS = 0x4008941A
_SUBVOL_RDONLY = 1 << 1
_FLAGS = struct.Struct("=Q")


#: ``F_SETPIPE_SZ`` (fcntl(2)): a pipe of ``PIPE_SIZE`` bytes rather than 64 KiB takes a
#: hundredth of the wake-ups between ``btrfs send``/``receive`` and the agent, and lets
#: each side go on while the other is busy (the agent decrypting a piece while ``btrfs
#: receive`` writes the last ones): root may exceed /proc/sys/fs/pipe-max-size.
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 8 * MiB


def _widen_pipe(pipe) -> None:
    """Make ``pipe`` hold ``PIPE_SIZE`` bytes, or ``CHUNK``, if the kernel allows it."""
    for size in (PIPE_SIZE, CHUNK):
        try:
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, size)
            return
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for this user: the default still works


def _read_only(path: str) -> bool:
    """Whether the subvolume at ``path`` is read-only."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bool(_FLAGS.unpack(fcntl.ioctl(fd, _SUBVOL_GETFLAGS, bytes(8)))[0]
                    & _SUBVOL_RDONLY)
    finally:
        os.close(fd)


def _set_read_only(path: str, read_only: bool) -> None:
    """Make the subvolume at ``path`` read-only or writable, in place (mounted or not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = _FLAGS.unpack(fcntl.ioctl(fd, _SUBVOL_GETFLAGS, bytes(8)))[0]
        wanted = flags | _SUBVOL_RDONLY if read_only else flags & ~_SUBVOL_RDONLY
        if wanted != flags:
            fcntl.ioctl(fd, _SUBVOL_SETFLAGS, _FLAGS.pack(wanted))
    finally:
        os.close(fd)


def _process_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _writes_to(pid: int, device: int) -> bool:
    """Whether process ``pid`` has a file on ``device`` open for writing, or mapped
    shared and writable; False if it went away meanwhile."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.stat(f"/proc/{pid}/fd/{fd}").st_dev != device:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info
                                 if line.startswith("flags:"))
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return True
            except (OSError, StopIteration):
                continue  # closed meanwhile
        with open(f"/proc/{pid}/maps") as maps:
            shared = [line.split()[0] for line in maps if line.split()[1][1::2] == "ws"]
        for area in shared:
            try:
                if os.stat(f"/proc/{pid}/map_files/{area}").st_dev == device:
                    return True
            except OSError:
                continue
    except OSError:
        return False  # the process exited
    return False


def _read_line(source: BinaryIO, limit: int) -> bytes:
    """The first line of ``source``, newline included, reading no further; at most
    ``limit`` bytes (what is there, without a newline, if the line is longer or cut)."""
    line = bytearray()
    while len(line) < limit:
        byte = source.read(1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            break
    return bytes(line)


def _run_send(argv: list, write) -> None:
    """Run ``btrfs send`` (``argv``) and hand its stream to ``write`` chunk by chunk."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors,
                                   stdin=subprocess.DEVNULL)
        _widen_pipe(process.stdout)
        try:
            while chunk := process.stdout.read(CHUNK):
                write(chunk)
        except BaseException:
            process.kill()  # the stream's reader went away: so does the sender
            raise
        finally:
            process.stdout.close()
            process.wait()
        if process.returncode != 0:
            errors.seek(0)
            raise CommandFailed(argv, process.returncode,
                                errors.read().decode(errors="replace"))


def _snapshot_name() -> str:
    """A new snapshot's name: when it was taken (UTC, for people), then a random part."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


@implementer(IPeerBackend)
class BtrfsBackend:
    """Node ``node_uuid``'s dataset copies, in the mounted ``pool``. Thread-safe."""

    def __init__(self, pool: BtrfsPool, node_uuid: str, default_size: int = 10 * GiB):
        self.pool = pool
        self.root = pool.mount_path
        self.node_uuid = check_node_uuid(node_uuid)
        self.default_size = round_size(default_size, ALLOCATION_UNIT)
        # Held while the pool's layout changes, never while data streams.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, pool: BtrfsPool, node_uuid: str, default_size: int = 10 * GiB
             ) -> "BtrfsBackend":
        """The backend over ``pool``, mounted (formatted if blank), staging emptied."""
        pool.open()
        backend = cls(pool, node_uuid, default_size)
        for name in os.listdir(backend._path(STAGING)):
            backend._discard(backend._path(STAGING, name))
        return backend

    def __repr__(self) -> str:
        return f"BtrfsBackend({self.pool!r}, {self.node_uuid!r})"

    # -- reading --------------------------------------------------------------------------

    def allocation_unit(self) -> int:
        """The granularity of sizes, in bytes."""
        return ALLOCATION_UNIT

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _parent(self, dataset_id: str, base: Optional[str]) -> list:
        """The ``btrfs send`` arguments naming snapshot ``base`` as parent (None: none)."""
        return [] if base is None else ["-p", self._path(snapshot_path(dataset_id, base))]

    def _btrfs(self, *argv: str, dataset_id: Optional[str] = None) -> str:
        """Run ``btrfs argv...``; ``PoolFull`` for ``dataset_id`` if the pool is full."""
        try:
            return run_command(["btrfs", *argv])
        except CommandFailed as e:
            if NO_SPACE in e.stderr and dataset_id is not None:
                raise self._pool_full(dataset_id) from None
            raise

    def _subvolumes(self) -> dict[str, DatasetSubvolumes]:
        listing = self._btrfs("subvolume", "list", "-q", "-R", "-u", self.root)
        return group_subvolumes(parse_subvolume_list(listing))

    def _size(self, dataset_id: str) -> int:
        with open(self._path(dataset_folder(dataset_id), SIZE_FILE), "rb") as f:
            return int(f.read())

    def _record(self, found: DatasetSubvolumes) -> PeerDataset:
        live = self._path(live_path(found.dataset_id)) if found.live else None
        return PeerDataset(
            dataset_id=found.dataset_id, size=self._size(found.dataset_id), path=live,
            snapshots=tuple(snapshot_name(s) for s in found.snapshots),
            frozen=live is not None and _read_only(live))

    def _found(self, dataset_id: str) -> DatasetSubvolumes:
        found = self._subvolumes().get(check_dataset_id(dataset_id))
        if found is None or found.empty:
            raise UnknownVolume(dataset_id)
        return found

    def list_datasets(self) -> list:
        """Every copy here, sorted by dataset id."""
        return [self._record(found) for found in self._subvolumes().values()
                if not found.empty]

    def get_dataset(self, dataset_id: str) -> PeerDataset:
        """One copy here."""
        return self._record(self._found(dataset_id))

    def usage(self, dataset_id: str) -> int:
        """Bytes the complete copy's files take (what ``maximum_size`` would limit)."""
        found = self._found(dataset_id)
        if found.live is None:
            raise IncompleteCopy(dataset_id)
        live = self._path(live_path(dataset_id))
        # du counts extents: data still in the page cache has none yet.
        self._btrfs("filesystem", "sync", live)
        return parse_du_total(self._btrfs("filesystem", "du", "-s", "--raw", live))

    def _pool_full(self, dataset_id: str) -> PoolFull:
        """The ``PoolFull`` error for ``dataset_id``, naming what holds the space."""
        holders = []
        for found in self._subvolumes().values():
            try:
                used = parse_du_total(self._btrfs(
                    "filesystem", "du", "-s", "--raw",
                    self._path(dataset_folder(found.dataset_id))))
            except (CommandFailed, ValueError):
                continue  # the error is about the pool; one unreadable dataset is no matter
            holders.append(Holder(found.dataset_id, used))
        return PoolFull(dataset_id, self.pool.pool_path, largest_first(holders))

    # -- creating, completing, destroying -------------------------------------------------

    def _write_size(self, dataset_id: str, size: int) -> None:
        folder = self._path(dataset_folder(dataset_id))
        os.makedirs(self._path(folder, SNAPSHOTS), mode=0o700, exist_ok=True)
        write_atomically(self._path(folder, SIZE_FILE), str(size).encode())

    def create_dataset(self, dataset_id: str, size: Optional[int] = None) -> PeerDataset:
        """An empty, complete copy of ``size`` bytes rounded up; its root writable by all."""
        check_dataset_id(dataset_id)
        size = round_size(self.default_size if size is None else size, ALLOCATION_UNIT)
        with self._lock:
            found = self._subvolumes().get(dataset_id)
            if found is not None and not found.empty:
                raise VolumeExists(dataset_id)
            self._write_size(dataset_id, size)
            live = self._path(live_path(dataset_id))
            self._btrfs("subvolume", "create", live, dataset_id=dataset_id)
            os.chmod(live, ROOT_MODE)
            return self.get_dataset(dataset_id)

    def complete_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the writable dataset a writable snapshot of the latest received snapshot
        (which stays read-only and untouched, a base for later streams)."""
        with self._lock:
            found = self._found(dataset_id)
            if found.live is None:
                latest = snapshot_name(found.snapshots[-1])
                self._btrfs("subvolume", "snapshot",
                            self._path(snapshot_path(dataset_id, latest)),
                            self._path(live_path(dataset_id)), dataset_id=dataset_id)
            return self.get_dataset(dataset_id)

    def destroy_dataset(self, dataset_id: str) -> None:
        """Delete this node's copy: its live subvolume and its snapshots."""
        with self._lock:
            found = self._found(dataset_id)
            doomed = [s.path for s in found.snapshots]
            if found.live is not None:
                doomed.append(found.live.path)
            self._btrfs("subvolume", "delete", *(self._path(p) for p in doomed))
            shutil.rmtree(self._path(dataset_folder(dataset_id)))

    # -- a move's phase 2 and its end -----------------------------------------------------

    def _live(self, dataset_id: str) -> str:
        if self._found(dataset_id).live is None:
            raise IncompleteCopy(dataset_id)
        return self._path(live_path(dataset_id))

    def freeze_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the complete copy read-only in place, mounted or not; idempotent."""
        with self._lock:
            _set_read_only(self._live(dataset_id), True)
            return self.get_dataset(dataset_id)

    def thaw_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the complete copy writable again (a cancelled move); idempotent."""
        with self._lock:
            _set_read_only(self._live(dataset_id), False)
            return self.get_dataset(dataset_id)

    def writers(self, dataset_id: str) -> tuple[int, ...]:
        """
        The processes (in any mount namespace) holding a file of the complete copy open
        for writing, or mapped shared and writable: a freeze does not stop them (btrfs
        checks read-only when a file is opened), so a move waits for this to be empty.
        """
        device = os.stat(self._live(dataset_id)).st_dev  # each subvolume has its own
        return tuple(pid for pid in _process_ids() if _writes_to(pid, device))

    def demote_dataset(self, dataset_id: str) -> PeerDataset:
        """Delete the (unmounted) live subvolume, keeping the snapshots; idempotent."""
        with self._lock:
            found = self._found(dataset_id)
            if found.live is None:
                return self._record(found)
            if not found.snapshots:
                raise InvalidVolumeRequest(
                    f"the copy of dataset {dataset_id} here has no snapshot: demoting it "
                    f"would lose it; export it first")
            inner = "/" + live_path(dataset_id)
            mounted = tuple(m.mount_point for m in read_mountinfo()
                            if m.fstype == "btrfs" and m.root == inner
                            and self.pool.is_pool_device(m.source))
            if mounted:
                raise VolumeBusy(dataset_id, mounted)
            self._btrfs("subvolume", "delete", self._path(live_path(dataset_id)))
            return self.get_dataset(dataset_id)

    def prune_snapshots(self, dataset_id: str, keep: Iterable[str]) -> PeerDataset:
        """Delete every snapshot whose name is not in ``keep``."""
        keep = set(keep)
        with self._lock:
            found = self._found(dataset_id)
            doomed = [snapshot_name(s) for s in found.snapshots if snapshot_name(s) not in keep]
            if doomed:
                self._btrfs("subvolume", "delete",
                            *(self._path(snapshot_path(dataset_id, n)) for n in doomed))
                for name in doomed:
                    os.rmdir(self._path(snapshot_folder(dataset_id, name)))
            return self.get_dataset(dataset_id)

    # -- streams --------------------------------------------------------------------------

    def export_dataset(self, dataset_id: str, into: BinaryIO,
                       base: Optional[str] = None) -> str:
        """Snapshot the complete copy and write the stream from ``base`` (None: whole)."""
        with self._lock:
            found = self._found(dataset_id)
            if found.live is None:
                raise IncompleteCopy(dataset_id)
            parent = None
            if base is not None:
                parent = found.snapshot(base)
                if parent is None:
                    raise UnknownSnapshot(dataset_id, base)
            name = _snapshot_name()
            os.mkdir(self._path(snapshot_folder(dataset_id, name)), 0o700)
            self._btrfs("subvolume", "snapshot", "-r", self._path(live_path(dataset_id)),
                        self._path(snapshot_path(dataset_id, name)), dataset_id=dataset_id)
            taken = self._found(dataset_id).snapshot(name)
            header = StreamHeader(dataset_id=dataset_id, size=self._size(dataset_id),
                                  snapshot=name, uuid=taken.sent_uuid, base=base,
                                  base_uuid=parent.sent_uuid if parent else None)
        into.write(header.encode())
        _run_send(["btrfs", "send", "-q", *self._parent(dataset_id, base),
                   self._path(snapshot_path(dataset_id, name))], into.write)
        return name

    def estimate_export(self, dataset_id: str, base: Optional[str] = None) -> int:
        """The bytes ``export_dataset`` would write now from ``base`` (but its header), from
        a ``btrfs send --no-data`` of the frozen copy or of a read-only snapshot in staging."""
        with self._lock:
            found = self._found(dataset_id)
            if found.live is None:
                raise IncompleteCopy(dataset_id)
            if base is not None and found.snapshot(base) is None:
                raise UnknownSnapshot(dataset_id, base)
            live = source = self._path(live_path(dataset_id))
            scratch = None if _read_only(live) else tempfile.mkdtemp(
                prefix="estimate-", dir=self._path(STAGING))  # open() deletes one left
            if scratch is not None:
                source = os.path.join(scratch, _snapshot_name())  # as long as the real one
                self._btrfs("subvolume", "snapshot", "-r", live, source, dataset_id=dataset_id)
        try:
            estimate = StreamSizeEstimate()
            _run_send(["btrfs", "send", "-q", "--no-data", *self._parent(dataset_id, base),
                       source], estimate.feed)
            return estimate.size()
        finally:
            if scratch is not None:
                self._discard(scratch)

    def import_dataset(self, dataset_id: str, source: BinaryIO) -> PeerDataset:
        """Receive a stream into staging, check it, and add its snapshot to the copy."""
        check_dataset_id(dataset_id)
        header = decode_header(_read_line(source, MAX_HEADER), dataset_id)
        with self._lock:
            self._check_import(header)
        staging = tempfile.mkdtemp(prefix="receive-", dir=self._path(STAGING))
        try:
            self._receive(header, source, staging)
            with self._lock:
                self._check_import(header)
                if header.base is None:
                    self._write_size(dataset_id, header.size)
                os.rename(staging, self._path(snapshot_folder(dataset_id, header.snapshot)))
                return self.get_dataset(dataset_id)
        except BaseException:
            self._discard(staging)
            raise

    def _check_import(self, header: StreamHeader) -> None:
        """Refuse a stream this copy cannot take, as ``IPeerBackend.import_dataset`` says."""
        found = self._subvolumes().get(header.dataset_id)
        exists = found is not None and not found.empty
        if header.base is None:
            if exists:
                raise VolumeExists(header.dataset_id)
            return
        if not exists:
            raise UnknownVolume(header.dataset_id)
        if found.live is not None:
            raise VolumeExists(header.dataset_id)
        latest = found.snapshots[-1] if found.snapshots else None
        if latest is None or snapshot_name(latest) != header.base or \
                header.base_uuid not in (latest.uuid, latest.received_uuid):
            raise UnknownSnapshot(header.dataset_id, header.base)

    def _receive(self, header: StreamHeader, source: BinaryIO, staging: str) -> None:
        """Feed the checked stream to ``btrfs receive -e -C staging`` and check its result."""
        argv = ["btrfs", "receive", "-q", "-e", "-C", staging]
        checker = SendStreamChecker(header)
        with tempfile.TemporaryFile() as errors, Writeback(self.root) as writeback:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=errors)
            _widen_pipe(process.stdin)
            try:
                while chunk := source.read(CHUNK):
                    checker.feed(chunk)
                    process.stdin.write(chunk)
                    writeback.fed(len(chunk))
                checker.finish()
                process.stdin.close()
            except BrokenPipeError:
                pass  # receive stopped early: its exit code and errors say why
            except BaseException:
                process.kill()
                raise
            finally:
                process.wait()
            if process.returncode != 0:
                errors.seek(0)
                said = errors.read().decode(errors="replace")
                if NO_SPACE in said:
                    raise self._pool_full(header.dataset_id)
                raise BadStream(f"btrfs receive refused the stream for dataset "
                                f"{header.dataset_id}: {said.strip()}")
        self._check_received(header, staging)

    def _check_received(self, header: StreamHeader, staging: str) -> None:
        """``BadStream`` unless exactly the announced read-only subvolume is in ``staging``."""
        relative = os.path.relpath(staging, self.root)
        inside = [s for s in parse_subvolume_list(self._btrfs(
            "subvolume", "list", "-q", "-R", "-u", self.root))
            if s.path.startswith(relative + "/")]
        expected = f"{relative}/{header.snapshot}"
        if (os.listdir(staging) != [header.snapshot] or len(inside) != 1
                or inside[0].path != expected or inside[0].received_uuid != header.uuid
                or not _read_only(self._path(expected))):
            raise BadStream(f"the stream for dataset {header.dataset_id} did not make "
                            f"exactly the read-only snapshot {header.snapshot} it announced")

    def _discard(self, staging: str) -> None:
        """Delete a staging folder and every subvolume a receive made in it."""
        relative = os.path.relpath(staging, self.root)
        inside = [s.path for s in parse_subvolume_list(self._btrfs(
            "subvolume", "list", "-q", "-R", "-u", self.root))
            if s.path.startswith(relative + "/")]
        # Deepest first: a crafted stream may nest subvolumes.
        for path in sorted(inside, key=lambda p: -p.count("/")):
            self._btrfs("subvolume", "delete", self._path(path))
        try:
            shutil.rmtree(staging)
        except FileNotFoundError:
            pass

    def release(self) -> list[str]:
        """Unmount the pool and detach its loop device; what could not be released."""
        return self.pool.release()
