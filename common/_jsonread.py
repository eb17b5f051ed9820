"""
Reading decoded JSON with every field checked: the codecs of ``pyflock.common._records``,
the agent channel's messages and the control service client all read through these, so a
malformed value is refused with one kind of error (``Malformed``) saying where it is and
what is wrong, never with a ``KeyError`` or ``TypeError`` from deep inside.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Optional
from uuid import UUID

from pyflock.common._limits import MAXIMUM_HOST_NAME, MAXIMUM_TEXT


class Malformed(ValueError):
    """A JSON value is not the shape expected; the text says where and what is wrong."""


#: ``read``'s default for a field that must be present.
REQUIRED: Any = object()

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "an array"}


def _kind_names(kinds: tuple) -> str:
    return " or ".join(dict.fromkeys(_KIND_NAMES[k] for k in kinds))


def read(obj: dict, key: str, kinds: tuple, where: str, optional: bool = False,
         default: Any = REQUIRED) -> Any:
    """
    ``obj[key]``, which must be one of ``kinds`` (or null if ``optional``); a missing key
    gives ``default`` when one is given. Texts are at most ``MAXIMUM_TEXT`` characters and
    numbers finite.
    """
    if key not in obj:
        if default is REQUIRED:
            raise Malformed(f"{where} lacks {key!r}")
        return default
    value = obj[key]
    if value is None and optional:
        return None
    # JSON true/false are Python bools, which are also ints: never accept them as numbers.
    if isinstance(value, bool) and bool not in kinds:
        raise Malformed(f"{where}.{key} must be {_kind_names(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise Malformed(f"{where}.{key} must be {_kind_names(kinds)}"
                        f"{' or null' if optional else ''}, not {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAXIMUM_TEXT:
        raise Malformed(f"{where}.{key} is longer than {MAXIMUM_TEXT} characters")
    if isinstance(value, float) and not math.isfinite(value):
        raise Malformed(f"{where}.{key} must be a finite number")
    return value


def as_object(value: Any, where: str) -> dict:
    """``value`` if it is a JSON object, else ``Malformed``."""
    if not isinstance(value, dict):
        raise Malformed(f"{where} must be an object, not {type(value).__name__}")
    return value


def uuid_value(value: Any, where: str) -> str:
    """``value`` if it is a UUID in canonical lower-case form, else ``Malformed``."""
    try:
        canonical = str(UUID(value)) if isinstance(value, str) else None
    except ValueError:
        canonical = None
    if canonical != value:
        raise Malformed(f"{where} must be a lower-case UUID (8-4-4-4-12), not {value!r}")
    return value


def read_uuid(obj: dict, key: str, where: str) -> str:
    """``obj[key]``, a lower-case UUID."""
    return uuid_value(read(obj, key, (str,), where), f"{where}.{key}")


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_host(text: str) -> bool:
    """Whether ``text`` is an IP address (v4 or v6) or a host name (RFC 1123)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    # A name whose last label is a number would be a malformed IPv4 address.
    return (0 < len(name) <= MAXIMUM_HOST_NAME and not name.rsplit(".", 1)[-1].isdigit()
            and all(_HOST_LABEL.fullmatch(label) for label in name.split(".")))


def read_host(obj: dict, key: str, where: str) -> str:
    """``obj[key]``, an IP address or a host name."""
    value = read(obj, key, (str,), where)
    if not is_host(value):
        raise Malformed(f"{where}.{key} must be an IP address or a host name, not "
                        f"{value[:80]!r}")
    return value


def read_natural(obj: dict, key: str, where: str, optional: bool = False, low: int = 0,
                 high: Optional[int] = None, default: Any = REQUIRED) -> Optional[int]:
    """``obj[key]``, an integer from ``low`` to ``high`` (None: no upper bound)."""
    value = read(obj, key, (int,), where, optional, default)
    if value is not None and (value < low or (high is not None and value > high)):
        raise Malformed(f"{where}.{key} must be between {low} and {high or 'any'}, "
                        f"not {value}")
    return value


def read_port(obj: dict, key: str, where: str) -> Optional[int]:
    """``obj[key]``, a TCP port number (1 to 65535) or null."""
    return read_natural(obj, key, where, optional=True, low=1, high=65535)


def read_number(obj: dict, key: str, where: str, optional: bool = False, low: float = 0,
                high: Optional[float] = None, default: Any = REQUIRED) -> Optional[float]:
    """``obj[key]``, a number from ``low`` to ``high`` (None: any that fits a float), as a
    float."""
    value = read(obj, key, (int, float), where, optional, default)
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if number < low or (high is not None and number > high) or not math.isfinite(number):
        raise Malformed(f"{where}.{key} must be a number between {low} and "
                        f"{high if high is not None else 'any'}, not {value}")
    return number


def read_list(obj: dict, key: str, where: str, default: Any = REQUIRED) -> list:
    """``obj[key]``, a JSON array."""
    return read(obj, key, (list,), where, default=default)


def unique(items: tuple, key: Callable[[Any], Any], where: str) -> tuple:
    """``items`` if no two share a ``key``, else ``Malformed`` naming the repeated one."""
    seen = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise Malformed(f"{where} names {k} twice")
        seen.add(k)
    return items


__all__ = ["Malformed", "REQUIRED", "as_object", "is_host", "read", "read_host", "read_list",
           "read_natural", "read_number", "read_port", "read_uuid", "unique", "uuid_value"]
