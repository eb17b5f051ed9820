"""
Running changes: the only part of convergence that touches the world.

``Runner(backend, filesystems, run_blocking, slow=...).run(change)`` runs a change value
from ``pyflock.agent._convergence`` and returns a Deferred. Every leaf is one blocking
function (backend calls, mkfs, mount) handed to a ``RunBlocking``
(``pyflock.common._threads``): the quick steps a move is made of (attach, detach, mount,
unmount) to ``run_blocking``, the bulk ones (``SLOW_CHANGES``: create, mkfs, destroy) to
``slow``. In the agent these are two bounded thread pools, so that a move never waits
behind a burst of creations; in unit tests ``run_now``.

``IFilesystems`` is the node's filesystem IO (probe, mkfs, mount, unmount, the mount
table), with ``LocalFilesystems``, the real one over ``pyflock.agent._fs`` (the tests' fake,
``MemoryFilesystems``, lives in ``tests/harness/memory.py``).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pyflock.agent._backends._interface import (
    BackendError, BlockVolume, UnattachedVolume, UnknownVolume, VolumeExists,
)
from pyflock.agent._convergence import (
    AttachVolume, CreateFilesystem, CreateVolume, DestroyVolume, DetachVolume,
    FinishFilesystem, InParallel, MountFilesystem, RemoveMountPoint, Sequentially,
    UnmountFilesystem,
)
from pyflock.agent._discovery import (
    FilesystemCondition, FilesystemProbe, Mount, filesystem_condition,
)
from pyflock.agent._fs import CommandFailed, FilesystemError, read_mountinfo
from pyflock.agent import _fs
from pyflock.common._logging import log_event
from pyflock.common._threads import RunBlocking, run_now

#: Errors that are part of life (a busy device, a volume another node still holds, the
#: world changing between discovery and a change): logged without a traceback.
EXPECTED_ERRORS = (BackendError, CommandFailed, FilesystemError)


class StaleChange(Exception):
    """
    The world changed between discovery and a change (a device now belongs to another
    volume or node); nothing was done, and the next discovery sees the new world.
    """


class ChangesFailed(Exception):
    """Some changes of a group failed; ``failures`` holds their ``Failure``s."""

    def __init__(self, failures: list):
        super().__init__(failures)
        self.failures = failures

    def __str__(self) -> str:
        return "; ".join(f.getErrorMessage() or f.type.__name__ for f in self.failures)


# ---------------------------------------------------------------------------------------
# Filesystems

class IFilesystems(Interface):
    """
    A node's filesystem IO on its volumes' devices. Every method may block; call them in
    a thread. Paths are absolute; mount state is that of the agent's mount namespace.
    """

    def mounts(root: str) -> list:
        """The mounts (``Mount``) at directories directly under ``root``, top ones only."""

    def device_number(device: str) -> Optional[tuple]:
        """``device``'s (major, minor), or None if unknown."""

    def probe(device: str) -> FilesystemProbe:
        """What filesystem ``device`` holds (``FilesystemProbe``); for unmounted devices."""

    def empty_directories(root: str) -> frozenset:
        """Names of the empty directories directly under ``root`` (none if it is missing)."""

    def make_filesystem(device: str) -> None:
        """Make a ready filesystem on a blank ``device``; refuses one holding a filesystem."""

    def finish_filesystem(device: str) -> None:
        """Prepare the root of a half-made filesystem (no ``lost+found``, mode 0777)."""

    def mount(device: str, path: str) -> None:
        """Mount ``device`` at ``path`` (created); nothing if already; refuses another."""

    def hold(device: str):
        """
        A context manager that keeps ``device`` from being released and handed to another
        volume while it is entered (a loop device cannot be freed while it is open).
        """

    def unmount(path: str) -> None:
        """Unmount what is mounted at ``path`` (never lazily); nothing if nothing is."""

    def remove_mount_point(path: str) -> None:
        """Remove the empty directory ``path``; nothing if missing; refuses if mounted."""


@implementer(IFilesystems)
class LocalFilesystems:
    """This host's filesystems, through ``pyflock.agent._fs`` (needs root)."""

    @contextmanager
    def hold(self, device: str):
        """Keep ``device`` open, so that it cannot be freed and reused, while entered."""
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield
        finally:
            os.close(fd)

    def mounts(self, root: str) -> list:
        """The mounts directly under ``root`` in this process's mount namespace."""
        root = os.path.realpath(root)
        top = {}
        # Later lines are mounted later, so the last one at a path covers the others.
        for info in read_mountinfo(under=root):
            if os.path.dirname(info.mount_point) == root:
                top[info.mount_point] = Mount(mount_point=info.mount_point,
                                              source=info.source,
                                              device_number=(info.major, info.minor))
        return [top[path] for path in sorted(top)]

    def device_number(self, device: str) -> Optional[tuple]:
        """``device``'s (major, minor) from ``stat``, or None if it is gone."""
        try:
            rdev = os.stat(device).st_rdev
        except FileNotFoundError:
            return None
        return (os.major(rdev), os.minor(rdev))

    def probe(self, device: str) -> FilesystemProbe:
        """``blkid -p``, and for ext4 the root directory as ``debugfs`` reads it."""
        fstype, root = _fs.probe_filesystem(device)
        return FilesystemProbe(fstype=fstype, root=root or ())

    def empty_directories(self, root: str) -> frozenset:
        """The empty directories directly under ``root``."""
        try:
            with os.scandir(root) as entries:
                # The entry's type comes with the listing: no stat, and no symlink followed.
                directories = [e for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return frozenset()
        empty = set()
        for entry in directories:
            try:
                if not os.listdir(entry.path):
                    empty.add(entry.name)
            except OSError:
                continue  # removed, or not ours to read, meanwhile
        return frozenset(empty)

    def make_filesystem(self, device: str) -> None:
        """``pyflock.agent._fs.make_filesystem``."""
        _fs.make_filesystem(device)

    def finish_filesystem(self, device: str) -> None:
        """``pyflock.agent._fs.finish_filesystem``, only on a half-made filesystem."""
        if filesystem_condition(self.probe(device)) is not FilesystemCondition.UNFINISHED:
            raise FilesystemError(
                f"{device} does not hold a half-made filesystem; refusing to change it")
        _fs.finish_filesystem(device)

    def mount(self, device: str, path: str) -> None:
        """``pyflock.agent._fs.mount`` (ext4)."""
        _fs.mount(device, path)

    def unmount(self, path: str) -> None:
        """``pyflock.agent._fs.unmount``."""
        _fs.unmount(path)

    def remove_mount_point(self, path: str) -> None:
        """``rmdir``: never recursive, so nothing anyone stored there is lost."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise FilesystemError(f"{path} is still mounted; unmount it first") from None
            if e.errno == errno.ENOTEMPTY:
                raise FilesystemError(
                    f"{path} is not empty; pyflock only removes empty mount points: "
                    f"look at what is there and remove it by hand") from None
            raise


class FolderFilesystems(LocalFilesystems):
    """
    This host's filesystems for a peer-to-peer backend, whose copies are folders (btrfs:
    a dataset's live subvolume in the pool): mounting one bind-mounts it, ``nosuid,nodev``.
    """

    def mount(self, device: str, path: str) -> None:
        """``pyflock.agent._fs.bind_mount`` of the folder ``device``."""
        _fs.bind_mount(device, path)


# ---------------------------------------------------------------------------------------
# Running

#: The changes that may take long (a volume's creation, mkfs, its destruction): they run
#: in their own lane, so that the quick steps of a move never wait behind them.
SLOW_CHANGES = (CreateVolume, CreateFilesystem, FinishFilesystem, DestroyVolume)


class Runner:
    """
    Runs changes on one node: ``backend`` is its ``IBlockDeviceBackend``, ``filesystems``
    its ``IFilesystems``; ``run_blocking`` runs each blocking step, and ``slow`` (default:
    ``run_blocking``) those of ``SLOW_CHANGES``. Each leaf logs
    ``pyflock:agent:change-done`` or ``pyflock:agent:change-failed``; ``on_mounted(dataset
    id, mount point)``, if given, hears of each ``MountFilesystem`` done, before the next
    discovery reports it (the Docker plugin's waiting Mount checks the mount itself).
    """

    def __init__(self, backend, filesystems, run_blocking: RunBlocking,
                 logger: Optional[Logger] = None, slow: Optional[RunBlocking] = None,
                 on_mounted: Optional[Callable[[str, str], None]] = None):
        self.backend = backend
        self._on_mounted = on_mounted
        self.filesystems = filesystems
        self._run_blocking = run_blocking
        self._run_slow = run_blocking if slow is None else slow
        self._log = logger if logger is not None else Logger()
        self._leaves = {
            CreateVolume: self._create_volume,
            AttachVolume: self._attach_volume,
            CreateFilesystem: self._create_filesystem,
            FinishFilesystem: self._finish_filesystem,
            MountFilesystem: self._mount,
            UnmountFilesystem: self._unmount,
            RemoveMountPoint: self._remove_mount_point,
            DetachVolume: self._detach_volume,
            DestroyVolume: self._destroy_volume,
        }

    def run(self, change) -> Deferred:
        """
        Run ``change``; the Deferred fires with None when it is done, or fails (with the
        leaf's error, or ``ChangesFailed`` for a parallel group) when some part failed.
        """
        if isinstance(change, InParallel):
            return self._in_parallel(change.changes)
        if isinstance(change, Sequentially):
            return self._sequentially(change.changes)
        leaf = self._leaves.get(type(change))
        if leaf is None:
            return maybeDeferred(_unknown_change, change)
        lane = self._run_slow if isinstance(change, SLOW_CHANGES) else self._run_blocking
        d = lane(leaf, change)
        d.addCallbacks(self._done, self._failed, callbackArgs=(change,),
                       errbackArgs=(change,))
        return d

    def _in_parallel(self, changes: tuple) -> Deferred:
        d = DeferredList([self.run(c) for c in changes], consumeErrors=True)

        def check(results):
            failures = [result for ok, result in results if not ok]
            if len(failures) == 1:
                return failures[0]
            if failures:
                raise ChangesFailed(failures)
            return None
        return d.addCallback(check)

    def _sequentially(self, changes: tuple) -> Deferred:
        d = Deferred()
        for change in changes:
            d.addCallback(lambda _, change=change: self.run(change))
        d.callback(None)
        return d

    def _done(self, result, change) -> None:
        # ``result``: what the leaf returned (an ``AttachVolume``'s mount point, if it
        # mounted)
        log_event(self._log, "pyflock:agent:change-done", change=type(change).__name__,
                  node_uuid=self.backend.node_uuid, **_leaf_fields(change))
        if self._on_mounted is not None and isinstance(change, MountFilesystem):
            self._on_mounted(change.dataset_id, change.mount_point)
        elif self._on_mounted is not None and isinstance(change, AttachVolume) and result:
            self._on_mounted(change.dataset_id, result)

    def _failed(self, failure: Failure, change) -> Failure:
        fields = dict(change=type(change).__name__, node_uuid=self.backend.node_uuid,
                      error=failure.getErrorMessage(), error_type=failure.type.__name__,
                      **_leaf_fields(change))
        if failure.check(StaleChange, *EXPECTED_ERRORS):
            log_event(self._log, "pyflock:agent:change-failed", LogLevel.warn, **fields)
        else:
            log_failure(self._log, "pyflock:agent:change-failed", failure, **fields)
        return failure

    # Each of these runs in a thread.

    def _device_of(self, dataset_id: str, device: str) -> None:
        try:
            current = self.backend.get_device_path(dataset_id)
        except (UnknownVolume, UnattachedVolume):
            current = None
        if current != device:
            raise StaleChange(f"dataset {dataset_id} is no longer attached here as "
                              f"{device} (now: {current})")

    def _create_volume(self, change: CreateVolume) -> None:
        try:
            self.backend.create_volume(change.dataset_id, change.size, change.profile)
        except VolumeExists:
            pass  # made by an earlier attempt whose answer was lost: what we wanted

    def _attach_volume(self, change: AttachVolume) -> Optional[str]:
        """Attach; with a mount point, mount a ready filesystem there: the mount point if
        it did (``_done`` then tells ``on_mounted``), else None (the next pass acts)."""
        volume = self.backend.attach_volume(change.dataset_id, change.node_uuid)
        if change.mount_point is None or volume.device_path is None:
            return None
        device = volume.device_path
        try:
            with self.filesystems.hold(device):
                self._device_of(change.dataset_id, device)
                probe = self.filesystems.probe(device)
                if filesystem_condition(probe) is not FilesystemCondition.READY:
                    return None
                self.filesystems.mount(device, change.mount_point)
        except (StaleChange, *EXPECTED_ERRORS, OSError) as e:
            # Attached all the same: the next pass sees why and does what is right.
            log_event(self._log, "pyflock:agent:mount-after-attach-skipped", LogLevel.info,
                      dataset_id=change.dataset_id, error=str(e))
            return None
        return change.mount_point

    # Each filesystem change holds the device open, then checks that it still is the
    # dataset's: checked first and opened after, another node could free it in between and
    # it could be handed to another volume.
    def _create_filesystem(self, change: CreateFilesystem) -> None:
        with self.filesystems.hold(change.device):
            self._device_of(change.dataset_id, change.device)
            self.filesystems.make_filesystem(change.device)

    def _finish_filesystem(self, change: FinishFilesystem) -> None:
        with self.filesystems.hold(change.device):
            self._device_of(change.dataset_id, change.device)
            self.filesystems.finish_filesystem(change.device)

    def _mount(self, change: MountFilesystem) -> None:
        with self.filesystems.hold(change.device):
            self._device_of(change.dataset_id, change.device)
            self.filesystems.mount(change.device, change.mount_point)

    def _unmount(self, change: UnmountFilesystem) -> None:
        self.filesystems.unmount(change.mount_point)

    def _remove_mount_point(self, change: RemoveMountPoint) -> None:
        self.filesystems.remove_mount_point(change.mount_point)

    def _volume(self, dataset_id: str) -> Optional[BlockVolume]:
        try:
            return self.backend.get_volume(dataset_id)
        except UnknownVolume:
            return None

    def _detach_volume(self, change: DetachVolume) -> None:
        volume = self._volume(change.dataset_id)
        if volume is None or volume.device_path is None:
            return  # already gone: what we wanted (a stale record is harmless)
        if volume.attached_to != change.node_uuid:
            raise StaleChange(f"dataset {change.dataset_id} is now attached to "
                              f"{volume.attached_to}, not {change.node_uuid}")
        try:
            self.backend.detach_volume(change.dataset_id, discard=change.discard)
        except (UnknownVolume, UnattachedVolume):
            pass  # went away meanwhile: what we wanted

    def _destroy_volume(self, change: DestroyVolume) -> None:
        try:
            self.backend.destroy_volume(change.dataset_id)
        except UnknownVolume:
            pass  # destroyed by an earlier attempt: what we wanted


def _leaf_fields(change) -> dict:
    # ``node_uuid`` in a log event is the node acting; a change's own node (attached to,
    # detached from) is ``volume_node``.
    return {("volume_node" if a.name == "node_uuid" else a.name): getattr(change, a.name)
            for a in type(change).__attrs_attrs__}


def _unknown_change(change) -> None:
    raise TypeError(f"the runner does not know how to run {change!r}")


def log_failure(logger: Logger, event_type: str, failure: Failure, **fields) -> None:
    """Emit an error event of ``event_type`` with ``fields`` and ``failure``'s traceback."""
    logger.failure(event_type + " {event_fields}", failure, LogLevel.error,
                   event_type=event_type,
                   event_fields=" ".join(f"{k}={v}" for k, v in fields.items()), **fields)


__all__ = ["EXPECTED_ERRORS", "ChangesFailed", "FolderFilesystems", "IFilesystems",
           "LocalFilesystems",
           "Runner", "SLOW_CHANGES", "StaleChange", "log_failure", "run_now"]
