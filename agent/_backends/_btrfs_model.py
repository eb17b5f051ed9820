"""
The pure part of the ``btrfs`` backend: where things live in a pool, what ``btrfs
subvolume list`` and ``btrfs filesystem du`` say, the header pyflock puts before a ``btrfs
send`` stream, the check of a send stream before ``btrfs receive`` reads it, and the
errors a pool raises. No IO here; ``_btrfs`` runs the commands.

Layout of a pool (docs/backends.md, "btrfs")::

    datasets/<id>/size                  the dataset's size (its maximum_size), in bytes
    datasets/<id>/live                  the writable subvolume: the complete copy
    datasets/<id>/snapshots/<s>/<s>     read-only snapshot <s> (created here or received)
    staging/<random>/                   one empty folder per import, ``btrfs receive -C``
                                        runs in it; renamed to snapshots/<s> once checked

A snapshot sits in a folder of its own because a received subvolume is read-only and so
cannot itself be moved into place (its ``..`` would change): its folder is renamed instead.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from typing import Iterable, Optional

import attr

from pyflock.agent._backends._interface import BackendError
from pyflock.agent._backends._peer import BadStream
from pyflock.common._sizes import format_size

#: The label of every pool pyflock formats; a btrfs with another label is refused.
POOL_LABEL = "pyflock-pool"

#: The format of the header pyflock writes before a ``btrfs send`` stream.
STREAM_FORMAT = "pyflock-btrfs-stream-1"

#: The longest header line read before the send stream (bytes, newline included).
MAX_HEADER = 4096

DATASETS = "datasets"
STAGING = "staging"
LIVE = "live"
SNAPSHOTS = "snapshots"
SIZE_FILE = "size"

#: What commands' errors say when the pool is full.
NO_SPACE = "No space left on device"

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def is_snapshot_name(name: object) -> bool:
    """Whether ``name`` can name a snapshot (one path component, no dots first)."""
    return isinstance(name, str) and _SNAPSHOT_NAME.match(name) is not None


def dataset_folder(dataset_id: str) -> str:
    """The folder of a dataset, relative to the pool's root."""
    return f"{DATASETS}/{dataset_id}"


def live_path(dataset_id: str) -> str:
    """The writable subvolume of a dataset, relative to the pool's root."""
    return f"{DATASETS}/{dataset_id}/{LIVE}"


def snapshot_folder(dataset_id: str, name: str) -> str:
    """The folder holding snapshot ``name`` of a dataset, relative to the pool's root."""
    return f"{DATASETS}/{dataset_id}/{SNAPSHOTS}/{name}"


def snapshot_path(dataset_id: str, name: str) -> str:
    """The read-only subvolume of snapshot ``name``, relative to the pool's root."""
    return f"{snapshot_folder(dataset_id, name)}/{name}"


@attr.s(frozen=True, auto_attribs=True)
class Subvolume:
    """
    One line of ``btrfs subvolume list -q -R -u``: its id, path (relative to the pool's
    root), uuid, and the uuids of its origin (None when ``-``).
    """

    subvolume_id: int
    path: str
    uuid: str
    parent_uuid: Optional[str] = None
    received_uuid: Optional[str] = None

    @property
    def sent_uuid(self) -> str:
        """The uuid ``btrfs send`` names this subvolume by: its received uuid, else its own."""
        return self.received_uuid or self.uuid


_LIST_LINE = re.compile(
    r"ID (?P<id>\d+) .*?parent_uuid (?P<parent>\S+)\s+received_uuid (?P<received>\S+)\s+"
    r"uuid (?P<uuid>\S+) path (?P<path>.*)\Z")


def _uuid_or_none(text: str) -> Optional[str]:
    return None if text == "-" else text


def parse_subvolume_list(text: str) -> list[Subvolume]:
    """The subvolumes ``btrfs subvolume list -q -R -u <pool>`` printed, in its order."""
    subvolumes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LIST_LINE.match(line)
        if match is None:
            raise ValueError(f"unexpected line from btrfs subvolume list: {line!r}")
        path = match["path"]
        if path.startswith("<FS_TREE>/"):
            path = path[len("<FS_TREE>/"):]
        subvolumes.append(Subvolume(
            subvolume_id=int(match["id"]), path=path, uuid=match["uuid"],
            parent_uuid=_uuid_or_none(match["parent"]),
            received_uuid=_uuid_or_none(match["received"])))
    return subvolumes


@attr.s(frozen=True, auto_attribs=True)
class DatasetSubvolumes:
    """What a pool holds of one dataset: its live subvolume and its snapshots, oldest first."""

    dataset_id: str
    live: Optional[Subvolume] = None
    snapshots: tuple = ()

    @property
    def empty(self) -> bool:
        """Whether nothing of the dataset is there (a crash between its steps left a folder)."""
        return self.live is None and not self.snapshots

    def snapshot(self, name: str) -> Optional[Subvolume]:
        """Snapshot ``name``, or None."""
        return next((s for s in self.snapshots if snapshot_name(s) == name), None)


def snapshot_name(subvolume: Subvolume) -> str:
    """The name of a snapshot subvolume (the last part of its path)."""
    return subvolume.path.rsplit("/", 1)[-1]


def group_subvolumes(subvolumes: Iterable[Subvolume]) -> dict[str, DatasetSubvolumes]:
    """
    The pool's subvolumes by dataset id; snapshots oldest first (by subvolume id, which
    btrfs hands out in increasing order). Subvolumes elsewhere (staging) are left out.
    """
    live: dict[str, Subvolume] = {}
    snapshots: dict[str, list] = {}
    for subvolume in subvolumes:
        parts = subvolume.path.split("/")
        if len(parts) == 3 and parts[0] == DATASETS and parts[2] == LIVE:
            live[parts[1]] = subvolume
        elif (len(parts) == 5 and parts[0] == DATASETS and parts[2] == SNAPSHOTS
              and parts[3] == parts[4]):
            snapshots.setdefault(parts[1], []).append(subvolume)
    return {dataset_id: DatasetSubvolumes(
        dataset_id, live.get(dataset_id),
        tuple(sorted(snapshots.get(dataset_id, ()), key=lambda s: s.subvolume_id)))
        for dataset_id in sorted(set(live) | set(snapshots))}


def parse_du_total(text: str) -> int:
    """The total bytes of the one path ``btrfs filesystem du -s --raw`` was asked about."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].split() or lines[0].split()[0] != "Total":
        raise ValueError(f"unexpected output from btrfs filesystem du: {text!r}")
    return int(lines[-1].split()[0])


# -- the stream header -------------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class StreamHeader:
    """
    What pyflock says before a send stream: the dataset and its size, the snapshot the
    stream brings (``snapshot``, sent as uuid ``uuid``) and the one it starts from
    (``base`` and ``base_uuid``, None for a whole stream). The receiver checks the stream
    against it, and the received subvolume's ``received_uuid`` against ``uuid``.
    """

    dataset_id: str
    size: int
    snapshot: str
    uuid: str
    base: Optional[str] = None
    base_uuid: Optional[str] = None

    def encode(self) -> bytes:
        """The header as one JSON line."""
        return json.dumps({"format": STREAM_FORMAT, **attr.asdict(self)},
                          sort_keys=True).encode("utf-8") + b"\n"


def _check_uuid(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a uuid")
    return str(uuid.UUID(value))


def decode_header(line: bytes, dataset_id: str) -> StreamHeader:
    """The header in ``line``, checked to be for ``dataset_id``; ``BadStream`` if not."""
    try:
        if not line.endswith(b"\n"):
            raise ValueError("no header line")
        document = json.loads(line.decode("utf-8"))
        if not isinstance(document, dict) or document.pop("format", None) != STREAM_FORMAT:
            raise ValueError(f"not a {STREAM_FORMAT} stream")
        header = StreamHeader(**document)
        size = header.size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size {size!r}")
        if not is_snapshot_name(header.snapshot) or not (
                header.base is None or is_snapshot_name(header.base)):
            raise ValueError("a snapshot name is malformed")
        _check_uuid(header.uuid)
        if (header.base is None) != (header.base_uuid is None):
            raise ValueError("a base without its uuid, or a uuid without its base")
        if header.base_uuid is not None:
            _check_uuid(header.base_uuid)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise BadStream(f"the stream for dataset {dataset_id} is malformed: {e}") from None
    if header.dataset_id != dataset_id:
        raise BadStream(f"the stream is of dataset {header.dataset_id}, not {dataset_id}")
    return header


# -- checking a send stream before btrfs receive reads it --------------------------------

_MAGIC = b"btrfs-stream\0"
_STREAM_HEADER = struct.Struct("<13sI")
_COMMAND = struct.Struct("<IHI")
_TLV = struct.Struct("<HH")

# Commands and attributes of the send stream, version 1 (btrfs-progs send.h).
_SUBVOL, _SNAPSHOT, _CLONE, _END, _UPDATE_EXTENT = 1, 2, 16, 21, 22
_LAST_V1_COMMAND = 22
_UUID, _SIZE, _PATH, _PATH_TO, _CLONE_UUID, _CLONE_PATH = 1, 4, 15, 16, 20, 22
_U64 = struct.Struct("<Q")

#: The most file data one write command of a version-1 stream carries
#: (``BTRFS_SEND_READ_SIZE`` in the kernel's send.c).
SEND_WRITE_SIZE = 48 * 1024
_PATH_ATTRIBUTES = (_PATH, _PATH_TO, _CLONE_PATH)


def _unsafe_path(path: bytes) -> bool:
    """Whether a path of the stream could leave the subvolume it is received into."""
    return path.startswith(b"/") or b".." in path.split(b"/") or b"\0" in path


class _SendStreamCommands:
    """
    The framing of a version-1 ``btrfs send`` stream read as it passes: ``feed`` each
    piece; the stream's header is checked, and each whole command goes to ``_command``
    (its number and body), without a copy when a piece holds it whole.
    """

    def __init__(self) -> None:
        # The start of a command (or of the stream) whose end has not come yet.
        self._pending = bytearray()
        self._started = False
        self._ended = False

    def _bad(self, why: str) -> Exception:
        return ValueError(f"a btrfs send stream is malformed: {why}")

    def _needed(self) -> int:
        """How many bytes ``_pending`` must hold to be one whole unit."""
        if not self._started:
            return _STREAM_HEADER.size
        if len(self._pending) < _COMMAND.size:
            return _COMMAND.size
        return _COMMAND.size + _COMMAND.unpack_from(self._pending)[0]

    def feed(self, data: bytes) -> None:
        """Read the commands ``data`` completes; the subclass's error at a refused one."""
        view = memoryview(data)
        while view:
            if not self._started or self._pending:
                need = self._needed() - len(self._pending)
                self._pending += view[:need]
                view = view[need:]
                if len(self._pending) == self._needed():
                    self._unit(memoryview(self._pending))
                    self._pending = bytearray()
                continue
            offset = 0
            while len(view) - offset >= _COMMAND.size:
                length, command, _ = _COMMAND.unpack_from(view, offset)
                end = offset + _COMMAND.size + length
                if end > len(view):
                    break
                self._unit(view[offset:end])
                offset = end
            self._pending = bytearray(view[offset:])
            return

    def _unit(self, unit: memoryview) -> None:
        """The stream's header, or one whole command."""
        if not self._started:
            magic, version = _STREAM_HEADER.unpack_from(unit)
            if magic != _MAGIC or version != 1:
                raise self._bad("not a version-1 btrfs send stream")
            self._started = True
            return
        if self._ended:
            raise self._bad("data after the end of the stream")
        command = _COMMAND.unpack_from(unit)[1]
        self._command(command, unit[_COMMAND.size:])
        if command == _END:
            self._ended = True

    def _command(self, command: int, body: memoryview) -> None:
        raise NotImplementedError

    def _attributes(self, body: memoryview, kinds: tuple) -> dict:
        """The attributes of one command whose kind is in ``kinds`` (others skipped)."""
        found = {}
        offset = 0
        while offset < len(body):
            if len(body) - offset < _TLV.size:
                raise self._bad("a command is malformed")
            kind, length = _TLV.unpack_from(body, offset)
            offset += _TLV.size
            if offset + length > len(body):
                raise self._bad("a command is malformed")
            if kind in kinds:
                found[kind] = bytes(body[offset:offset + length])
            offset += length
        return found

    def _whole(self) -> bool:
        """Whether the stream so far is whole (ended, nothing after)."""
        return self._ended and not self._pending


class SendStreamChecker(_SendStreamCommands):
    """
    Checks a version-1 ``btrfs send`` stream as it passes (``feed`` each piece, then
    ``finish``) and raises ``BadStream`` at the first thing a stream from pyflock never
    holds: a path that is absolute or has a ``..`` part, a clone from a subvolume other
    than the one received and its base, a second subvolume, or one that is not the
    snapshot the header names. ``btrfs receive`` checks none of these.
    """

    def __init__(self, header: StreamHeader):
        super().__init__()
        self._header = header
        self._subvolume_seen = False

    def _bad(self, why: str) -> BadStream:
        return BadStream(f"the stream for dataset {self._header.dataset_id} is refused: {why}")

    def finish(self) -> None:
        """The stream ended: ``BadStream`` unless it was whole."""
        if not self._whole():
            raise self._bad("it is truncated")

    def _command(self, command: int, body: memoryview) -> None:
        if command == 0 or command > _LAST_V1_COMMAND:
            raise self._bad(f"unknown command {command}")
        attributes = self._attributes(body, (_UUID, _CLONE_UUID) + _PATH_ATTRIBUTES)
        for kind in _PATH_ATTRIBUTES:
            if kind in attributes and _unsafe_path(attributes[kind]):
                raise self._bad(f"path {attributes[kind]!r} leaves the dataset")
        if command in (_SUBVOL, _SNAPSHOT):
            self._subvolume(command, attributes)
        elif not self._subvolume_seen:
            raise self._bad("it does not start with a subvolume")
        if command == _CLONE:
            source = self._uuid(attributes.get(_CLONE_UUID))
            if source not in (self._header.uuid, self._header.base_uuid):
                raise self._bad(f"it clones from subvolume {source}, "
                                f"neither the dataset nor its base")

    def _subvolume(self, command: int, attributes: dict) -> None:
        if self._subvolume_seen:
            raise self._bad("it holds more than one subvolume")
        self._subvolume_seen = True
        name = bytes(attributes.get(_PATH, b""))
        if name != self._header.snapshot.encode():
            raise self._bad(f"its subvolume is {name!r}, not {self._header.snapshot!r}")
        if self._uuid(attributes.get(_UUID)) != self._header.uuid:
            raise self._bad("its subvolume's uuid is not the one announced")
        if (command == _SNAPSHOT) != (self._header.base is not None):
            raise self._bad("whole or incremental, it is not what its header says")
        if command == _SNAPSHOT and \
                self._uuid(attributes.get(_CLONE_UUID)) != self._header.base_uuid:
            raise self._bad("its base is not the one announced")

    def _uuid(self, raw: Optional[bytes]) -> Optional[str]:
        if raw is None or len(raw) != 16:
            raise self._bad("a uuid is missing or malformed")
        return str(uuid.UUID(bytes=bytes(raw)))


class StreamSizeEstimate(_SendStreamCommands):
    """
    The size of a ``btrfs send`` stream worked out from the ``btrfs send --no-data`` of
    the same snapshots (``feed`` its pieces, then ``size()``): the same commands, except
    that each range of file data is one ``update_extent`` command with its length instead
    of write commands of at most ``SEND_WRITE_SIZE`` bytes, each carrying its path, offset
    and data. Exact but for ranges the kernel splits otherwise (measured on 6.18: exact).
    """

    def __init__(self) -> None:
        super().__init__()
        self._bytes = 0

    def feed(self, data: bytes) -> None:
        """Count a piece of the ``--no-data`` stream."""
        self._bytes += len(data)
        super().feed(data)

    def _command(self, command: int, body: memoryview) -> None:
        if command != _UPDATE_EXTENT:
            return
        found = self._attributes(body, (_PATH, _SIZE))
        if _PATH not in found or len(found.get(_SIZE, b"")) != _U64.size:
            raise self._bad("an update_extent command has no path or size")
        (length,) = _U64.unpack(found[_SIZE])
        writes = -(-length // SEND_WRITE_SIZE)
        # Each write: the command's head, then path, offset and data as attributes.
        per_write = _COMMAND.size + 3 * _TLV.size + len(found[_PATH]) + _U64.size
        self._bytes += writes * per_write + length - (_COMMAND.size + len(body))

    def size(self) -> int:
        """The estimated bytes of the stream with its data; ``ValueError`` if cut short."""
        if not self._whole():
            raise self._bad("it is truncated")
        return self._bytes


# -- errors ------------------------------------------------------------------------------

class PoolRefused(BackendError):
    """``pool_path`` cannot be a pool: it holds another filesystem or data, or is missing."""

    def __init__(self, pool_path: str, reason: str):
        super().__init__(pool_path, reason)
        self.pool_path, self.reason = pool_path, reason

    def __str__(self) -> str:
        return f"dataset.pool_path {self.pool_path} cannot be a btrfs pool: {self.reason}"


@attr.s(frozen=True, auto_attribs=True)
class Holder:
    """Space a dataset's copy takes in the pool: its live data and snapshots, in bytes."""

    dataset_id: str
    used: int


class PoolFull(BackendError):
    """
    The pool has no space left (ENOSPC) for ``dataset_id``; ``holders`` says which
    datasets take the space, largest first.
    """

    def __init__(self, dataset_id: str, pool_path: str, holders: tuple = ()):
        super().__init__(dataset_id, pool_path, holders)
        self.dataset_id, self.pool_path, self.holders = dataset_id, pool_path, holders

    def __str__(self) -> str:
        largest = ", ".join(f"{h.dataset_id} {format_size(h.used)}" for h in self.holders[:5])
        return (f"the btrfs pool {self.pool_path} is full: no space left for dataset "
                f"{self.dataset_id}" + (f"; the most space is held by {largest}"
                                        if largest else "") +
                "; destroy datasets, or grow the pool (btrfs filesystem resize)")


def largest_first(holders: Iterable[Holder]) -> tuple:
    """``holders`` sorted by the space they take, largest first."""
    return tuple(sorted(holders, key=lambda h: (-h.used, h.dataset_id)))
