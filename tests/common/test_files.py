"""Tests for ``pyflock.common._files``: atomic replacement and durable appends."""

import os
import stat

import pytest

from pyflock.common._files import (
    append_durably, fsync_path, replace_atomically, whole_lines, write_atomically,
)


def test_write_atomically(tmp_path):
    """The file holds the new content, mode 0600, and no temporary file is left."""
    path = tmp_path / "state.json"
    write_atomically(path, b"one")
    write_atomically(path, b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_named_temporary(tmp_path):
    """The temporary file may be named (hidden, say); it is gone afterwards."""
    path = tmp_path / "record.json"
    write_atomically(path, b"x", temporary=tmp_path / ".record.json.tmp")
    assert os.listdir(tmp_path) == ["record.json"]


def test_failure_keeps_old_content(tmp_path):
    """When the new content cannot be made, the old file stays and no temporary is left."""
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def broken(fd):
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        replace_atomically(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_replace_with_fill(tmp_path):
    """``replace_atomically`` makes the file from what ``fill`` does (a sparse size here)."""
    path = tmp_path / "volume.img"
    replace_atomically(path, lambda fd: os.ftruncate(fd, 1 << 20))
    assert os.stat(path).st_size == 1 << 20


def test_append_durably(tmp_path):
    """Appends go at the end and the new length is returned."""
    path = tmp_path / "log"
    write_atomically(path, b"head\n")
    assert append_durably(path, b"one\n") == 9
    assert append_durably(path, b"two\n") == 13
    assert path.read_bytes() == b"head\none\ntwo\n"


def test_append_cuts_torn_tail(tmp_path):
    """An append at an offset cuts off what followed it (a torn record)."""
    path = tmp_path / "log"
    write_atomically(path, b"head\nto")
    assert append_durably(path, b"two\n", at=5) == 9
    assert path.read_bytes() == b"head\ntwo\n"


def test_fsync_path(tmp_path):
    """Files and folders can be flushed; a missing one is an ``OSError``."""
    (tmp_path / "f").write_bytes(b"x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path, directory=True)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


def test_whole_lines():
    """An append log's whole lines with the offsets past them; a torn last line is left
    out."""
    assert list(whole_lines(b"base\none\ntwo\ntor")) == [
        (b"base", 5), (b"one", 9), (b"two", 13)]
    assert list(whole_lines(b"base\none\n", 5)) == [(b"one", 9)]
    assert list(whole_lines(b"")) == []


def _count_syncs(monkeypatch) -> list:
    """Record every fsync and fdatasync from here on (they still run)."""
    calls: list = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd, real=real, name=name):
            calls.append(name)
            return real(fd)
        monkeypatch.setattr(os, name, spy)
    return calls


def test_unsynced_writes_skip_every_fsync(tmp_path, monkeypatch):
    """``sync=False`` replaces and appends as before, with no fsync of file or folder."""
    calls = _count_syncs(monkeypatch)
    path = tmp_path / "record"
    write_atomically(path, b"one\n", sync=False)
    assert append_durably(path, b"two\n", sync=False) == 8
    assert path.read_bytes() == b"one\ntwo\n"
    assert calls == []
    write_atomically(path, b"three\n")
    append_durably(path, b"four\n")
    assert calls == ["fsync", "fsync", "fdatasync"]
