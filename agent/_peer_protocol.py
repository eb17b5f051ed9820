"""
The peer transfer protocol's pure core: its messages, framing and bandwidth limit (no IO;
``pyflock.agent._peer_service`` is the Twisted shell).

One round of a move is one TLS connection to the sender's peer port:

1. The receiver sends a request, one JSON line: ``{"version": 1, "dataset_id": ...,
   "phase": 1 or 2, "snapshots": [the receiver's snapshots, oldest first]}``.
2. The sender answers one JSON line: ``{"base": the newest common snapshot or null,
   "estimate": bytes or null}``, or ``{"error": "why"}`` and closes.
3. The stream follows in frames: a 4-byte big-endian length, then that many bytes; a
   frame of length 0 ends it. A connection closed before that frame is a broken round,
   and the receiver discards what it got.
"""

from __future__ import annotations

import json
import struct
from typing import Optional

import attr

#: The protocol version a request carries.
PROTOCOL_VERSION = 1

#: The longest request or answer line, in bytes (a request lists snapshot names).
MAX_LINE = 64 * 1024

#: The largest frame a sender makes and a receiver accepts.
MAX_FRAME = 256 * 1024

_LENGTH = struct.Struct(">I")

#: The frame ending a stream.
END_FRAME = _LENGTH.pack(0)


class ProtocolError(Exception):
    """The peer broke the protocol; the text says how."""


@attr.s(frozen=True, auto_attribs=True)
class SendRequest:
    """A receiver's request for one round: the dataset, the phase, its snapshots."""

    dataset_id: str
    phase: int
    snapshots: tuple = ()

    def to_line(self) -> bytes:
        """The request as one JSON line."""
        return _line({"version": PROTOCOL_VERSION, "dataset_id": self.dataset_id,
                      "phase": self.phase, "snapshots": list(self.snapshots)})


@attr.s(frozen=True, auto_attribs=True)
class SendAnswer:
    """The sender's answer: the stream's base and estimated size, or why it refuses."""

    base: Optional[str] = None
    estimate: Optional[int] = None
    error: Optional[str] = None

    def to_line(self) -> bytes:
        """The answer as one JSON line."""
        if self.error is not None:
            return _line({"error": self.error})
        return _line({"base": self.base, "estimate": self.estimate})


def _line(obj: dict) -> bytes:
    """``obj`` as one JSON line."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def _json_line(line: bytes, what: str) -> dict:
    """A JSON object line, or ``ProtocolError`` naming ``what`` it should have been."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"the {what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the {what} is not a JSON object")
    return obj


def _optional(obj: dict, key: str, kind: type, what: str):
    """``obj[key]``, None or of ``kind`` (never a bool for int)."""
    value = obj.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ProtocolError(f"the {what}'s {key} is not a {kind.__name__}")
    return value


def parse_request(line: bytes) -> SendRequest:
    """A request line as a ``SendRequest``; ``ProtocolError`` saying what is wrong."""
    obj = _json_line(line, "request")
    if obj.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"the request is of protocol version {obj.get('version')!r}; "
                            f"this node speaks {PROTOCOL_VERSION}: upgrade both nodes")
    dataset_id = obj.get("dataset_id")
    snapshots = obj.get("snapshots", [])
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ProtocolError("the request names no dataset_id")
    if obj.get("phase") not in (1, 2):
        raise ProtocolError("the request's phase is not 1 or 2")
    if not isinstance(snapshots, list) or not all(isinstance(s, str) for s in snapshots):
        raise ProtocolError("the request's snapshots are not a list of names")
    return SendRequest(dataset_id, obj["phase"], tuple(snapshots))


def parse_answer(line: bytes) -> SendAnswer:
    """An answer line as a ``SendAnswer``; ``ProtocolError`` saying what is wrong."""
    obj = _json_line(line, "answer")
    error = _optional(obj, "error", str, "answer")
    if error is not None:
        return SendAnswer(error=error)
    return SendAnswer(base=_optional(obj, "base", str, "answer"),
                      estimate=_optional(obj, "estimate", int, "answer"))


def framed(data) -> bytearray:
    """``data`` (any bytes-like object) as frames of at most ``MAX_FRAME`` bytes, each
    after its length, in one buffer: each byte is copied once."""
    view = memoryview(data)
    count = -(-len(view) // MAX_FRAME)
    out = bytearray(len(view) + count * _LENGTH.size)
    at = 0
    for start in range(0, len(view), MAX_FRAME):
        chunk = view[start:start + MAX_FRAME]
        _LENGTH.pack_into(out, at, len(chunk))
        out[at + _LENGTH.size:at + _LENGTH.size + len(chunk)] = chunk
        at += _LENGTH.size + len(chunk)
    return out


class Decoder:
    """
    The receiving side's parser: ``feed(data)`` returns what arrived, in order: first
    the answer line (``bytes``, once), then the stream's bytes as they come (memoryviews
    of ``data``, never copied: a frame cut by the network comes in several pieces), then
    ``None`` when the stream has ended. ``ProtocolError`` for an over-long line or frame,
    or data after the end.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._answered = False
        self._length = bytearray()      # a frame's length, while it comes in pieces
        self._remaining = 0             # the bytes of the current frame still to come
        self._ended = False

    def feed(self, data) -> list:
        """What ``data`` completes, in order (see the class)."""
        view = memoryview(data)
        out: list = []
        at = 0
        if not self._answered:
            end = bytes(view[:MAX_LINE + 1]).find(b"\n")
            if end < 0:
                self._line += view
                if len(self._line) > MAX_LINE:
                    raise ProtocolError("the answer line is too long")
                return out
            self._line += view[:end]
            if len(self._line) > MAX_LINE:
                raise ProtocolError("the answer line is too long")
            out.append(bytes(self._line))
            self._answered, at = True, end + 1
        while at < len(view):
            if self._ended:
                raise ProtocolError("data after the end of the stream")
            if self._remaining:
                piece = view[at:at + self._remaining]
                out.append(piece)
                at += len(piece)
                self._remaining -= len(piece)
                continue
            need = _LENGTH.size - len(self._length)
            self._length += view[at:at + need]
            at += need
            if len(self._length) < _LENGTH.size:
                break
            (length,) = _LENGTH.unpack(self._length)
            self._length.clear()
            if length > MAX_FRAME:
                raise ProtocolError(f"a frame of {length} bytes is over {MAX_FRAME}")
            if length == 0:
                self._ended = True
                out.append(None)
            self._remaining = length
        return out


@attr.s(frozen=True, auto_attribs=True)
class Throttle:
    """
    A bandwidth limit as a token bucket: ``rate`` bytes per second (None: no limit),
    ``burst`` bytes at once; ``available`` bytes may go at time ``at`` without waiting.
    """

    rate: Optional[float] = None
    burst: int = MAX_FRAME * 4
    available: float = 0.0
    at: Optional[float] = None

    def take(self, now: float, nbytes: int) -> tuple["Throttle", float]:
        """The bucket after sending ``nbytes`` at ``now``, and the seconds to wait first."""
        if self.rate is None:
            return self, 0.0
        available = self.burst if self.at is None else min(
            self.burst, self.available + (now - self.at) * self.rate)
        available -= nbytes
        wait = 0.0 if available >= 0 else -available / self.rate
        return attr.evolve(self, available=available, at=now), wait


__all__ = [
    "Decoder", "END_FRAME", "MAX_FRAME", "MAX_LINE", "PROTOCOL_VERSION", "ProtocolError",
    "SendAnswer", "SendRequest", "Throttle", "framed", "parse_answer", "parse_request",
]
