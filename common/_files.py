"""
Durable file writes, the one place pyflock fsyncs (or, for what a power loss takes away
anyway, deliberately does not: ``sync=False``): replace a file atomically
(``write_atomically``, ``replace_atomically``), append to one durably (``append_durably``)
and read such an append log back (``whole_lines``), and fsync a file or a folder
(``fsync_path``). Everything here that touches a file blocks: call it in a thread
(``pyflock.common._threads``), never on the reactor.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Union

Path = Union[str, "os.PathLike[str]"]


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory`` a folder and so its entries) to disk."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_atomically(path: Path, fill: Callable[[int], None],
                       temporary: Optional[Path] = None, mode: int = 0o600,
                       sync: bool = True) -> None:
    """
    Replace the file at ``path`` with what ``fill(fd)`` writes into a new file, so that a
    crash leaves either the old or the new file: ``fill`` the file ``temporary`` (default
    ``<path>.tmp``, same folder; created anew with ``O_EXCL|O_NOFOLLOW``), fsync it, rename it over ``path``, fsync the folder. On
    failure the temporary file is removed and the error raised.

    With ``sync=False``, no fsync: the replacement is still atomic and every process sees
    it at once, so a crash of the writer loses nothing, but a power loss may. Only for
    what a power loss takes away anyway (a record of a loop device, a count of mounts).
    """
    path = os.fspath(path)
    temporary = f"{path}.tmp" if temporary is None else os.fspath(temporary)
    # A new file, never one found there: a crash's leftover is removed, and a symbolic
    # link planted under the name is neither followed nor written through.
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, mode)
    try:
        try:
            fill(fd)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if sync:
        # The rename is durable only once the folder is.
        fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def write_atomically(path: Path, data: bytes, temporary: Optional[Path] = None,
                     mode: int = 0o600, sync: bool = True) -> None:
    """Replace the file at ``path`` with ``data`` (``replace_atomically``)."""
    replace_atomically(path, lambda fd: _write_all(fd, data), temporary, mode, sync)


def append_durably(path: Path, data: bytes, at: Optional[int] = None,
                   sync: bool = True) -> int:
    """
    Write ``data`` at the end of the existing file ``path`` (or at offset ``at``, cutting
    off what follows: a torn tail left by a crash) and fsync it; returns the file's new
    length. A crash leaves a prefix of ``data`` at most, so a reader must recognise a torn
    last record. ``sync=False`` skips the fsync, as ``replace_atomically``'s does.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        end = os.lseek(fd, 0, os.SEEK_END) if at is None else at
        if at is not None:
            os.ftruncate(fd, at)
        os.lseek(fd, end, os.SEEK_SET)
        _write_all(fd, data)
        if sync:
            # fdatasync flushes the new size with the data: the append is readable after
            # a crash, and the folder entry did not change.
            os.fdatasync(fd)
        return end + len(data)
    finally:
        os.close(fd)


def whole_lines(content: bytes, start: int = 0) -> Iterator[tuple[bytes, int]]:
    """
    Each whole line of an append log's ``content`` from offset ``start``, without its
    newline, with the offset just past it; a last line without its newline (torn by a
    crash in ``append_durably``) is left out. Pure. A reader stops at the first line it
    cannot use and appends again at the offset before it (``append_durably``'s ``at``).
    """
    while start < len(content):
        end = content.find(b"\n", start)
        if end < 0:
            return
        yield content[start:end], end + 1
        start = end + 1


__all__ = ["append_durably", "fsync_path", "replace_atomically", "whole_lines",
           "write_atomically"]
