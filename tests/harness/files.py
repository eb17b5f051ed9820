"""
Files and folders a test makes unwritable, for root as well as for other users: mode bits
do not stop root, the immutable attribute (``chattr +i``, set here with the same ioctl,
without a subprocess) does.
"""

from __future__ import annotations

import array
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.harness.requirements import require, running_as_root

__all__ = ["unwritable"]

#: ``FS_IOC_GETFLAGS`` and ``FS_IOC_SETFLAGS`` of linux/fs.h (on 64-bit Linux), and the
#: immutable flag.
_GETFLAGS, _SETFLAGS, _IMMUTABLE = 0x80086601, 0x40086602, 0x00000010


def _set_immutable(path: Path, on: bool) -> None:
    """Set or clear the immutable attribute of ``path``."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(descriptor, _GETFLAGS, flags, True)
        flags[0] = flags[0] | _IMMUTABLE if on else flags[0] & ~_IMMUTABLE
        fcntl.ioctl(descriptor, _SETFLAGS, flags, True)
    finally:
        os.close(descriptor)


@contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """
    Make the file or folder ``path`` unwritable for this process while the block runs:
    read-only mode bits for a user, the immutable attribute for root (``require``s that the
    filesystem supports it: a test fails under ``$CI`` and skips otherwise if it does not).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if running_as_root():
        try:
            _set_immutable(path, True)
        except OSError as e:
            require(False, f"the immutable attribute is not available on {path}'s "
                           f"filesystem ({e.strerror}); root ignores mode bits")
        try:
            yield path
        finally:
            _set_immutable(path, False)
    else:
        path.chmod(mode & 0o555)
        try:
            yield path
        finally:
            path.chmod(mode)
