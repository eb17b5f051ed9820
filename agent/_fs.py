"""
Filesystem helpers for dataset devices: make an ext4 filesystem ready for containers (or
finish one half made), probe for one and list its root, mount and unmount, and read the
mount table.

Everything here blocks (it runs mkfs, blkid, debugfs, and the mount(2) and umount2(2)
calls): call it in a thread, never on the reactor. Every command has a deadline chosen by
its kind (``COMMAND_TIMEOUTS``: a ``blkid`` is not a mkfs of a large volume); one that
passes it is killed and raises ``CommandTimedOut``, so a hung command never holds a thread
for good and the convergence loop retries it. Mounting and unmounting are system calls,
not ``mount``/``umount`` processes (a process costs 5-10 ms: on a new volume's first
Mount, and beside dockerd's own work when a removed volume is torn down), and a finished
ext4 is told from its superblock without ``blkid`` or ``debugfs``. Mount state is read from
``/proc/self/mountinfo``, so it is the calling process's mount namespace that counts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import struct
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import attr

from pyflock.common._gates import gate

#: Mode of a fresh filesystem's root: anyone may write there (see docs/backends.md).
ROOT_MODE = 0o777

#: Mode of the folder every dataset is mounted under: root only, so that no other host
#: user reaches what containers wrote (docs/security.md, "Volumes on the host").
MOUNT_ROOT_MODE = 0o700

# mount(2) flags (<sys/mount.h>).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000

#: Every dataset is mounted ``nosuid,nodev``: a setuid program or a device file a
#: container wrote gives nobody on the host anything.
MOUNT_FLAGS = _MS_NOSUID | _MS_NODEV

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")

# What os.fsdecode uses, looked up once.
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class CommandFailed(Exception):
    """An external command failed; the message carries the command, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        super().__init__(tuple(argv), returncode, stderr)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        detail = self.stderr.strip() or "(no error output)"
        if self.returncode == 127:
            return f"`{self.argv[0]}` is not installed: {detail}"
        return f"`{' '.join(self.argv)}` failed with exit code {self.returncode}: {detail}"


class CommandTimedOut(CommandFailed):
    """An external command ran past its deadline and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str = ""):
        super().__init__(argv, -9, stderr)
        self.timeout = timeout

    def __reduce__(self):
        return (type(self), (self.argv, self.timeout, self.stderr))

    def __str__(self) -> str:
        said = self.stderr.strip()
        return (f"`{' '.join(self.argv)}` did not finish within {self.timeout:g} s and was "
                f"killed" + (f": {said}" if said else ""))


#: Seconds each kind of command may run before it is killed, by program name. Generous
#: for what each does on a healthy host; a mkfs may meet a slow disk.
COMMAND_TIMEOUTS = {
    "blkid": 30.0,
    "debugfs": 60.0,
    "e2fsck": 600.0,
    "mkfs.ext4": 600.0,
}

#: Seconds for a command ``COMMAND_TIMEOUTS`` does not name.
DEFAULT_COMMAND_TIMEOUT = 60.0

#: Seconds to wait for a killed command to exit; one stuck in the kernel (a hung device)
#: is then left behind, to be reaped later, rather than holding the thread.
KILL_GRACE = 5.0


def command_timeout(argv: Sequence[str]) -> float:
    """The seconds ``argv`` may run, by its program's kind (``COMMAND_TIMEOUTS``; pure)."""
    return COMMAND_TIMEOUTS.get(os.path.basename(argv[0]), DEFAULT_COMMAND_TIMEOUT)


class FilesystemError(Exception):
    """A filesystem operation could not be done; the message says why and what to do."""


def run_command(argv: Sequence[str], input: Optional[str] = None,
                timeout: Optional[float] = None) -> str:
    """
    Run ``argv`` without a shell and return its stdout; raise ``CommandFailed`` (with its
    stderr) if it exits non-zero or cannot be started, ``CommandTimedOut`` if it runs
    longer than ``timeout`` seconds (default: ``command_timeout(argv)``).
    """
    limit = command_timeout(argv) if timeout is None else timeout
    process = _start(list(argv), stdin=subprocess.PIPE if input is not None else None)
    stdout, stderr = _finish(process, time.monotonic() + limit, limit, input)
    if process.returncode != 0:
        raise CommandFailed(argv, process.returncode, stderr)
    return stdout


def _finish(process: subprocess.Popen, deadline: float, limit: float,
            input: Optional[str] = None) -> tuple[str, str]:
    """``process``'s (stdout, stderr) once it exits; killed, ``CommandTimedOut`` (after
    ``limit`` seconds), at the ``deadline``."""
    try:
        return process.communicate(input, timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        _kill(process)
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
        raise CommandTimedOut(process.args, limit, stderr) from None


def _kill(process: subprocess.Popen) -> None:
    """Kill ``process`` and reap it, waiting at most ``KILL_GRACE`` seconds."""
    if process.returncode is not None:
        return
    process.kill()
    try:
        process.communicate(timeout=KILL_GRACE)  # reaps it and closes its pipes
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel: subprocess reaps it once it exits


def filesystem_type(device: str) -> Optional[str]:
    """
    The type of filesystem on ``device`` (e.g. ``"ext4"``), or None if it has none; raises
    ``FilesystemError`` if the device does not exist.
    """
    _check_exists(device)
    argv = _blkid_argv(device)
    process = _start(argv)
    limit = command_timeout(argv)
    stdout, stderr = _finish(process, time.monotonic() + limit, limit)
    return _blkid_answer(argv, process.returncode, stdout, stderr)


def probe_filesystem(device: str) -> tuple[Optional[str], Optional[tuple]]:
    """
    ``filesystem_type(device)``, and ``root_entries(device)`` if that is ``"ext4"`` (else
    None). The two commands only read, so they run side by side: a probe takes about as
    long as the slower of them. An ext4 whose root directory no longer has mkfs's mode
    (``finished_ext4_root``: a finished or used filesystem, the common case) is told
    without either command, and then only the root's own entry (``.``) is given: all a
    caller needs to know that it is not half made.
    """
    _check_exists(device)
    mode = finished_ext4_root(device)
    if mode is not None:
        return "ext4", ((".", mode),)
    processes = [_start(_blkid_argv(device))]
    try:
        try:
            processes.append(_start(_DEBUGFS_LS_ROOT + [device]))
        except CommandFailed:
            pass  # debugfs is not installed: an error only if an ext4 filesystem needs it
        limit = max(command_timeout(p.args) for p in processes)
        deadline = time.monotonic() + limit
        said = [_finish(process, deadline, limit) for process in processes]
    finally:
        for process in processes:
            _kill(process)
    blkid = processes[0]
    fstype = _blkid_answer(blkid.args, blkid.returncode, *said[0])
    if fstype != "ext4":
        return fstype, None
    if len(processes) == 1:
        raise CommandFailed(_DEBUGFS_LS_ROOT + [device], 127, "debugfs is not installed")
    debugfs = processes[1]
    if debugfs.returncode != 0:
        raise CommandFailed(debugfs.args, debugfs.returncode, said[1][1])
    return fstype, parse_debugfs_listing(said[1][0])


_DEBUGFS_LS_ROOT = ["debugfs", "-R", "ls -p /"]

#: The mode mkfs.ext4 gives a new filesystem's root (a directory, 0755).
MKFS_ROOT_MODE = 0o40755

_EXT4_MAGIC = 0xEF53
_INCOMPAT_JOURNAL_DEV, _INCOMPAT_EXTENTS, _INCOMPAT_64BIT = 0x8, 0x40, 0x80
_ROOT_INODE = 2


def ext4_root_mode(superblock: bytes, read_at: Callable[[int, int], bytes]) -> Optional[int]:
    """
    The mode of the root directory of the ext4 filesystem whose superblock (the 1024 bytes
    at offset 1024) is ``superblock``, read from its inode with ``read_at(offset, size)``;
    None if this is no ext4 filesystem with extents (ext2, ext3, a journal device,
    anything else) or its root inode is no directory. Pure but for ``read_at``.
    """
    if len(superblock) < 1024:
        return None
    (log_block_size,) = struct.unpack_from("<I", superblock, 0x18)
    (first_data_block,) = struct.unpack_from("<I", superblock, 0x14)
    (inodes_per_group,) = struct.unpack_from("<I", superblock, 0x28)
    (magic,) = struct.unpack_from("<H", superblock, 0x38)
    (revision,) = struct.unpack_from("<I", superblock, 0x4C)
    (inode_size,) = struct.unpack_from("<H", superblock, 0x58)
    (incompat,) = struct.unpack_from("<I", superblock, 0x60)
    (descriptor_size,) = struct.unpack_from("<H", superblock, 0xFE)
    if (magic != _EXT4_MAGIC or not incompat & _INCOMPAT_EXTENTS
            or incompat & _INCOMPAT_JOURNAL_DEV or log_block_size > 6 or revision < 1
            or inode_size < 128 or inodes_per_group < _ROOT_INODE):
        return None
    block_size = 1024 << log_block_size
    descriptor = read_at((first_data_block + 1) * block_size, 64)
    if len(descriptor) < 32:
        return None
    (table,) = struct.unpack_from("<I", descriptor, 0x8)
    if incompat & _INCOMPAT_64BIT and descriptor_size >= 64 and len(descriptor) >= 64:
        table |= struct.unpack_from("<I", descriptor, 0x28)[0] << 32
    inode = read_at(table * block_size + (_ROOT_INODE - 1) * inode_size, 2)
    if len(inode) < 2:
        return None
    (mode,) = struct.unpack_from("<H", inode, 0)
    return mode if stat.S_ISDIR(mode) else None


def finished_ext4_root(device: str) -> Optional[int]:
    """
    The root directory's mode of the ext4 filesystem on ``device`` (a device or a file),
    read straight from its superblock and root inode (no command: well under a
    millisecond), if it differs from mkfs's ``MKFS_ROOT_MODE``; None otherwise (no ext4,
    or a root mkfs left as it was, which only ``debugfs`` can tell half made or not).
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        mode = ext4_root_mode(os.pread(fd, 1024, 1024),
                              lambda offset, size: os.pread(fd, size, offset))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if mode is None or mode == MKFS_ROOT_MODE else mode


def _check_exists(device: str) -> None:
    # blkid answers "nothing found" for a missing device too, so check it exists first.
    if not os.path.exists(device):
        raise FilesystemError(f"device {device} does not exist")


def _blkid_argv(device: str) -> list[str]:
    return ["blkid", "-p", "-o", "value", "-s", "TYPE", device]


_FSTYPE = re.compile(r"[A-Za-z0-9_.+-]+\Z")


def _blkid_answer(argv: Sequence[str], returncode: int, stdout: str,
                  stderr: str) -> Optional[str]:
    # blkid exits 2 when it identifies nothing: the normal answer for a fresh device.
    if returncode == 2 and not stderr.strip():
        return None
    if returncode != 0:
        raise CommandFailed(argv, returncode, stderr)
    # ``-o value -s TYPE`` prints the type alone on its line; anything else (several
    # lines, odd characters) is not an answer to guess from.
    answer = stdout[:-1] if stdout.endswith("\n") else stdout
    if not answer:
        return None
    if not _FSTYPE.match(answer):
        raise FilesystemError(f"unexpected answer from `{' '.join(argv)}`: {answer!r}")
    return answer


def _start(argv: list[str], stdin: Optional[int] = None) -> subprocess.Popen:
    # Output is decoded as file names are (os.fsdecode): a name a container wrote in a
    # volume's root, as debugfs prints it, may be any bytes.
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                encoding=_FS_ENCODING, errors=_FS_ERRORS)
    except FileNotFoundError as e:
        raise CommandFailed(argv, 127, str(e)) from None


def has_filesystem(device: str) -> bool:
    """Whether ``device`` carries a filesystem (probed with ``blkid -p``, no cache)."""
    return filesystem_type(device) is not None


def make_filesystem(device: str) -> None:
    """
    Make an ext4 filesystem on ``device``, quickly (lazy inode table and journal
    initialisation, no discard) and ready for containers: its root holds no
    ``lost+found`` and has mode ``ROOT_MODE``. Refuses a device that already has a
    filesystem, since that would destroy data.
    """
    existing = filesystem_type(device)
    if existing is not None:
        raise FilesystemError(
            f"{device} already holds a {existing} filesystem; refusing to overwrite it "
            f"(wipe it with wipefs first if its data is really unwanted)")
    # -m 0: a dataset is its application's whole disk and applications often run as
    # non-root, so reserving 5% for root would only take space away from them.
    # ^resize_inode: no group descriptor blocks reserved for growing the filesystem
    # (4.3 MB of the 4.5 MB mkfs writes for 10 GiB). pyflock never grows a filesystem;
    # resize2fs still can (unmounted; mounted, by way of meta_bg, on Linux 3.7 and later).
    run_command(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^resize_inode",
                 "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", device])
    finish_filesystem(device)


def finish_filesystem(device: str) -> None:
    """
    The second half of ``make_filesystem``: make the root of the fresh ext4 filesystem on
    the unmounted ``device`` ready for containers (remove the empty ``lost+found``, set
    mode ``ROOT_MODE``), then check that it holds nothing else; ``FilesystemError`` if
    it does not come out so. It does not check what it is given: callers do.
    """
    # debugfs edits the unmounted filesystem, so no temporary mount is needed; it exits 0
    # even when a command fails, hence the check that follows.
    debugfs = run_command(["debugfs", "-w", "-f", "-", device],
                          input=f"rmdir lost+found\nsif / mode 0{0o40000 | ROOT_MODE:o}\n")
    entries = root_entries(device)
    names = sorted(name for name, _ in entries)
    root_modes = {mode for name, mode in entries if name in (".", "..")}
    if names != [".", ".."] or root_modes != {0o40000 | ROOT_MODE}:
        raise FilesystemError(
            f"could not prepare the root of the filesystem on {device}: it holds "
            f"{names} with modes {sorted(oct(m) for m in root_modes)}; debugfs said: "
            f"{debugfs.strip()}")


def root_entries(device: str) -> tuple[tuple[str, int], ...]:
    """
    The root directory of the unmounted ext2/3/4 filesystem on ``device`` as ``(name,
    mode)`` pairs (``.`` gives the root's own mode), read with ``debugfs``.
    """
    return parse_debugfs_listing(run_command(_DEBUGFS_LS_ROOT + [device]))


# ``ls -p`` prints ``/inode/mode/uid/gid/name/size/`` and a newline per entry; the name is
# printed as it is, so it may hold newlines, but never a "/" (the size is empty for a
# folder). Read entry after entry from the start, a name cannot pass for another entry.
_DEBUGFS_ENTRY = re.compile(r"/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/\n")


def parse_debugfs_listing(listing: str) -> tuple[tuple[str, int], ...]:
    """
    The ``(name, mode)`` pairs of what ``debugfs -R 'ls -p DIR'`` printed (pure); names
    may hold newlines. Lines not starting with "/" between entries (a banner) are
    skipped; ``FilesystemError`` for an entry that cannot be read.
    """
    entries = []
    position = 0
    while position < len(listing):
        if listing[position] != "/":  # a banner, or the blank line debugfs ends with
            end = listing.find("\n", position)
            position = len(listing) if end < 0 else end + 1
            continue
        match = _DEBUGFS_ENTRY.match(listing, position)
        if match is None:
            raise FilesystemError(f"unexpected output from debugfs ls -p: "
                                  f"{listing[position:position + 200]!r}")
        entries.append((match.group(5), int(match.group(2), 8)))
        position = match.end()
    return tuple(entries)


@attr.s(frozen=True, auto_attribs=True)
class MountInfo:
    """One line of ``/proc/<pid>/mountinfo``, escapes decoded (see proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: str
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: str


def _unescape(field: bytes) -> str:
    # Most fields have no escape: the agent parses the whole table at every discovery.
    if b"\\" in field:
        field = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)
    return field.decode(_FS_ENCODING, _FS_ERRORS)


def _escape(path: str) -> bytes:
    # As the kernel writes paths in mountinfo: space, tab, newline and backslash in octal.
    data = os.fsencode(path)
    for char in b"\\ \t\n":  # the backslash first, so that no escape is escaped again
        data = data.replace(bytes([char]), b"\\%03o" % char)
    return data


def parse_mountinfo(data: bytes, under: Optional[str] = None) -> list[MountInfo]:
    """
    Parse the bytes of a mountinfo file; raise ``ValueError`` on a malformed line. With
    ``under`` (an absolute path), only the mounts at ``under`` or below it are parsed and
    returned: the others are told apart by their (escaped) mount point alone.
    """
    if under is not None:
        exact = _escape(under.rstrip("/") or "/")
        below = exact.rstrip(b"/") + b"/"
    mounts = []
    for line in data.split(b"\n"):
        if not line:
            continue
        fields = line.split(b" ")
        if (under is not None and len(fields) > 4 and fields[4] != exact
                and not fields[4].startswith(below)):
            continue
        try:
            separator = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            mounts.append(MountInfo(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                major=int(major), minor=int(minor),
                root=_unescape(fields[3]), mount_point=_unescape(fields[4]),
                options=_unescape(fields[5]),
                optional_fields=tuple(_unescape(f) for f in fields[6:separator]),
                fstype=_unescape(fields[separator + 1]),
                source=_unescape(fields[separator + 2]),
                super_options=_unescape(fields[separator + 3]),
            ))
        except (ValueError, IndexError):
            raise ValueError(f"malformed mountinfo line: {line!r}") from None
    return mounts


def read_mountinfo(pid: str = "self", under: Optional[str] = None) -> list[MountInfo]:
    """
    The mounts of ``pid``'s mount namespace (default: this process's); with ``under``,
    only those at that absolute path or below it.
    """
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return parse_mountinfo(f.read(), under)


def _top_mount(path: str) -> Optional[MountInfo]:
    target = os.path.realpath(path)
    top = None
    # Later lines are mounted later, so the last match is the one covering the others.
    for mount in read_mountinfo(under=target):
        if mount.mount_point == target:
            top = mount
    return top


def is_mounted(path: str) -> bool:
    """Whether a filesystem is mounted at ``path`` in this mount namespace."""
    return _top_mount(path) is not None


def mounted_device(path: str) -> Optional[str]:
    """The source (e.g. ``/dev/loop3``) of the filesystem mounted at ``path``, or None."""
    mount = _top_mount(path)
    return None if mount is None else mount.source


def prepare_mount_root(path: str) -> None:
    """Create the folder datasets are mounted under, or make an existing one, mode
    ``MOUNT_ROOT_MODE`` (root only)."""
    os.makedirs(path, mode=MOUNT_ROOT_MODE, exist_ok=True)
    os.chmod(path, MOUNT_ROOT_MODE)


def _hardened(mount: MountInfo) -> bool:
    """Whether ``mount`` is ``nosuid,nodev``."""
    options = set(mount.options.split(","))
    return {"nosuid", "nodev"} <= options


def mount(device: str, path: str, fstype: str = "ext4") -> None:
    """
    Mount ``device`` at ``path`` (created if missing) with ``MOUNT_FLAGS`` (nosuid,
    nodev). Does nothing if ``device`` is already mounted there, but for adding those
    flags to a mount without them (made by an older version); raises ``FilesystemError``
    if something else is mounted there.
    """
    current = _top_mount(path)
    if current is not None:
        if _same_device(device, current):
            if not _hardened(current):
                read_only = _MS_RDONLY if "ro" in current.options.split(",") else 0
                _mount_call("none", path, None,
                            _MS_REMOUNT | _MS_BIND | MOUNT_FLAGS | read_only)
            return
        raise FilesystemError(
            f"cannot mount {device} at {path}: {current.source} is already mounted there; "
            f"unmount it first")
    os.makedirs(path, exist_ok=True)
    _mount_call(device, path, fstype)


def bind_mount(folder: str, path: str) -> None:
    """
    Bind-mount ``folder`` (a btrfs dataset's live subvolume) at ``path`` (created if
    missing), ``nosuid,nodev`` like every dataset. Does nothing if ``folder`` is already
    mounted there; raises ``FilesystemError`` if something else is.
    """
    current = _top_mount(path)
    if current is not None:
        if _same_folder(folder, path):
            return
        raise FilesystemError(
            f"cannot mount {folder} at {path}: {current.source} ({current.root}) is already "
            f"mounted there; unmount it first")
    os.makedirs(path, exist_ok=True)
    _mount_call(folder, path, None, _MS_BIND)
    # A bind keeps the flags of the mount it comes from (the pool's, nosuid,nodev); make
    # sure of them whatever that mount was.
    if not _hardened(_top_mount(path)):
        _mount_call("none", path, None, _MS_REMOUNT | _MS_BIND | MOUNT_FLAGS)


def _same_folder(folder: str, path: str) -> bool:
    """Whether ``path`` shows ``folder`` itself (same device and inode)."""
    try:
        a, b = os.stat(folder), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# The C library, for mount(2): mount(8) would cost a process (5-10 ms) for one system call.
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """syncfs(2) of the filesystem holding ``path``: its dirty data written back, and (for
    btrfs) its transaction committed; ``OSError`` if the kernel refuses."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of {path}: {os.strerror(error)}")
    finally:
        os.close(fd)


def _mount_call(device: str, path: str, fstype: Optional[str],
                flags: int = MOUNT_FLAGS) -> None:
    """
    mount(2) of ``device`` at ``path`` as ``fstype`` with ``flags`` (by default
    ``MOUNT_FLAGS``: what ``mount -t FSTYPE -o nosuid,nodev DEVICE PATH`` asks of the
    kernel); ``FilesystemError`` naming the kernel's reason if it refuses. Like any
    mount, the call may take as long as the kernel does (a journal replay): a hung device
    would hang ``mount`` alike.
    """
    kind = None if fstype is None else fstype.encode()
    if _libc.mount(os.fsencode(device), os.fsencode(path), kind, flags, None) == 0:
        return
    error = ctypes.get_errno()
    hint = {errno.EINVAL: " (no such filesystem on the device, or a damaged one)",
            errno.EBUSY: " (the device is already mounted elsewhere, or in use)",
            errno.EPERM: " (mounting needs root)"}.get(error, "")
    raise FilesystemError(f"cannot mount {device} at {path} as {fstype}: "
                          f"{os.strerror(error)}{hint}")


def _same_device(device: str, mount: MountInfo) -> bool:
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return False
    return (os.major(rdev), os.minor(rdev)) == (mount.major, mount.minor)


def unmount(path: str) -> None:
    """
    Unmount whatever is mounted at ``path`` (never lazily, never forced: umount2(2) with
    no flags, what ``umount PATH`` asks of the kernel); does nothing if nothing is.
    Raises ``FilesystemError`` naming the kernel's reason if it refuses (busy in this
    namespace). Like any unmount, the call takes as long as writing back the
    filesystem's unwritten data does.
    """
    # Bounded, in case mounts are stacked there; each pass removes the top one.
    for _ in range(64):
        if not is_mounted(path):
            return
        if _libc.umount2(os.fsencode(path), 0) != 0:
            error = ctypes.get_errno()
            if error == errno.EINVAL and not is_mounted(path):
                return  # unmounted meanwhile: what was wanted
            hint = {errno.EBUSY: " (a process still uses it: stop it, then retry)",
                    errno.EPERM: " (unmounting needs root)"}.get(error, "")
            raise FilesystemError(f"cannot unmount {path}: {os.strerror(error)}{hint}")
        gate("unmounted")  # tests kill the agent here: unmounted, nothing recorded yet
    raise FilesystemError(f"{path} is still mounted after 64 unmounts")
