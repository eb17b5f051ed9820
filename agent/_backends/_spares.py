"""
Spare volume files of the loopback backend: sparse files already holding a finished,
empty ext4 filesystem (``pyflock.agent._fs.make_filesystem`` run on the file itself: no
loop device is ever attached to a spare), so that a new volume of the same size is a
rename and its first mount needs no mkfs.

Layout, under the backend's root::

    <root>/spares/<size>-<random>.img        a finished spare of <size> bytes
    <root>/spares/.<size>-<random>.img.tmp   a spare being made (or left by a crash)

A spare is made whole under its temporary name (sized, formatted, finished, checked,
fsync'd) and only then renamed into place, so a spare file is always complete; a
temporary file left by a crash is removed once it is old. Several backend objects (agents)
may share a root: ``take`` runs under the backend's exclusive lock, so each spare is
taken once. ``make`` runs outside it (it takes long) and may, racing another agent, leave
one spare more than asked.
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from typing import Callable, Optional

from pyflock.agent._fs import make_filesystem
from pyflock.common._files import fsync_path

#: Spares kept of the backend's default size: enough for a burst of new volumes while the
#: next ones are made (a 10 GiB spare takes about 4 MiB of disk).
DEFAULT_SPARES = 3

#: Seconds after which a spare's temporary file is taken as a crash's leftover.
STALE_TEMPORARY = 600.0

_SPARE = re.compile(r"^([0-9]+)-[0-9a-f]{32}\.img$")
_TEMPORARY = re.compile(r"^\.([0-9]+)-[0-9a-f]{32}\.img\.tmp$")


class SpareFiles:
    """The spare volume files in ``path`` (``<root>/spares``)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self.path = path
        self._clock = clock

    def sizes(self) -> dict[int, int]:
        """How many finished spares there are, by size."""
        counts: dict[int, int] = {}
        for size in map(spare_size, self._names()):
            if size is not None:
                counts[size] = counts.get(size, 0) + 1
        return counts

    def take(self, size: int, destination: str) -> bool:
        """
        Rename a finished spare of exactly ``size`` bytes to ``destination`` (in the same
        filesystem) and make that durable; whether there was one. Call it under the
        backend's exclusive lock.
        """
        for name in sorted(self._names()):
            if spare_size(name) != size or not _regular(os.path.join(self.path, name)):
                continue
            try:
                os.rename(os.path.join(self.path, name), destination)
            except FileNotFoundError:
                continue
            # One journal transaction holds both folders' entries: syncing the new one
            # makes the rename durable.
            fsync_path(os.path.dirname(destination), directory=True)
            return True
        return False

    def make(self, size: int) -> str:
        """Make one finished spare of ``size`` bytes (blocking: mkfs and debugfs); its path.
        The folder is made if missing, but not its parent (the backend's root)."""
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        name = f"{size}-{uuid.uuid4().hex}.img"
        temporary = os.path.join(self.path, f".{name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            make_filesystem(temporary)
            fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            path = os.path.join(self.path, name)
            os.rename(temporary, path)
        except BaseException:
            _unlink(temporary)
            raise
        fsync_path(self.path, directory=True)
        return path

    def top_up(self, size: int, count: int) -> int:
        """Make spares of ``size`` bytes until there are ``count``; how many it made."""
        self.remove_stale()
        made = 0
        while self.sizes().get(size, 0) < count:
            self.make(size)
            made += 1
        return made

    def remove_stale(self) -> list[str]:
        """Remove the temporary files older than ``STALE_TEMPORARY``; their paths."""
        removed = []
        for name in self._names():
            if not _TEMPORARY.match(name):
                continue
            path = os.path.join(self.path, name)
            try:
                if self._clock() - os.stat(path).st_mtime < STALE_TEMPORARY:
                    continue
            except FileNotFoundError:
                continue
            _unlink(path)
            removed.append(path)
        return removed

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except FileNotFoundError:
            return []


def _regular(path: str) -> bool:
    """Whether ``path`` is a regular file (a symbolic link is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def spare_size(name: str) -> Optional[int]:
    """The size of the finished spare file called ``name``, None if it is not one (pure)."""
    match = _SPARE.match(name)
    return int(match.group(1)) if match else None
