"""
Tests for the filesystem helpers: the mountinfo parser, command errors, and mkfs, mount
and unmount on real loop devices (as root).
"""

import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from pyflock.agent._fs import (
    COMMAND_TIMEOUTS, DEFAULT_COMMAND_TIMEOUT, ROOT_MODE, CommandFailed, CommandTimedOut,
    FilesystemError, MOUNT_ROOT_MODE, MountInfo, _blkid_answer, _mount_call,
    command_timeout, prepare_mount_root, ext4_root_mode, filesystem_type,
    finish_filesystem, finished_ext4_root, has_filesystem, is_mounted, make_filesystem, mount, mounted_device,
    parse_debugfs_listing, parse_mountinfo, probe_filesystem, read_mountinfo, root_entries,
    run_command, unmount,
)
from tests.harness.requirements import ROOT

SIZE = 64 * 1024 * 1024


def needs_root(test):
    """Mark ``test`` as an integration test on real loop devices that needs root."""
    return pytest.mark.integration(ROOT(test))


@pytest.fixture
def make_device(tmp_path):
    """A factory of loop devices on fresh sparse files, each detached by name afterwards."""
    devices = []

    def make() -> str:
        image = tmp_path / f"disk{len(devices)}.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                capture_output=True, text=True).stdout.strip()
        devices.append(device)
        return device
    yield make
    for device in devices:
        subprocess.run(["losetup", "-d", device], check=True)


@pytest.fixture
def device(make_device):
    """One loop device on a fresh sparse file."""
    return make_device()


@pytest.fixture
def mount_point(make_device):
    """
    A mount point path (not created) that is unmounted after the test, before detaching;
    its parent is open to all users (pytest's own temporary folders are not).
    """
    parent = tempfile.mkdtemp(prefix="pf-fs-")
    os.chmod(parent, 0o755)
    path = os.path.join(parent, "mnt")
    yield path
    unmount(path)
    shutil.rmtree(parent)


def test_parse_mountinfo():
    """Every field is parsed, octal escapes decoded and optional fields kept."""
    data = (b"36 35 98:0 /mnt1 /mnt/a\\040b\\134c rw,noatime master:1 shared:2 - ext3 "
            b"/dev/root rw,errors=continue\n"
            b"40 27 7:3 / /x\\011y rw - ext4 /dev/loop3 rw\n")
    assert parse_mountinfo(data) == [
        MountInfo(mount_id=36, parent_id=35, major=98, minor=0, root="/mnt1",
                  mount_point="/mnt/a b\\c", options="rw,noatime",
                  optional_fields=("master:1", "shared:2"), fstype="ext3",
                  source="/dev/root", super_options="rw,errors=continue"),
        MountInfo(mount_id=40, parent_id=27, major=7, minor=3, root="/",
                  mount_point="/x\ty", options="rw", optional_fields=(), fstype="ext4",
                  source="/dev/loop3", super_options="rw"),
    ]


def test_parse_mountinfo_undecodable_bytes():
    """Bytes that are not UTF-8 survive as surrogate escapes, as os.fsdecode gives them."""
    [info] = parse_mountinfo(b"1 0 7:1 / /m\xff rw - ext4 /dev/loop1 rw\n")
    assert os.fsencode(info.mount_point) == b"/m\xff"


def test_parse_mountinfo_malformed():
    """A line without the separator is refused with a ``ValueError`` quoting it."""
    with pytest.raises(ValueError, match="malformed mountinfo line"):
        parse_mountinfo(b"1 0 7:1 / /m rw ext4 /dev/loop1 rw\n")


def test_parse_mountinfo_under():
    """
    Only the mounts at or below ``under`` are returned, escaped names included; lines
    elsewhere are not even parsed.
    """
    data = (b"1 0 7:1 / /r rw - ext4 /dev/loop1 rw\n"
            b"2 1 7:2 / /r/a rw - ext4 /dev/loop2 rw\n"
            b"3 1 7:3 / /r/a\\040b rw - ext4 /dev/loop3 rw\n"
            b"4 0 7:4 / /ra rw - ext4 /dev/loop4 rw\n"
            b"5 0 7:5 / /x malformed\n"
            b"6 0 7:6 / /s\\040t rw - ext4 /dev/loop6 rw\n"
            b"7 6 7:7 / /s\\040t/u rw - ext4 /dev/loop7 rw\n")
    assert ["/r", "/r/a", "/r/a b"] == [m.mount_point for m in parse_mountinfo(data, "/r")]
    assert ["/r/a"] == [m.mount_point for m in parse_mountinfo(data, "/r/a/")]
    assert ["/s t", "/s t/u"] == [m.mount_point for m in parse_mountinfo(data, "/s t")]
    assert [] == parse_mountinfo(data, "/nowhere")
    with pytest.raises(ValueError, match="malformed"):
        parse_mountinfo(data, "/")


def test_parse_debugfs_listing():
    """``ls -p`` lines become (name, mode) pairs; anything else is skipped."""
    listing = ("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/11/040700/0/0/lost+found//\n"
               "/12/100644/1000/1000/a file/5/\n\n")
    assert ((".", 0o40755), ("..", 0o40755), ("lost+found", 0o40700),
            ("a file", 0o100644)) == parse_debugfs_listing("debugfs 1.47.0\n" + listing)


def test_parse_debugfs_listing_names_with_newlines():
    """A name holding newlines (even what looks like an entry) is one entry."""
    listing = ("/2/040755/0/0/.//\n/12/100644/0/0/a\nb/0/\n/14/100644/0/0/x\n/0/\n"
               "/15/100644/0/0/\udcff\n12\n/7/\n\n")
    assert parse_debugfs_listing(listing) == (
        (".", 0o40755), ("a\nb", 0o100644), ("x\n", 0o100644), ("\udcff\n12\n", 0o100644))


def test_parse_debugfs_listing_refuses_a_garbled_entry():
    """An entry that cannot be read is an error, never a shorter listing."""
    with pytest.raises(FilesystemError, match="unexpected output from debugfs"):
        parse_debugfs_listing("/2/040755/0/0/.//\n/12/100644/0/0/cut")


def test_blkid_answer():
    """blkid's one-line answer is the type; several lines or odd text are refused."""
    argv = ["blkid"]
    assert _blkid_answer(argv, 0, "ext4\n", "") == "ext4"
    assert _blkid_answer(argv, 0, "", "") is None
    assert _blkid_answer(argv, 2, "", "") is None
    for odd in ("ext4\nxfs\n", "ext4\n\n", "a b\n"):
        with pytest.raises(FilesystemError, match="unexpected answer from `blkid`"):
            _blkid_answer(argv, 0, odd, "")


def test_read_own_mountinfo():
    """This process's mount table includes the root filesystem."""
    assert "/" in [m.mount_point for m in read_mountinfo()]


@pytest.mark.integration
def test_command_failed_carries_stderr():
    """A failing command raises ``CommandFailed`` with its exit code and stderr."""
    with pytest.raises(CommandFailed) as e:
        run_command(["sh", "-c", "echo out; echo 'it broke' >&2; exit 3"])
    assert (e.value.returncode, e.value.stderr) == (3, "it broke\n")
    assert str(e.value) == ("`sh -c echo out; echo 'it broke' >&2; exit 3` failed with exit "
                            "code 3: it broke")


@pytest.mark.integration
def test_command_missing():
    """A command that is not installed raises ``CommandFailed`` saying so."""
    with pytest.raises(CommandFailed, match="`no-such-command-pf` is not installed"):
        run_command(["no-such-command-pf"])


def test_timeouts_by_kind():
    """Each kind of command has its own deadline: a ``blkid`` gets far less than mkfs."""
    assert command_timeout(["/usr/sbin/blkid", "/dev/loop0"]) == COMMAND_TIMEOUTS["blkid"]
    assert command_timeout(["mkfs.ext4", "-q", "/dev/loop0"]) == COMMAND_TIMEOUTS["mkfs.ext4"]
    assert COMMAND_TIMEOUTS["blkid"] < COMMAND_TIMEOUTS["mkfs.ext4"]
    assert command_timeout(["something-else"]) == DEFAULT_COMMAND_TIMEOUT


@pytest.mark.integration
def test_hung_command_is_killed(tmp_path):
    """A command past its deadline is killed and raises ``CommandTimedOut`` naming it."""
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; echo 'stuck here' >&2; exec sleep 30"
    with pytest.raises(CommandTimedOut) as e:
        run_command(["sh", "-c", script], timeout=0.5)
    assert isinstance(e.value, CommandFailed)
    assert str(e.value) == (f"`sh -c {script}` did not finish within 0.5 s and was killed: "
                            f"stuck here")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


@pytest.mark.integration
def test_kind_timeout_applies(monkeypatch):
    """Without an explicit timeout, the command's kind sets its deadline."""
    monkeypatch.setitem(COMMAND_TIMEOUTS, "sleep", 0.3)
    with pytest.raises(CommandTimedOut, match="within 0.3 s"):
        run_command(["sleep", "30"])


@pytest.mark.integration
def test_command_input():
    """A command is given its ``input`` on stdin."""
    assert run_command(["cat"], input="some input") == "some input"


def test_missing_device():
    """Probing a device that does not exist raises ``FilesystemError`` naming it."""
    with pytest.raises(FilesystemError, match="/dev/no-such-device-pf does not exist"):
        has_filesystem("/dev/no-such-device-pf")


@needs_root
def test_fresh_device_has_no_filesystem(device):
    """A fresh device has no filesystem."""
    assert (has_filesystem(device), filesystem_type(device)) == (False, None)


@needs_root
def test_make_filesystem(device, mount_point):
    """A new filesystem is ext4 with an empty root that any user can write to."""
    make_filesystem(device)
    assert filesystem_type(device) == "ext4"
    mount(device, mount_point)
    assert os.listdir(mount_point) == []
    assert os.stat(mount_point).st_mode & 0o7777 == ROOT_MODE
    subprocess.run(["touch", os.path.join(mount_point, "by-nobody")], check=True,
                   user=65534, group=65534, extra_groups=[])
    assert os.stat(os.path.join(mount_point, "by-nobody")).st_uid == 65534


@needs_root
def test_probe(device):
    """
    A probe tells a blank device, a half-made filesystem (``lost+found``, mode 0755) and
    a ready one (an empty root open to all) apart, as ``filesystem_type`` and
    ``root_entries`` do one after the other.
    """
    assert (None, None) == probe_filesystem(device)
    run_command(["mkfs.ext4", "-q", "-F", device])
    fstype, root = probe_filesystem(device)
    assert ("ext4", ["."], {0o40755}) == (
        fstype, [n for n, m in root if n == "."], {m for n, m in root if n == "."})
    assert ["lost+found"] == sorted(n for n, _ in root if n not in (".", ".."))
    assert (filesystem_type(device), root_entries(device)) == (fstype, root)
    finish_filesystem(device)
    # A finished root is told from the root inode alone: only its own entry is given.
    assert ("ext4", ((".", 0o40777),)) == probe_filesystem(device)
    assert ((".", 0o40777), ("..", 0o40777)) == root_entries(device)


def _ext4(block_size: int = 4096, incompat: int = 0x2C2, descriptor_size: int = 64,
          table: int = 0x1_0000_0021, root_mode: int = 0o40777, magic: int = 0xEF53):
    """A superblock and a ``read_at`` over a sparse image holding ``table`` (the inode
    table of group 0, 64-bit when the descriptor has room) and the root inode's mode."""
    superblock = bytearray(1024)
    struct.pack_into("<I", superblock, 0x14, 0 if block_size > 1024 else 1)
    struct.pack_into("<I", superblock, 0x18, block_size.bit_length() - 11)
    struct.pack_into("<I", superblock, 0x28, 8192)
    struct.pack_into("<H", superblock, 0x38, magic)
    struct.pack_into("<I", superblock, 0x4C, 1)
    struct.pack_into("<H", superblock, 0x58, 256)
    struct.pack_into("<I", superblock, 0x60, incompat)
    struct.pack_into("<H", superblock, 0xFE, descriptor_size)
    descriptor = bytearray(64)
    struct.pack_into("<I", descriptor, 0x8, table & 0xFFFF_FFFF)
    struct.pack_into("<I", descriptor, 0x28, table >> 32)
    first = 0 if block_size > 1024 else 1
    image = {(first + 1) * block_size: bytes(descriptor),
             table * block_size + 256: struct.pack("<H", root_mode)}

    def read_at(offset: int, size: int) -> bytes:
        return image.get(offset, b"")[:size]
    return bytes(superblock), read_at


def test_ext4_root_mode_64bit():
    """The root's mode is read from the inode table a 64-bit group descriptor names."""
    assert 0o40777 == ext4_root_mode(*_ext4())


def test_ext4_root_mode_32bit_small_blocks():
    """With 32-byte descriptors only the low half of the table's block counts; with 1 KiB
    blocks the descriptors follow the superblock's block 1."""
    assert 0o40700 == ext4_root_mode(*_ext4(block_size=1024, incompat=0x242,
                                            descriptor_size=0, table=0x21,
                                            root_mode=0o40700))


@pytest.mark.parametrize("change", [dict(magic=0x1234), dict(incompat=0x2),
                                    dict(incompat=0x2CA), dict(root_mode=0o100644)],
                         ids=["not-ext", "no-extents", "journal-device", "root-not-dir"])
def test_ext4_root_mode_refuses(change):
    """No mode for what is not an ext4 with extents, a journal device, or a root inode
    that is not a directory: the caller then probes with blkid and debugfs."""
    assert ext4_root_mode(*_ext4(**change)) is None


def test_ext4_root_mode_short_read():
    """A superblock or a descriptor cut short gives no mode."""
    superblock, read_at = _ext4()
    assert ext4_root_mode(superblock[:512], read_at) is None
    assert ext4_root_mode(superblock, lambda offset, size: b"") is None


@pytest.mark.integration
def test_finished_ext4_root(tmp_path):
    """Only a finished ext4 is told without a command: a blank file, a fresh ext4 (root
    as mkfs left it) and an ext3 all need the full probe."""
    image = str(tmp_path / "disk.img")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    assert finished_ext4_root(image) is None
    run_command(["mkfs.ext4", "-q", "-F", image])
    assert finished_ext4_root(image) is None
    finish_filesystem(image)
    assert finished_ext4_root(image) == 0o40777
    run_command(["mkfs.ext3", "-q", "-F", image])
    assert finished_ext4_root(image) is None
    assert finished_ext4_root(str(tmp_path / "missing.img")) is None


def test_probe_missing_device():
    """Probing a device that does not exist raises ``FilesystemError`` naming it."""
    with pytest.raises(FilesystemError, match="/dev/no-such-device-pf does not exist"):
        probe_filesystem("/dev/no-such-device-pf")


@needs_root
def test_probe_other_filesystem(device):
    """A filesystem other than ext4 is named, and its root is not listed."""
    run_command(["mkfs.ext2", "-q", "-F", device])
    assert ("ext2", None) == probe_filesystem(device)


@needs_root
def test_finish_filesystem_refuses_to_leave_a_root_unprepared(device, mount_point):
    """When ``lost+found`` holds something, finishing fails, saying what the root holds."""
    run_command(["mkfs.ext4", "-q", "-F", device])
    mount(device, mount_point)
    open(os.path.join(mount_point, "lost+found", "kept"), "w").close()
    unmount(mount_point)
    with pytest.raises(FilesystemError, match="lost\\+found"):
        finish_filesystem(device)
    assert "lost+found" in [name for name, _ in root_entries(device)]


@needs_root
def test_make_filesystem_refuses_existing(device):
    """Making a filesystem on a device that has one is refused, naming the type."""
    make_filesystem(device)
    with pytest.raises(FilesystemError, match="already holds a ext4 filesystem"):
        make_filesystem(device)


@needs_root
def test_mount(device, mount_point):
    """A mounted device is seen at its mount point, which mount created."""
    make_filesystem(device)
    assert not is_mounted(mount_point)
    mount(device, mount_point)
    assert (is_mounted(mount_point), mounted_device(mount_point)) == (True, device)


@needs_root
def test_mounts_are_nosuid_nodev(device, mount_point, tmp_path):
    """A dataset's mount is nosuid,nodev: a setuid-root copy of id run by nobody from it
    does not run as root."""
    make_filesystem(device)
    mount(device, mount_point)
    [info] = [m for m in read_mountinfo() if m.mount_point == os.path.realpath(mount_point)]
    assert {"nosuid", "nodev"} <= set(info.options.split(","))
    program = os.path.join(mount_point, "id")
    shutil.copy(shutil.which("id"), program)
    os.chmod(program, 0o4755)
    ran = subprocess.run([program, "-u"], capture_output=True, text=True, check=True,
                         user=65534, group=65534, extra_groups=[])
    assert ran.stdout.strip() == "65534"


@needs_root
def test_mount_adds_nosuid_to_an_older_mount(device, mount_point):
    """A dataset mounted without nosuid,nodev (an older version) gets them, not a second
    mount."""
    make_filesystem(device)
    os.makedirs(mount_point)
    _mount_call(device, mount_point, "ext4", 0)
    mount(device, mount_point)
    target = os.path.realpath(mount_point)
    infos = [m for m in read_mountinfo() if m.mount_point == target]
    assert len(infos) == 1 and {"nosuid", "nodev"} <= set(infos[0].options.split(","))


def test_prepare_mount_root(tmp_path):
    """The mount root is made, or made again, mode 0700."""
    root = tmp_path / "mounts"
    prepare_mount_root(str(root))
    root.chmod(0o755)
    prepare_mount_root(str(root))
    assert root.stat().st_mode & 0o7777 == MOUNT_ROOT_MODE == 0o700


@needs_root
def test_root_entries_with_odd_names(device, mount_point):
    """Names with newlines and bytes that are no UTF-8 are listed as they are."""
    make_filesystem(device)
    mount(device, mount_point)
    for name in (b"a\nb", b"x\n", b"\xff\xfe", b"\n\n"):
        with open(os.path.join(os.fsencode(mount_point), name), "wb"):
            pass
    unmount(mount_point)
    names = sorted(name for name, _ in root_entries(device))
    assert names == sorted([".", "..", "a\nb", "x\n", os.fsdecode(b"\xff\xfe"), "\n\n"])


@needs_root
def test_mount_twice(device, mount_point):
    """Mounting the same device at the same place again does not stack a second mount."""
    make_filesystem(device)
    mount(device, mount_point)
    mount(device, mount_point)
    target = os.path.realpath(mount_point)
    assert [m.mount_point for m in read_mountinfo()].count(target) == 1


@needs_root
def test_mount_over_other_device(make_device, mount_point):
    """Mounting where another device is mounted is refused, naming it."""
    first, second = make_device(), make_device()
    make_filesystem(first)
    make_filesystem(second)
    mount(first, mount_point)
    with pytest.raises(FilesystemError, match=f"{first} is already mounted there"):
        mount(second, mount_point)
    assert mounted_device(mount_point) == first


@needs_root
def test_mount_escaped_path(device, tmp_path):
    """A mount point with a space, tab and backslash in its name is found and unmounted."""
    path = str(tmp_path / "a b\tc\\d")
    make_filesystem(device)
    mount(device, path)
    try:
        assert (is_mounted(path), mounted_device(path)) == (True, device)
    finally:
        unmount(path)
    assert not is_mounted(path)


@needs_root
def test_mount_without_filesystem(device, mount_point):
    """Mounting a device with no filesystem raises ``FilesystemError`` with the kernel's
    reason, and mounts nothing."""
    with pytest.raises(FilesystemError, match=f"cannot mount {device} at .* as ext4: "
                                              f"Invalid argument .no such filesystem"):
        mount(device, mount_point)
    assert not is_mounted(mount_point)


@needs_root
def test_unmount(device, mount_point):
    """Unmounting removes the mount; unmounting again does nothing."""
    make_filesystem(device)
    mount(device, mount_point)
    unmount(mount_point)
    unmount(mount_point)
    assert not is_mounted(mount_point)


@needs_root
def test_unmount_busy(device, mount_point):
    """Unmounting a filesystem with a file open in it raises ``FilesystemError`` saying it
    is busy and what to do (never lazy)."""
    make_filesystem(device)
    mount(device, mount_point)
    with open(os.path.join(mount_point, "open"), "w"):
        with pytest.raises(FilesystemError, match="busy.*stop it"):
            unmount(mount_point)
        assert is_mounted(mount_point)


@needs_root
def test_mounts_are_per_namespace(device, mount_point):
    """A mount made in a child mount namespace is not seen in ours."""
    make_filesystem(device)
    os.makedirs(mount_point)
    child = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount "$0" "$1" && echo ready && exec sleep infinity', device, mount_point],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert device in [m.source for m in read_mountinfo(str(child.pid))]
        assert not is_mounted(mount_point)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
