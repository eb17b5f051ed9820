"""
Sizes as people write them: binary units only (``10G`` is 10 GiB, ``500M`` is 500 MiB).

``parse_size`` turns ``"1.5G"``, ``"64MiB"``, ``"1tb"`` or ``"1073741824"`` into bytes;
``format_size`` writes bytes back in the shortest exact form, so that
``parse_size(format_size(n)) == n`` for every ``n >= 0``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024 ** 2,
    "g": 1024 ** 3,
    "t": 1024 ** 4,
}

_SIZE = re.compile(
    r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*"
    r"(?:(?P<unit>[kmgt])(?:ib?|b)?|b)?\s*$",
    re.IGNORECASE | re.ASCII,
)

#: Shown in every refusal so that the reader knows what to type instead.
SIZE_EXAMPLES = "10G, 1.5GiB, 500M, 64MiB, 1TB, 512K or a number of bytes like 1073741824"


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names (binary units), rounded up to a whole byte."""
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r} (use {SIZE_EXAMPLES})")
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use {SIZE_EXAMPLES})")
    unit = (match.group("unit") or "").lower()
    # Fraction keeps 1.1G exact, where a float would round it to the wrong byte.
    return math.ceil(Fraction(match.group("number")) * _UNITS[unit])


def format_size(size: int) -> str:
    """``size`` bytes in the largest unit that shows it exactly with at most two decimals."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"a size is a whole number of bytes >= 0, not {size!r}")
    for suffix in "TGMK":
        unit = _UNITS[suffix.lower()]
        if size >= unit and (size * 100) % unit == 0:
            hundredths = size * 100 // unit
            whole, fraction = divmod(hundredths, 100)
            if fraction == 0:
                return f"{whole}{suffix}"
            return f"{whole}.{fraction:02d}".rstrip("0") + suffix
    return str(size)
