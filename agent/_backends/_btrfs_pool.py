"""
A node's btrfs pool: the block device or file that holds its datasets, formatted once,
mounted ``nosuid,nodev`` at a root-only folder, mounted again after a reboot or an agent
restart, and released (unmounted, its loop device detached) by ``pyflock-agent release``.

A ``pool_path`` is formatted only when it is blank: a file the agent has just created
(``pool_size`` given, no file there yet), a file with no data in it, or a device whose
first and last MiB are zeros. One that holds another filesystem, a btrfs with another
label, or any data is refused, never formatted.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Optional

from pyflock.agent._backends._btrfs_model import DATASETS, POOL_LABEL, STAGING, PoolRefused
from pyflock.agent._backends._interface import MiB
from pyflock.agent._backends._loopback import (
    attach_loop_device, release_loop_device, scan_loop_devices,
)
from pyflock.agent._fs import syncfs
from pyflock.agent._fs import (
    MOUNT_ROOT_MODE, CommandFailed, FilesystemError, mount, read_mountinfo, run_command,
    unmount,
)

#: The smallest pool ``mkfs.btrfs`` accepts, rounded up.
MINIMUM_POOL_SIZE = 128 * MiB

#: Bytes read at each end of a device to tell whether it is blank.
_PROBE = MiB


def _blkid(path: str) -> dict:
    """What ``blkid`` finds on ``path`` (TYPE, LABEL, PTTYPE...); empty if nothing."""
    try:
        output = run_command(["blkid", "-p", "-o", "export", path])
    except CommandFailed as e:
        if e.returncode == 2:  # blkid: nothing found
            return {}
        raise
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def _file_is_blank(path: str) -> bool:
    """Whether the regular file ``path`` holds no data at all (sparse, never written)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return True
            raise
        return False
    finally:
        os.close(fd)


def _device_is_blank(path: str) -> bool:
    """Whether the first and last MiB of the block device ``path`` are zeros."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for at in {0, max(0, size - _PROBE)}:
            if os.pread(fd, _PROBE, at).strip(b"\0"):
                return False
        return True
    finally:
        os.close(fd)


class BtrfsPool:
    """
    The pool at ``pool_path`` (a block device, or a file attached as a loop device; with
    ``pool_size`` the file is created when missing), mounted at ``mount_path``.
    """

    def __init__(self, pool_path: str, mount_path: str, pool_size: Optional[int] = None):
        self.pool_path = os.path.abspath(pool_path)
        self.mount_path = os.path.abspath(mount_path)
        self.pool_size = pool_size

    def __repr__(self) -> str:
        return f"BtrfsPool({self.pool_path!r} at {self.mount_path!r})"

    def _kind(self) -> Optional[str]:
        """"file", "device", or None if nothing is at ``pool_path``."""
        try:
            mode = os.stat(self.pool_path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISREG(mode):
            return "file"
        if stat.S_ISBLK(mode):
            return "device"
        raise PoolRefused(self.pool_path, "it is neither a block device nor a file")

    def loop_devices(self) -> list[str]:
        """The loop devices backed by the pool file."""
        return [d.device for d in scan_loop_devices(self.pool_path)
                if d.backing_file == self.pool_path and not d.deleted]

    def mounted_device(self) -> Optional[str]:
        """The device mounted at ``mount_path`` if it is a btrfs, else None."""
        for found in read_mountinfo(under=self.mount_path):
            if found.mount_point == self.mount_path and found.fstype == "btrfs":
                return found.source
        return None

    def is_pool_device(self, device: str) -> bool:
        """Whether ``device`` is the pool (itself, or a loop device of the pool file)."""
        return device == self.pool_path or device in self.loop_devices()

    def open(self) -> str:
        """
        Make the pool ready and mounted (formatting a blank ``pool_path`` first); return
        the mount path. ``PoolRefused`` says why ``pool_path`` cannot be a pool.
        """
        current = self.mounted_device()
        if current is not None and not self.is_pool_device(current):
            raise PoolRefused(self.pool_path, f"another btrfs ({current}) is mounted at "
                                              f"{self.mount_path}")
        if current is None:
            kind = self._kind()
            if kind is None:
                self._create_file()
                kind = "file"
            self._format_if_blank(kind)
            device = self.pool_path
            if kind == "file":
                devices = self.loop_devices()
                # Direct I/O: the pool's data is cached once, in the pool, not again for
                # the file under it, and its writeback (which a received stream's snapshot
                # waits for) goes straight to the disk.
                device = devices[0] if devices else attach_loop_device(self.pool_path,
                                                                       direct_io=True)
            os.makedirs(self.mount_path, mode=MOUNT_ROOT_MODE, exist_ok=True)
            os.chmod(self.mount_path, MOUNT_ROOT_MODE)
            # The pool's own mount is nosuid,nodev, so every bind of a dataset is too.
            mount(device, self.mount_path, "btrfs")
        # The pool's root holds every snapshot: root only, like the mount root.
        os.chmod(self.mount_path, MOUNT_ROOT_MODE)
        for folder in (DATASETS, STAGING):
            os.makedirs(os.path.join(self.mount_path, folder), mode=0o700, exist_ok=True)
        return self.mount_path

    def _create_file(self) -> None:
        if self.pool_size is None:
            raise PoolRefused(self.pool_path, "there is no such file or device; give "
                                              "dataset.pool_size to have the agent create "
                                              "a file of that size")
        if self.pool_size < MINIMUM_POOL_SIZE:
            raise PoolRefused(self.pool_path, f"pool_size must be at least "
                                              f"{MINIMUM_POOL_SIZE // MiB} MiB")
        os.makedirs(os.path.dirname(self.pool_path), exist_ok=True)
        fd = os.open(self.pool_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, self.pool_size)
        finally:
            os.close(fd)

    def _format_if_blank(self, kind: str) -> None:
        found = _blkid(self.pool_path)
        if found.get("TYPE") == "btrfs":
            if found.get("LABEL") != POOL_LABEL:
                raise PoolRefused(self.pool_path, f"it holds a btrfs labelled "
                                                  f"{found.get('LABEL')!r}, not {POOL_LABEL!r}")
            return
        if found:
            what = found.get("TYPE") or found.get("PTTYPE") or "something blkid recognises"
            raise PoolRefused(self.pool_path, f"it holds {what}; pyflock never formats it "
                                              f"(wipe it yourself if it is really unused)")
        blank = _file_is_blank(self.pool_path) if kind == "file" \
            else _device_is_blank(self.pool_path)
        if not blank:
            raise PoolRefused(self.pool_path, "it holds data; pyflock never formats it "
                                              "(wipe it yourself if it is really unused)")
        run_command(["mkfs.btrfs", "-q", "-L", POOL_LABEL, self.pool_path])

    def release(self) -> list[str]:
        """
        Unmount the pool and detach its loop device (the datasets must be unmounted
        first); what could not be released, with the reason.
        """
        problems = []
        try:
            if self.mounted_device() is not None:
                unmount(self.mount_path)
        except (CommandFailed, FilesystemError, OSError) as e:
            problems.append(f"{self.mount_path}: {e}")
            return problems
        if os.path.isfile(self.pool_path):
            for device in self.loop_devices():
                try:
                    release_loop_device(device, self.pool_path)
                except OSError as e:
                    problems.append(f"{device}: {e}")
            # The kernel detaches a device its filesystem let go of a moment ago a little
            # later (autoclear, in a work queue): wait for it, so that released means gone.
            deadline = time.monotonic() + _DETACH_WAIT
            while self.loop_devices() and time.monotonic() < deadline:
                time.sleep(0.05)
            problems += [f"{device}: still attached {_DETACH_WAIT:g} s after its release "
                         f"(something holds it open)" for device in self.loop_devices()]
        return problems


#: Seconds ``BtrfsPool.release`` waits for the kernel to detach the pool file's device.
_DETACH_WAIT = 5.0

#: While a stream is received into a pool, its writeback starts after every this many
#: bytes (``Writeback``).
WRITEBACK_EVERY = 128 * MiB


class Writeback:
    """
    Writes back the data a stream brings into the pool at ``path`` while it comes, not all
    after: ``fed(nbytes)`` after each piece starts a ``syncfs`` of the pool in a thread
    once ``every`` bytes came since the last one started (one at a time), and ``close``
    waits for the one under way. The data must reach the disk before the move goes on in
    any case (receiving the next, incremental stream snapshots this one, which flushes
    it): this moves that work beside the stream, where the disk is otherwise idle. A
    failed ``syncfs`` changes nothing: the snapshot flushes what it left.
    """

    def __init__(self, path: str, every: int = WRITEBACK_EVERY):
        self._path = path
        self._every = every
        self._since = 0
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Writeback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fed(self, nbytes: int) -> None:
        """``nbytes`` more came into the pool."""
        self._since += nbytes
        if self._since < self._every or (self._thread is not None
                                          and self._thread.is_alive()):
            return
        self._since = 0
        self._thread = threading.Thread(target=self._sync, daemon=True,
                                        name="pool-writeback")
        self._thread.start()

    def _sync(self) -> None:
        try:
            syncfs(self._path)
        except OSError:
            pass  # see the class: nothing is lost

    def close(self) -> None:
        """Wait for the writeback under way, if one is."""
        if self._thread is not None:
            self._thread.join()

