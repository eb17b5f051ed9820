"""
The loopback backend: sparse files attached as loop devices, with one folder shared by all
agents on a host playing the cloud block store.

Layout of the root (see docs/backends.md)::

    <root>/lock                          flock'd around every operation
    <root>/volumes/<dataset_id>.img      one sparse file per volume; its size is the volume's
    <root>/attachments/<dataset_id>.json {"version": 1, "dataset_id", "node_uuid", "device"}
    <root>/spares/<size>-<random>.img    spare files holding a finished, empty ext4
                                         (``pyflock.agent._backends._spares``)

The kernel is the truth about attachments: a volume is attached while a loop device is
backed by its file (loop devices are host-wide, seen alike from every mount namespace). The
record only says which node owns that device. It is written *before* ``losetup`` and removed
only once the device is really gone, so a crash never leaves an unowned device; a record
whose device is gone (a host reboot, a busy detach that finished by itself) is stale and the
volume counts as unattached.

Reading is cheap because discovery reads often: ``list_volumes`` reads each file's size,
each record and each loop device's ``backing_file`` once (sysfs, no device opened); the
calls about one volume (``get_volume``, ``get_device_path``, attach, detach, destroy) read
only that volume's file and record, and the loop devices only when the record does not
name a live device of the file.

A new volume of the default size is a spare file renamed into place when one is there
(``make_spares`` keeps ``spares`` of them, off the request path), so that it needs no
mkfs; otherwise it is a blank sparse file. Spares are files only: no loop device is ever
attached to one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from typing import Iterator, Optional
from stat import S_ISDIR, S_ISLNK, S_ISREG

import attr
from zope.interface import implementer

from pyflock.agent._backends._interface import (
    GiB, MiB, AlreadyAttached, BackendError, BlockVolume, IBlockDeviceBackend,
    InvalidVolumeRequest,
    UnattachedVolume, UnknownVolume, VolumeBusy, VolumeExists, check_dataset_id,
    check_node_uuid, is_valid_dataset_id, round_size,
)
from pyflock.agent._backends._spares import DEFAULT_SPARES, SpareFiles
from pyflock.common._files import fsync_path, replace_atomically, write_atomically
from pyflock.common._gates import gate

#: The loopback backend's allocation unit.
ALLOCATION_UNIT = MiB

#: Version of the attachment record format.
RECORD_VERSION = 1

_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
#: ``lo_flags``: the device does direct I/O on its file.
_LO_FLAGS_DIRECT_IO = 16
#: ``struct loop_info64``: device, inode, rdevice, offset, sizelimit, number, encrypt
#: type, encrypt key size, flags, file name, crypt name, encrypt key, init[2].
_LOOP_INFO64 = "5Q4I64s64s32s2Q"
#: ``struct loop_config``: fd, block size, ``loop_info64``, reserved[8].
_LOOP_CONFIG = struct.Struct("=2I" + _LOOP_INFO64 + "8Q")
_LOOP_STATUS = struct.Struct("=" + _LOOP_INFO64)
#: Free devices tried before giving up: another process may bind the free device the
#: kernel named before this one does.
_ATTACH_TRIES = 20
_DELETED = " (deleted)"
_SYS_BLOCK = "/sys/block"
_READ_SIZE = 65536


@attr.s(frozen=True, auto_attribs=True)
class LoopDevice:
    """
    A loop device backed by a file under the root: its path, the backing file's path,
    whether that file has been deleted, and whether autoclear is set (a detach was asked
    while the device was in use, so it goes away when its last user lets go).
    """

    device: str
    backing_file: str
    deleted: bool
    autoclear: bool


@attr.s(frozen=True, auto_attribs=True)
class AttachmentRecord:
    """Which node owns the loop device of a volume, and the device it was given (if yet)."""

    dataset_id: str
    node_uuid: str
    device: Optional[str]


@attr.s(frozen=True, auto_attribs=True)
class LoopbackSnapshot:
    """
    Everything the loopback backend can see, read at one moment under the lock, with no
    interpretation: ``volumes`` maps dataset ids to file sizes; ``records`` maps dataset ids
    to readable attachment records; ``devices`` lists the loop devices backed by files in
    the root's ``volumes`` folder (deleted files included); ``volume_files`` maps dataset
    ids to their image paths; ``unreadable_records`` and ``temporary_files`` are paths of
    records that do not parse and of files left by an interrupted write.
    """

    volumes: dict
    records: dict
    devices: tuple
    volume_files: dict
    unreadable_records: tuple = ()
    temporary_files: tuple = ()

    def devices_of(self, dataset_id: str) -> tuple[LoopDevice, ...]:
        """The live (not deleted) loop devices backed by ``dataset_id``'s file."""
        path = self.volume_files.get(dataset_id)
        return tuple(d for d in self.devices if not d.deleted and d.backing_file == path)


@attr.s(frozen=True, auto_attribs=True)
class Leftovers:
    """
    What needs repair, from one node's point of view (``find_leftovers``):

    - ``stale_records``: dataset ids recorded as held by this node whose device is gone
      (after a reboot, or a busy detach that finished by itself). They count as unattached;
      ``attach_volume`` re-attaches them, ``detach_volume`` tidies the record away.
    - ``pending_detaches``: this node's devices whose detach was refused as busy; they go
      away when the last container lets go of them.
    - ``orphan_records``: this node's records whose volume file is gone; harmless,
      ``create_volume`` of that id replaces them.
    - ``unrecorded_devices``: loop devices on our volume files that no record explains, made
      outside pyflock (any node's concern, so no agent repairs them): an operator detaches
      them with ``losetup -d`` or ``detach_volume`` once nothing uses them.
    - ``deleted_file_devices``: loop devices still backed by a deleted volume file, ditto.
    - ``unreadable_records`` and ``temporary_files``: paths to look at and remove by hand.
    """

    stale_records: tuple = ()
    pending_detaches: tuple = ()
    orphan_records: tuple = ()
    unrecorded_devices: tuple = ()
    deleted_file_devices: tuple = ()
    unreadable_records: tuple = ()
    temporary_files: tuple = ()


def volumes_from_snapshot(snapshot: LoopbackSnapshot) -> list[BlockVolume]:
    """The volumes a snapshot shows, sorted by dataset id (pure)."""
    by_file = _live_devices_by_file(snapshot)
    return [_block_volume(dataset_id, size, snapshot.records.get(dataset_id),
                          tuple(d.device for d in by_file.get(
                              snapshot.volume_files.get(dataset_id), ())))
            for dataset_id, size in sorted(snapshot.volumes.items())]


def _live_devices_by_file(snapshot: LoopbackSnapshot) -> dict[str, list[LoopDevice]]:
    # ``devices_of`` for every volume at once, in one pass over the devices.
    by_file: dict[str, list[LoopDevice]] = {}
    for device in snapshot.devices:
        if not device.deleted:
            by_file.setdefault(device.backing_file, []).append(device)
    return by_file


def _block_volume(dataset_id: str, size: int, record: Optional[AttachmentRecord],
                  devices: tuple[str, ...]) -> BlockVolume:
    """The volume with these devices on its file; the recorded one is named if live."""
    if not devices:
        return BlockVolume(dataset_id=dataset_id, size=size)
    if record is None:
        return BlockVolume(dataset_id=dataset_id, size=size, device_path=devices[0])
    return BlockVolume(dataset_id=dataset_id, size=size, attached_to=record.node_uuid,
                       device_path=record.device if record.device in devices
                       else devices[0])


def find_leftovers(snapshot: LoopbackSnapshot, node_uuid: str) -> Leftovers:
    """Classify a snapshot's anomalies as seen by ``node_uuid`` (pure; see ``Leftovers``)."""
    mine = {i: r for i, r in snapshot.records.items() if r.node_uuid == node_uuid}
    by_file = _live_devices_by_file(snapshot)
    stale, pending = [], []
    for dataset_id in sorted(mine):
        if dataset_id not in snapshot.volumes:
            continue
        devices = by_file.get(snapshot.volume_files.get(dataset_id), ())
        if not devices:
            stale.append(dataset_id)
        pending.extend(d for d in devices if d.autoclear)
    recorded_files = {snapshot.volume_files[i] for i in snapshot.records
                      if i in snapshot.volume_files}
    return Leftovers(
        stale_records=tuple(stale),
        pending_detaches=tuple(pending),
        orphan_records=tuple(sorted(i for i in mine if i not in snapshot.volumes)),
        unrecorded_devices=tuple(d for d in snapshot.devices
                                 if not d.deleted and d.backing_file not in recorded_files),
        deleted_file_devices=tuple(d for d in snapshot.devices if d.deleted),
        unreadable_records=snapshot.unreadable_records,
        temporary_files=snapshot.temporary_files,
    )


class UnsafeRoot(BackendError):
    """Something in the backend's root is a symbolic link (or not what it should be):
    refused, since root would otherwise write or attach whatever it points to."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is {what}; the loopback root must hold only the "
                         f"folders and regular files pyflock made there (no symbolic "
                         f"links): remove it")
        self.path = path


def _check_kind(path: str, folder: bool = False) -> os.stat_result:
    """``lstat(path)`` if ``path`` is a regular file (a folder, with ``folder``), else
    ``UnsafeRoot``; symbolic links are never followed."""
    result = os.lstat(path)
    if S_ISLNK(result.st_mode):
        raise UnsafeRoot(path, "a symbolic link")
    if not (S_ISDIR if folder else S_ISREG)(result.st_mode):
        raise UnsafeRoot(path, "not a folder" if folder else "not a regular file")
    return result


def _folder(path: str) -> None:
    """Make the folder ``path`` (mode 0700) if missing; ``UnsafeRoot`` if it is a
    symbolic link or no folder."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_kind(path, folder=True)


def _read(path: str) -> bytes:
    # Plain descriptors, not open(): each discovery reads a few hundred small files.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        data = os.read(fd, _READ_SIZE)
        # A sysfs attribute comes whole in one read, and a short read of a regular file
        # is its end: only a full buffer needs another read.
        chunks = [data]
        while len(data) == _READ_SIZE:
            data = os.read(fd, _READ_SIZE)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _sysfs_backing_file(name: str) -> Optional[str]:
    """What ``/sys/block/<name>`` is backed by, " (deleted)" and all; None if unbound."""
    try:
        data = _read(f"{_SYS_BLOCK}/{name}/loop/backing_file")
    except FileNotFoundError:
        return None
    return os.fsdecode(data.rstrip(b"\n"))


def _scan(under: Optional[str], autoclear: bool) -> list[LoopDevice]:
    devices = []
    for name in sorted(os.listdir(_SYS_BLOCK)):
        if not name.startswith("loop"):
            continue
        # Only a bound device has loop/backing_file: one read tells bound and backing.
        backing = _sysfs_backing_file(name)
        if backing is None:
            continue
        deleted = backing.endswith(_DELETED)
        if deleted:
            backing = backing[:-len(_DELETED)]
        if under is not None and not backing.startswith(under):
            continue
        flag = False
        if autoclear:
            try:
                flag = _read(f"{_SYS_BLOCK}/{name}/loop/autoclear").strip() == b"1"
            except FileNotFoundError:
                continue  # detached while we looked
        devices.append(LoopDevice(device=f"/dev/{name}", backing_file=backing,
                                  deleted=deleted, autoclear=flag))
    return devices


def scan_loop_devices(under: Optional[str] = None) -> list[LoopDevice]:
    """
    Every bound loop device on this host, or only those backed by a file whose path
    starts with ``under``; read from sysfs without opening any device.
    """
    return _scan(under, autoclear=True)


def _backing_file(device: str) -> Optional[str]:
    return _sysfs_backing_file(os.path.basename(device))


class LoopAttachFailed(Exception):
    """The kernel would not bind a loop device to a volume file; says which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot attach {self.path} to a loop device: {self.reason}"


def attach_loop_device(path: str, direct_io: bool = False) -> str:
    """
    Bind a free loop device to the file ``path`` (read-write, as ``losetup -f`` does) and
    return the device's path, with ioctls rather than a ``losetup`` process: the free
    device from ``/dev/loop-control``, bound with ``LOOP_CONFIGURE`` (``LOOP_SET_FD`` on
    kernels before 5.8). A device someone else bound first is passed over for the next
    free one. ``LoopAttachFailed`` if none can be bound. ``direct_io``: the device reads and
    writes the file with direct I/O (``LO_FLAGS_DIRECT_IO``, as ``losetup --direct-io``),
    so its data is not cached twice (once above the device, once for the file) and its
    writeback is one step; where the file's filesystem cannot, the device is bound without.
    """
    name = os.fsencode(path)[:63]
    try:
        file_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise LoopAttachFailed(path, e.strerror or str(e)) from None
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTACH_TRIES):
                device = f"/dev/loop{fcntl.ioctl(control, _LOOP_CTL_GET_FREE)}"
                try:
                    gate("loop-attach")  # tests kill the agent here: nothing bound yet
                    if _bind(device, file_fd, name, direct_io):
                        gate("loop-attached")  # or here: bound, not yet recorded
                        return device
                except FileNotFoundError:
                    continue  # the device node is not there yet: ask for another
        finally:
            os.close(control)
    except OSError as e:
        raise LoopAttachFailed(path, e.strerror or str(e)) from None
    finally:
        os.close(file_fd)
    raise LoopAttachFailed(path, f"every free loop device was taken by someone else "
                                 f"first, {_ATTACH_TRIES} times in a row")


def _bind(device: str, file_fd: int, name: bytes, direct_io: bool = False) -> bool:
    """Bind ``device`` to ``file_fd``; False if another process bound it first."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        info = (0,) * 9 + (name, b"", b"", 0, 0)
        for flags in ((_LO_FLAGS_DIRECT_IO, 0) if direct_io else (0,)):
            configured = info[:8] + (flags,) + info[9:]
            try:
                fcntl.ioctl(fd, _LOOP_CONFIGURE,
                            _LOOP_CONFIG.pack(file_fd, 0, *configured, *(0,) * 8))
                return True
            except OSError as e:
                if e.errno == errno.EBUSY:
                    return False
                if e.errno not in (errno.EINVAL, errno.ENOTTY):
                    raise
                # EINVAL with direct I/O: the file's filesystem cannot; try without.
        # A kernel without LOOP_CONFIGURE: bind, then name the file.
        try:
            fcntl.ioctl(fd, _LOOP_SET_FD, file_fd)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise
        fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_STATUS.pack(*info))
        return True
    finally:
        os.close(fd)


def release_loop_device(device: str, backing_file: str) -> None:
    """
    Ask the kernel to detach ``device`` if (and only if) it is still backed by
    ``backing_file``. The device is opened first and checked while open, so a device that
    went away and was reused by someone else meanwhile is never touched. If others still
    hold it, the kernel only marks it to go away when they let go.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        # While our descriptor is open the binding cannot change, so this check holds.
        if _backing_file(device) != backing_file:
            return
        try:
            fcntl.ioctl(fd, _LOOP_CLR_FD)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
    finally:
        # If we were the last user, closing is what actually detaches it.
        os.close(fd)


@implementer(IBlockDeviceBackend)
class LoopbackBackend:
    """
    The loopback backend for node ``node_uuid`` over the shared folder ``root_path``.
    Several objects (one per agent, or one per simulated node in a process) may share a
    root; an exclusive ``flock`` on ``<root>/lock`` serialises their changes.
    ``make_spares`` keeps ``spares`` pre-formatted files of ``default_size`` in the root.
    """

    def __init__(self, root_path: str, node_uuid: str, default_size: int = 10 * GiB,
                 spares: int = DEFAULT_SPARES):
        self.root_path = os.path.realpath(root_path)
        self.node_uuid = check_node_uuid(node_uuid)
        self.default_size = round_size(default_size, ALLOCATION_UNIT)
        self.spares = spares
        self._volumes_path = os.path.join(self.root_path, "volumes")
        self._records_path = os.path.join(self.root_path, "attachments")
        self._spares = SpareFiles(os.path.join(self.root_path, "spares"))

    def __repr__(self) -> str:
        return f"<LoopbackBackend {self.root_path} node={self.node_uuid}>"

    def allocation_unit(self) -> int:
        """The granularity of volume sizes: 1 MiB."""
        return ALLOCATION_UNIT

    def list_volumes(self) -> list[BlockVolume]:
        """Every volume in the shared root, sorted by dataset id."""
        with self._locked(exclusive=False):
            # Autoclear flags say nothing about who holds a volume: not read.
            return volumes_from_snapshot(self._snapshot(autoclear=False))

    def get_volume(self, dataset_id: str) -> BlockVolume:
        """
        One volume, as ``list_volumes`` would list it, reading only that volume's file
        and record (and the loop devices, unless the record names a live device of the
        file). Raises ``UnknownVolume``.
        """
        check_dataset_id(dataset_id)
        with self._locked(exclusive=False):
            return self._volume(dataset_id)

    def create_volume(self, dataset_id: str, size: Optional[int] = None,
                      profile: Optional[str] = None) -> BlockVolume:
        """
        Create a volume file of ``size`` bytes (rounded up to 1 MiB): a spare of that size
        if there is one (it already holds a finished, empty ext4), else a blank sparse file.
        Files have no storage profiles: ``profile`` is ignored.
        """
        check_dataset_id(dataset_id)
        size = round_size(self.default_size if size is None else size, ALLOCATION_UNIT)
        with self._locked(exclusive=True):
            path = self._volume_file(dataset_id)
            if os.path.lexists(path):
                raise VolumeExists(dataset_id)
            self._remove_record(dataset_id)
            if self._spares.take(size, path):
                return BlockVolume(dataset_id=dataset_id, size=size)
            temporary = os.path.join(self._volumes_path, f".{dataset_id}.img.tmp")
            try:
                replace_atomically(path, lambda fd: os.ftruncate(fd, size), temporary)
            except (OSError, OverflowError) as e:
                if isinstance(e, OverflowError) or e.errno == errno.EFBIG:
                    raise InvalidVolumeRequest(
                        f"volume size {size} is too large for the filesystem holding "
                        f"{self.root_path}") from None
                raise
        return BlockVolume(dataset_id=dataset_id, size=size)

    def make_spares(self) -> int:
        """
        Make spare files of the default size until there are ``spares`` (blocking: mkfs
        and debugfs on each file, none attached); how many it made. Off the request path:
        the agent calls it in its bulk pool once its loop has settled.
        """
        return self._spares.top_up(self.default_size, self.spares)

    def attach_volume(self, dataset_id: str, node_uuid: str) -> BlockVolume:
        """Attach the volume's file to a new loop device owned by ``node_uuid``."""
        check_dataset_id(dataset_id)
        check_node_uuid(node_uuid)
        with self._locked(exclusive=True):
            volume = self._volume(dataset_id)
            if volume.device_path is not None:
                raise AlreadyAttached(dataset_id, volume.attached_to, volume.device_path)
            # Recorded before the device is bound, so a crash in between never leaves a device no
            # record explains; without a device the record is merely stale.
            self._write_record(AttachmentRecord(dataset_id, node_uuid, None))
            try:
                device = attach_loop_device(self._volume_file(dataset_id))
            except LoopAttachFailed:
                self._remove_record(dataset_id)
                raise
            self._write_record(AttachmentRecord(dataset_id, node_uuid, device))
            return BlockVolume(dataset_id=dataset_id, size=volume.size,
                               attached_to=node_uuid, device_path=device)

    def detach_volume(self, dataset_id: str, discard: bool = False) -> None:
        """
        Detach the volume's loop device(s) and drop the record once they are really gone;
        ``VolumeBusy`` (record kept) if a device stays because something still holds it.
        Devices no record explains are released too: the caller asked for this volume.
        The file is then synced, unless ``discard`` (it is deleted next: writing its
        unwritten data first would be work thrown away).
        """
        check_dataset_id(dataset_id)
        with self._locked(exclusive=True):
            path = self._volume_file(dataset_id)
            if not os.path.lexists(path):
                raise UnknownVolume(dataset_id)
            _check_kind(path)
            devices = _live_devices_of(path)
            if not devices:
                if _read_record(self._record_file(dataset_id), dataset_id) is None:
                    raise UnattachedVolume(dataset_id)
                self._remove_record(dataset_id)
                return
            for device in devices:
                release_loop_device(device, path)
            # Every device on the file, not only those released: all must be gone.
            remaining = _live_devices_of(path)
            if remaining:
                raise VolumeBusy(dataset_id, remaining)
            # The data went through the loop device into the file's page cache; make it
            # durable before another node may take the volume.
            if not discard:
                fsync_path(path)
            self._remove_record(dataset_id)

    def destroy_volume(self, dataset_id: str) -> None:
        """Delete an unattached volume's file and any stale record of it."""
        check_dataset_id(dataset_id)
        with self._locked(exclusive=True):
            volume = self._volume(dataset_id)
            if volume.device_path is not None:
                raise AlreadyAttached(dataset_id, volume.attached_to, volume.device_path)
            # Record first: a crash in between leaves an ordinary unattached volume.
            self._remove_record(dataset_id)
            os.unlink(self._volume_file(dataset_id))
            fsync_path(self._volumes_path, directory=True)

    def get_device_path(self, dataset_id: str) -> str:
        """The loop device of a volume attached to this node."""
        volume = self.get_volume(dataset_id)
        if volume.device_path is None or volume.attached_to != self.node_uuid:
            raise UnattachedVolume(dataset_id)
        return volume.device_path

    def snapshot(self) -> LoopbackSnapshot:
        """Read the root and the host's loop devices at one moment (``LoopbackSnapshot``)."""
        with self._locked(exclusive=False):
            return self._snapshot()

    def leftovers(self) -> Leftovers:
        """What needs repair, from this node's point of view (see ``Leftovers``)."""
        return find_leftovers(self.snapshot(), self.node_uuid)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        os.makedirs(self.root_path, mode=0o700, exist_ok=True)
        for folder in (self._volumes_path, self._records_path, self._spares.path):
            _folder(folder)
        lock = os.path.join(self.root_path, "lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeRoot(lock, "a symbolic link") from None
            raise
        try:
            # flock, not lockf: it excludes other open files in the same process too, so
            # two backend objects (or threads) in one process exclude each other.
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _volume(self, dataset_id: str) -> BlockVolume:
        path = self._volume_file(dataset_id)
        try:
            size = _check_kind(path).st_size
        except FileNotFoundError:
            raise UnknownVolume(dataset_id) from None
        record = _read_record(self._record_file(dataset_id), dataset_id)
        device = None if record is None else record.device
        if (device is not None and device == "/dev/" + os.path.basename(device)
                and _backing_file(device) == path):
            # The recorded device is live on the file: all that the full listing would
            # say (it prefers the recorded device), without reading every loop device.
            devices: tuple[str, ...] = (device,)
        else:
            devices = _live_devices_of(path)
        return _block_volume(dataset_id, size, record, devices)

    def _snapshot(self, autoclear: bool = True) -> LoopbackSnapshot:
        # ``autoclear=False`` skips reading the flags (they all read False): for callers
        # that only want who holds what.
        volumes, files, temporary = {}, {}, []
        for name in sorted(os.listdir(self._volumes_path)):
            path = os.path.join(self._volumes_path, name)
            if name.startswith(".") and name.endswith(".tmp"):
                temporary.append(path)
            elif name.endswith(".img") and is_valid_dataset_id(name[:-4]):
                try:
                    status = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not S_ISREG(status.st_mode):
                    continue  # a symbolic link is no volume (attach refuses it too)
                volumes[name[:-4]] = status.st_size
                files[name[:-4]] = path
        records, unreadable = {}, []
        for name in sorted(os.listdir(self._records_path)):
            path = os.path.join(self._records_path, name)
            if name.startswith(".") and name.endswith(".tmp"):
                temporary.append(path)
            elif name.endswith(".json"):
                record = _read_record(path, name[:-5])
                if record is None:
                    unreadable.append(path)
                else:
                    records[record.dataset_id] = record
        prefix = self._volumes_path + "/"
        devices = tuple(_scan(prefix, autoclear))
        return LoopbackSnapshot(volumes=volumes, records=records, devices=devices,
                                volume_files=files, unreadable_records=tuple(unreadable),
                                temporary_files=tuple(temporary))

    def _volume_file(self, dataset_id: str) -> str:
        return os.path.join(self._volumes_path, f"{dataset_id}.img")

    def _record_file(self, dataset_id: str) -> str:
        return os.path.join(self._records_path, f"{dataset_id}.json")

    def _write_record(self, record: AttachmentRecord) -> None:
        temporary = os.path.join(self._records_path, f".{record.dataset_id}.json.tmp")
        data = json.dumps({"version": RECORD_VERSION, "dataset_id": record.dataset_id,
                           "node_uuid": record.node_uuid, "device": record.device})
        # Not fsynced: a record describes a loop device, which a power loss takes away
        # too, so a record lost with it, or left naming a device gone, is what any
        # record becomes after a reboot: stale, and treated as such.
        write_atomically(self._record_file(record.dataset_id),
                         data.encode("utf-8") + b"\n", temporary=temporary, sync=False)

    def _remove_record(self, dataset_id: str) -> None:
        try:
            os.unlink(self._record_file(dataset_id))
        except FileNotFoundError:
            return
        fsync_path(self._records_path, directory=True)


def _live_devices_of(path: str) -> tuple[str, ...]:
    """The loop devices backed by the (not deleted) file ``path``, read from sysfs."""
    return tuple(d.device for d in _scan(path, autoclear=False)
                 if not d.deleted and d.backing_file == path)


def _read_record(path: str, dataset_id: str) -> Optional[AttachmentRecord]:
    try:
        data = json.loads(_read(path))
        if (data.get("version") != RECORD_VERSION or data.get("dataset_id") != dataset_id
                or not isinstance(data.get("node_uuid"), str)
                or not isinstance(data.get("device"), (str, type(None)))):
            return None
        return AttachmentRecord(dataset_id, data["node_uuid"], data["device"])
    except (OSError, ValueError, AttributeError):
        return None
