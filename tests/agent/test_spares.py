"""Tests for the loopback backend's spare volume files (``pyflock.agent._backends._spares``)."""

import os

import pytest

from pyflock.agent._backends._spares import STALE_TEMPORARY, SpareFiles, spare_size
from pyflock.agent._fs import filesystem_type, finished_ext4_root, root_entries

SIZE = 64 * 1024 * 1024
KEY = "0123456789abcdef0123456789abcdef"


def _spare(folder, size: int, key: str = KEY, temporary: bool = False) -> str:
    """Put a (fake) spare file of ``size`` named as ``SpareFiles`` names them."""
    os.makedirs(folder, exist_ok=True)
    name = f".{size}-{key}.img.tmp" if temporary else f"{size}-{key}.img"
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_spare_size():
    """Only a finished spare's name gives a size; temporaries and others give None."""
    assert [SIZE, None, None, None] == [
        spare_size(f"{SIZE}-{KEY}.img"), spare_size(f".{SIZE}-{KEY}.img.tmp"),
        spare_size("lock"), spare_size(f"{SIZE}-{KEY}.img.bak")]


def test_sizes_count_finished_spares_only(tmp_path):
    """``sizes`` counts finished spares by size, not files being made; none if no folder."""
    spares = SpareFiles(str(tmp_path / "spares"))
    assert {} == spares.sizes()
    _spare(spares.path, SIZE)
    _spare(spares.path, SIZE, KEY.replace("0", "1"))
    _spare(spares.path, 2 * SIZE)
    _spare(spares.path, SIZE, KEY.replace("0", "2"), temporary=True)
    assert {SIZE: 2, 2 * SIZE: 1} == spares.sizes()


def test_take_renames_a_spare_of_the_size_only(tmp_path):
    """A spare is taken only when its size is the one asked: it becomes the destination."""
    spares = SpareFiles(str(tmp_path / "spares"))
    _spare(spares.path, 2 * SIZE)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    destination = str(volumes / "v.img")
    assert not spares.take(SIZE, destination)
    assert not os.path.exists(destination)
    _spare(spares.path, SIZE, KEY.replace("0", "1"))
    assert spares.take(SIZE, destination)
    assert (SIZE, {2 * SIZE: 1}) == (os.stat(destination).st_size, spares.sizes())


def test_take_never_takes_a_spare_being_made(tmp_path):
    """A temporary (half-made) spare is never taken."""
    spares = SpareFiles(str(tmp_path / "spares"))
    _spare(spares.path, SIZE, temporary=True)
    assert not spares.take(SIZE, str(tmp_path / "v.img"))


def test_remove_stale_removes_old_temporaries_only(tmp_path):
    """Temporaries older than ``STALE_TEMPORARY`` go; young ones and spares stay."""
    now = [1_000_000.0]
    spares = SpareFiles(str(tmp_path / "spares"), clock=lambda: now[0])
    old = _spare(spares.path, SIZE, temporary=True)
    young = _spare(spares.path, SIZE, KEY.replace("0", "1"), temporary=True)
    finished = _spare(spares.path, SIZE, KEY.replace("0", "2"))
    for path in (old, young, finished):
        os.utime(path, (now[0] - STALE_TEMPORARY - 1, now[0] - STALE_TEMPORARY - 1))
    os.utime(young, (now[0] - 1, now[0] - 1))
    assert [old] == spares.remove_stale()
    assert sorted([young, finished]) == sorted(
        os.path.join(spares.path, n) for n in os.listdir(spares.path))


@pytest.mark.integration
def test_make_gives_a_finished_empty_ext4_of_the_size(tmp_path):
    """A made spare is an ext4 of exactly its size, root empty (no lost+found), mode
    0777, and nothing is left under a temporary name."""
    spares = SpareFiles(str(tmp_path / "spares"))
    path = spares.make(SIZE)
    assert os.listdir(spares.path) == [os.path.basename(path)]
    assert (SIZE, "ext4", 0o40777) == (os.stat(path).st_size, filesystem_type(path),
                                       finished_ext4_root(path))
    assert ((".", 0o40777), ("..", 0o40777)) == root_entries(path)


@pytest.mark.integration
def test_top_up_makes_only_what_is_missing(tmp_path):
    """``top_up`` makes spares until there are as many as asked, and no more."""
    spares = SpareFiles(str(tmp_path / "spares"))
    _spare(spares.path, SIZE)
    assert (1, {SIZE: 2}) == (spares.top_up(SIZE, 2), spares.sizes())
    assert (0, {SIZE: 2}) == (spares.top_up(SIZE, 2), spares.sizes())


@pytest.mark.integration
def test_failed_make_leaves_nothing(tmp_path):
    """A spare whose mkfs fails (too small for ext4) leaves no file behind."""
    spares = SpareFiles(str(tmp_path / "spares"))
    with pytest.raises(Exception):
        spares.make(4096)
    assert [] == os.listdir(spares.path)


@pytest.mark.integration
def test_a_large_spare_writes_little(tmp_path):
    """A 10 GiB spare takes less than 1 MiB of disk (no blocks reserved for growth), so
    making one puts little on the disk the containers use."""
    path = SpareFiles(str(tmp_path / "spares")).make(10 * 1024 ** 3)
    assert os.stat(path).st_blocks * 512 < 1024 ** 2
