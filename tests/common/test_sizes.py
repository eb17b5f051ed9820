"""Tests for ``pyflock.common._sizes``: binary sizes parsed and formatted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflock.common._sizes import format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4


@pytest.mark.parametrize("text, size", [
    ("10G", 10 * GiB), ("10GB", 10 * GiB), ("10GiB", 10 * GiB), ("10Gi", 10 * GiB),
    ("10g", 10 * GiB), ("10gib", 10 * GiB), ("500M", 500 * MiB), ("64MiB", 64 * MiB),
    ("1TiB", TiB), ("2t", 2 * TiB), ("512K", 512 * KiB), ("512kb", 512 * KiB),
    ("1073741824", GiB), ("0", 0), ("100B", 100), (" 2 G ", 2 * GiB),
    ("1.5G", 3 * GiB // 2), (".5K", 512), ("1.", 1),
])
def test_parse(text, size):
    """Each accepted spelling names its binary size in bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text, size", [
    ("1.1G", 1181116007),   # 1.1 * 2**30 = 1181116006.4
    ("0.001K", 2),          # 1.024 bytes
    ("1.5", 2),
])
def test_parse_rounds_up(text, size):
    """A fractional byte count is rounded up, exactly (no float error)."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", " ", "G", "ten", "-1G", "1P", "1.5.5G", "1 G B", "1e9", "0x10", "10GG", "١٠G",
])
def test_parse_refuses(text):
    """Anything else is refused with a message showing accepted forms."""
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "10G" in str(info.value) and "500M" in str(info.value)


def test_parse_refuses_non_text():
    """A number that is not text is refused rather than guessed at."""
    with pytest.raises(ValueError):
        parse_size(10)


@pytest.mark.parametrize("size, text", [
    (10 * GiB, "10G"), (3 * GiB // 2, "1.5G"), (512 * MiB, "512M"), (TiB, "1T"),
    (1536 * GiB, "1.5T"), (64 * MiB, "64M"), (KiB, "1K"), (0, "0"), (1023, "1023"),
    (GiB + 1, "1073741825"), (5 * GiB // 4, "1.25G"), (MiB + 512 * KiB + 256 * KiB,
                                                        "1.75M"),
])
def test_format(size, text):
    """Sizes print in the largest unit that shows them exactly with two decimals."""
    assert format_size(size) == text


@pytest.mark.parametrize("size", [-1, 1.5, True, "10"])
def test_format_refuses(size):
    """Only whole non-negative byte counts can be formatted."""
    with pytest.raises(ValueError):
        format_size(size)


@given(st.integers(min_value=0, max_value=2 ** 64))
def test_round_trip(size):
    """Every size parses back from its formatted text to the same number of bytes."""
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10 ** 6),
       st.sampled_from([("K", KiB), ("MiB", MiB), ("gb", GiB), ("T", TiB)]))
def test_whole_units(number, unit):
    """A whole number of any unit is that many times the unit's bytes."""
    suffix, factor = unit
    assert parse_size(f"{number}{suffix}") == number * factor
