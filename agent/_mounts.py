"""
The Docker plugin's mount counts: how many times dockerd mounted each volume, per Mount ID.

dockerd sends ``Mount(name, ID)`` and ``Unmount(name, ID)``; the ID is per mount point and
``docker cp`` into a running container sends ``Mount(X)`` then ``Unmount(X)`` for an ``X``
that is already mounted, so each ``(name, ID)`` has a *counter*, not a presence bit
(notes/docker-plugin-protocol.md §6). ``MountTable`` is the pure value; ``MountCounts``
keeps the current table and saves every change durably in a thread, so that counts survive
agent restarts (dockerd sends no new ``Activate`` to a restarted plugin).

The file is a log of JSON lines, as the agent's view file is: a base (the whole table,
``{"version": 2, "volumes": ...}``), then one line per volume changed since, its new entry
(``{"volume": NAME, "dataset_id": ..., "mounts": {...}}``, no mounts: none left), appended
(``append_durably`` with ``sync=False``), so that a Mount or Unmount costs one small write
instead of a rewrite, a rename and a folder fsync. A change is acknowledged to dockerd only
once its line is in the file, so a count dockerd was told survives ``kill -9`` of the agent.
The appends are not fsynced: a power loss or kernel crash that could lose one also ends
every mount and container, and the counts are then corrected from what runs (below)
before they matter.
Reconciling and settling rewrite the base (atomically), and so does a save once the
appended lines outweigh it. A crash in the middle of an append leaves a torn last line,
which reading ignores (that change was never acknowledged) and the next append cuts off.
Version 1 files (the whole table as one JSON document) are read, and replaced by a base at
the first change.

After a restart, ``MountTable.reconcile`` corrects the counts with the mounts that running
containers really hold (``docker_volume_mounts`` reads them from Docker's
``GET /containers/json``): a crash of dockerd sends no Unmounts, and a crash of the agent
may lose the last change. A dockerd that starts again while the agent runs (its Activate)
makes the plugin ``settle`` the counts the same way once that dockerd answers, trusting
the mount IDs it has mounted since; and the first Mount of an ID counted under the
previous dockerd (a restarted container keeps its IDs) counts it once (``remount``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional

import attr
from pyrsistent import PMap, pmap
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.common._files import append_durably, whole_lines, write_atomically
from pyflock.common._logging import log_event
from pyflock.common._threads import RunBlocking
_log = Logger()

#: Version of the file's layout: 2, a base line and a line per change (see above).
FORMAT_VERSION = 2

#: The versions read: 1 is the whole table as one (indented) JSON document.
READABLE_VERSIONS = (1, 2)

#: Appended lines smaller than this (bytes) are never compacted into a new base.
COMPACT_AFTER = 64 * 1024

#: Mount IDs made up by ``reconcile`` for mounts whose real ID is unknown; dockerd's IDs
#: are 64 hex digits, so these never collide with them.
RECONCILED_PREFIX = "reconciled:"


class MountsWriteError(Exception):
    """The mount counts could not be written to disk; the message names the file and why."""


@attr.s(frozen=True, auto_attribs=True)
class VolumeMounts:
    """One volume's mounts here: its dataset and a counter per Mount ID (all > 0)."""

    dataset_id: Optional[str] = None
    mounts: PMap = attr.ib(default=pmap(), converter=pmap)

    @property
    def count(self) -> int:
        """The number of mounts not yet unmounted, over all Mount IDs."""
        return sum(self.mounts.values())


def _volumes(value: Any) -> PMap:
    return pmap(value)


@attr.s(frozen=True, auto_attribs=True)
class MountTable:
    """Every volume's mounts on this node, by volume name; volumes with no mount are absent."""

    volumes: PMap = attr.ib(default=pmap(), converter=_volumes)

    def count(self, name: str) -> int:
        """How many mounts of volume ``name`` are live here (0 if none)."""
        volume = self.volumes.get(name)
        return 0 if volume is None else volume.count

    def mount_count(self, name: str, mount_id: str) -> int:
        """How many times ``mount_id`` of volume ``name`` is mounted (0 if not)."""
        volume = self.volumes.get(name)
        return 0 if volume is None else volume.mounts.get(mount_id, 0)

    def dataset_id(self, name: str) -> Optional[str]:
        """The dataset that volume ``name`` was mounted as, if it is mounted here."""
        volume = self.volumes.get(name)
        return None if volume is None else volume.dataset_id

    def in_use(self) -> PMap:
        """Dataset id (None if unknown) by name, for every volume with a mount here."""
        return pmap({name: v.dataset_id for name, v in self.volumes.items()})

    def mount(self, name: str, mount_id: str, dataset_id: Optional[str]) -> "MountTable":
        """One more mount of ``mount_id`` of volume ``name``, which is ``dataset_id``."""
        volume = self.volumes.get(name, VolumeMounts())
        volume = VolumeMounts(dataset_id=dataset_id or volume.dataset_id,
                              mounts=volume.mounts.set(
                                  mount_id, volume.mounts.get(mount_id, 0) + 1))
        return MountTable(self.volumes.set(name, volume))

    def unmount(self, name: str, mount_id: str) -> "MountTable":
        """
        One mount fewer of ``mount_id`` of volume ``name``. An unknown ID consumes a mount
        that ``reconcile`` recorded without its ID; otherwise it changes nothing.
        """
        volume = self.volumes.get(name)
        if volume is None:
            return self
        if mount_id not in volume.mounts:
            made_up = sorted(k for k in volume.mounts if k.startswith(RECONCILED_PREFIX))
            if not made_up:
                return self
            mount_id = made_up[0]
        left = volume.mounts[mount_id] - 1
        mounts = volume.mounts.set(mount_id, left) if left > 0 else \
            volume.mounts.remove(mount_id)
        if not mounts:
            return MountTable(self.volumes.remove(name))
        return MountTable(self.volumes.set(name, attr.evolve(volume, mounts=mounts)))

    def remount(self, name: str, mount_id: str, dataset_id: Optional[str]) -> "MountTable":
        """
        ``mount_id`` of volume ``name`` mounted once, whatever its count was: a new dockerd
        mounting an ID the previous one left counted (it reuses a restarted container's
        mount IDs, and a crashed dockerd sent no Unmount for them).
        """
        volume = self.volumes.get(name, VolumeMounts())
        return MountTable(self.volumes.set(name, VolumeMounts(
            dataset_id=dataset_id or volume.dataset_id,
            mounts=volume.mounts.set(mount_id, 1))))

    def forget(self, name: str) -> "MountTable":
        """The table without any mount of volume ``name``."""
        return MountTable(self.volumes.discard(name))

    def settle(self, in_use: Mapping[str, int],
               confirmed: Iterable[tuple[str, str]]) -> "MountTable":
        """
        The table corrected by ``in_use`` (as ``reconcile``) after dockerd restarted:
        ``confirmed`` are the ``(name, mount ID)`` the new dockerd has mounted, whose counts
        are right and kept; the other IDs were counted under the previous dockerd, and a
        volume keeps only as many of those mounts (one each) as its running containers'
        mount points exceed its confirmed IDs, so a crashed dockerd's mounts do not keep
        the volume in use (and leased) forever. Which of those IDs are still mounted cannot
        be told, so made-up IDs (``RECONCILED_PREFIX``) stand for the mounts kept, and the
        Unmounts of the real ones consume them.
        """
        confirmed = set(confirmed)
        volumes = {}
        for name in set(in_use) | set(self.volumes):
            wanted = max(0, in_use.get(name, 0))
            volume = self.volumes.get(name, VolumeMounts())
            # A confirmed mount is kept even if ``in_use`` (read a moment earlier) does
            # not show its container yet.
            mounts = {k: n for k, n in volume.mounts.items() if (name, k) in confirmed}
            # ``in_use`` counts mount points, one per ID (``docker cp`` mounts an ID again).
            _add_made_up(mounts, wanted)
            if mounts:
                volumes[name] = VolumeMounts(dataset_id=volume.dataset_id,
                                             mounts=pmap(mounts))
        return MountTable(pmap(volumes))

    def reconcile(self, in_use: Mapping[str, int]) -> "MountTable":
        """
        The table corrected by ``in_use``, the number of mount points that running
        containers hold per volume name: volumes no container uses lose their mounts;
        a volume used by more mount points than the table has IDs for gets made-up IDs
        (``RECONCILED_PREFIX``) for the difference, consumed by Unmounts of unknown IDs.
        A volume with more IDs than mount points (an Unmount was lost while the agent was
        down) keeps one made-up mount per mount point instead, since which IDs are stale
        cannot be told: the Unmounts of the live ones consume them, and the count reaches
        zero when the last container stops.
        """
        volumes = {}
        for name, wanted in in_use.items():
            if wanted <= 0:
                continue
            volume = self.volumes.get(name, VolumeMounts())
            mounts = dict(volume.mounts) if len(volume.mounts) <= wanted else {}
            _add_made_up(mounts, wanted)
            volumes[name] = VolumeMounts(dataset_id=volume.dataset_id, mounts=pmap(mounts))
        return MountTable(pmap(volumes))

    def to_json(self) -> dict:
        """The JSON document of this table (the file's layout)."""
        return {"version": FORMAT_VERSION, "volumes": {
            name: {"dataset_id": v.dataset_id, "mounts": dict(v.mounts)}
            for name, v in sorted(self.volumes.items())}}

    @classmethod
    def from_json(cls, document: Any) -> "MountTable":
        """The table of a JSON document; ``ValueError`` saying what is wrong if malformed."""
        if not isinstance(document, dict) or document.get("version") not in READABLE_VERSIONS:
            raise ValueError("not a mount counts document of version "
                             + " or ".join(map(str, READABLE_VERSIONS)))
        raw = document.get("volumes")
        if not isinstance(raw, dict):
            raise ValueError("'volumes' is not an object")
        table = cls()
        for name, entry in raw.items():
            table = table.set_volume(name, entry)
        return table

    def set_volume(self, name: str, entry: Any) -> "MountTable":
        """The table with volume ``name``'s entry as a file has it (``{"dataset_id",
        "mounts"}``; no mounts: absent); ``ValueError`` saying what is wrong if malformed."""
        if not isinstance(name, str) or not isinstance(entry, dict) \
                or not isinstance(entry.get("mounts"), dict):
            raise ValueError(f"volume {name!r} has no 'mounts' object")
        dataset_id = entry.get("dataset_id")
        if dataset_id is not None and not isinstance(dataset_id, str):
            raise ValueError(f"volume {name!r} has a dataset_id that is not a string")
        mounts = entry["mounts"]
        if not all(isinstance(k, str) and type(n) is int and n > 0
                   for k, n in mounts.items()):
            raise ValueError(f"volume {name!r} has counts that are not positive integers")
        if not mounts:
            return MountTable(self.volumes.discard(name))
        return MountTable(self.volumes.set(
            name, VolumeMounts(dataset_id=dataset_id, mounts=pmap(mounts))))

    def volume_line(self, name: str) -> bytes:
        """The log line that sets volume ``name`` to its entry in this table."""
        volume = self.volumes.get(name, VolumeMounts())
        return _line({"volume": name, "dataset_id": volume.dataset_id,
                      "mounts": dict(volume.mounts)})

    def base_line(self) -> bytes:
        """The log line that holds this whole table (a file's first line)."""
        return _line(self.to_json())


def _line(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


@attr.s(frozen=True, auto_attribs=True)
class MountLog:
    """
    What a counts file holds: the ``table`` after its base and every whole line; the
    ``length`` of that readable part (a torn tail follows it), None for a version 1 file
    (rewritten as a base before anything is appended); the base's length and the bytes
    appended after it.
    """

    table: MountTable
    length: Optional[int] = None
    base: int = 0
    appended: int = 0


def parse_mount_log(content: bytes) -> MountLog:
    """
    The counts a file's content holds (pure); ``ValueError`` saying what is wrong if its
    base is unreadable. Lines are applied up to the first torn or malformed one.
    """
    lines = whole_lines(content)
    first = next(lines, None)
    try:
        document = None if first is None else json.loads(first[0])
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        # Version 1: the whole table as one indented document.
        return MountLog(MountTable.from_json(json.loads(content)))
    table = MountTable.from_json(document)
    base = length = first[1]
    for line, end in lines:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                break
            table = table.set_volume(entry.get("volume"), entry)
        except ValueError:
            break
        length = end
    return MountLog(table, length, base, length - base)


def _add_made_up(mounts: dict, wanted: int) -> None:
    """Add made-up IDs (one mount each) to ``mounts`` until it has ``wanted`` IDs,
    skipping those it has already."""
    n = 0
    while len(mounts) < wanted:
        n += 1
        mounts.setdefault(f"{RECONCILED_PREFIX}{n}", 1)


def docker_volume_mounts(containers: Iterable[Any], driver: str = "pyflock") -> dict[str, int]:
    """
    The number of mount points per volume name of ``driver`` in ``containers``, the JSON
    answer of Docker's ``GET /containers/json`` (running containers only, which is that
    call's default). Entries that are not such volume mounts are skipped.
    """
    result: dict[str, int] = {}
    for container in containers:
        if not isinstance(container, dict):
            continue
        for mount in container.get("Mounts") or ():
            if not isinstance(mount, dict) or mount.get("Type") != "volume":
                continue
            # A v2 (managed) plugin's driver is shown with its tag.
            if mount.get("Driver") not in (driver, f"{driver}:latest"):
                continue
            name = mount.get("Name")
            if isinstance(name, str) and name:
                result[name] = result.get(name, 0) + 1
    return result


def write_mount_table(path: str, data: bytes) -> None:
    """
    Replace the counts file at ``path`` with ``data`` atomically and durably
    (``pyflock.common._files.write_atomically``), creating its folder (mode 0700) if
    missing; ``MountsWriteError`` naming the file if that fails. Blocks.
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        write_atomically(path, data)
    except OSError as e:
        raise MountsWriteError(f"cannot write the mount counts to {path}: {e.strerror or e}"
                               ) from e


def append_mount_lines(path: str, data: bytes, at: int) -> int:
    """
    Append log ``data`` to the counts file at ``path`` at offset ``at`` (cutting off a torn
    tail), without an fsync (see the module's docstring); its new length. ``MountsWriteError`` naming the
    file if that fails. Blocks.
    """
    try:
        return append_durably(path, data, at=at, sync=False)
    except OSError as e:
        raise MountsWriteError(f"cannot write the mount counts to {path}: {e.strerror or e}"
                               ) from e


def read_mount_log(path: str) -> MountLog:
    """
    The counts stored at ``path``: none if there is no file. A corrupt file is moved aside
    to ``<path>.corrupt`` (and logged) and no counts returned, since the counts are
    rebuilt from the running containers by ``reconcile``. Blocks; meant for agent start.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return MountLog(MountTable())
    try:
        return parse_mount_log(raw)
    except ValueError as e:
        os.replace(path, path + ".corrupt")
        log_event(_log, "pyflock:plugin:mounts-corrupt", LogLevel.error, path=path,
                  reason=str(e), moved_to=path + ".corrupt")
        return MountLog(MountTable())


def read_mount_table(path: str) -> MountTable:
    """The table stored at ``path`` (``read_mount_log``). Blocks."""
    return read_mount_log(path).table


class MountCounts:
    """
    The live mount table, saved to ``path`` after every change by ``run_blocking(f,
    *args)`` (the plugin's thread pool in the agent; see ``pyflock.common._threads``): a
    change of one volume appends its line, a whole-table change (reconcile, settle) or a
    log grown past its base writes a new base (see the module's docstring). Writes are
    serial and coalesced: the changes made while a write is in flight go out together with
    the next write. Each change returns a Deferred that fires once a write including it is
    on disk, or fails with ``MountsWriteError`` (the in-memory table stays right; the next
    change retries, writing a new base since what the file holds is then unknown).
    """

    def __init__(self, path: str, run_blocking: RunBlocking,
                 table: MountTable = MountTable(), compact_after: int = COMPACT_AFTER):
        self.path = path
        self.table = table
        self._run_blocking = run_blocking
        self._compact_after = compact_after
        self._version = 0
        self._attempted = 0
        self._durable = 0
        self._writing = False
        self._waiters: list[tuple[int, Deferred]] = []
        #: The file's readable length once the write under way ends (None: unknown, or a
        #: version 1 file: the next write is a base), its base's length, the bytes after.
        self._length: Optional[int] = None
        self._base = 0
        self._appended = 0
        #: The lines of the changes not yet being written; whether a base must be.
        self._lines: list[bytes] = []
        self._rebase = False

    @classmethod
    def load(cls, path: str, run_blocking: RunBlocking,
             compact_after: int = COMPACT_AFTER) -> "MountCounts":
        """The counts stored at ``path`` (see ``read_mount_log``; blocks, for agent start)."""
        log = read_mount_log(path)
        counts = cls(path, run_blocking, log.table, compact_after)
        counts._length, counts._base, counts._appended = log.length, log.base, log.appended
        return counts

    def count(self, name: str) -> int:
        """How many mounts of volume ``name`` are live here."""
        return self.table.count(name)

    def mount(self, name: str, mount_id: str, dataset_id: Optional[str]) -> Deferred:
        """Count one more mount of ``mount_id`` of ``name``; fires once on disk."""
        return self._change(self.table.mount(name, mount_id, dataset_id), name)

    def unmount(self, name: str, mount_id: str) -> Deferred:
        """Count one mount fewer of ``mount_id`` of ``name``; fires once on disk."""
        return self._change(self.table.unmount(name, mount_id), name)

    def remount(self, name: str, mount_id: str, dataset_id: Optional[str]) -> Deferred:
        """Count ``mount_id`` of ``name`` as mounted once (``MountTable.remount``); fires
        once on disk."""
        return self._change(self.table.remount(name, mount_id, dataset_id), name)

    def forget(self, name: str) -> Deferred:
        """Drop every mount of ``name``; fires once on disk."""
        return self._change(self.table.forget(name), name)

    def reconcile(self, in_use: Mapping[str, int]) -> Deferred:
        """Correct the table with the running containers' mounts (``MountTable.reconcile``)."""
        before = self.table
        d = self._change(before.reconcile(in_use))
        log_event(_log, "pyflock:plugin:mounts-reconciled",
                  before=json.dumps({n: v.count for n, v in before.volumes.items()}),
                  after=json.dumps({n: v.count for n, v in self.table.volumes.items()}))
        return d

    def settle(self, in_use: Mapping[str, int],
               confirmed: Iterable[tuple[str, str]]) -> Deferred:
        """Correct the table after dockerd restarted (``MountTable.settle``)."""
        before = self.table
        d = self._change(before.settle(in_use, confirmed))
        log_event(_log, "pyflock:plugin:mounts-settled",
                  before=json.dumps({n: v.count for n, v in before.volumes.items()}),
                  after=json.dumps({n: v.count for n, v in self.table.volumes.items()}))
        return d

    def flush(self) -> Deferred:
        """Fires once the current table is on disk (writing it again if the last write
        failed)."""
        if self._durable == self._version:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._waiters.append((self._version, d))
        self._write(again=True)
        return d

    def _change(self, table: MountTable, name: Optional[str] = None) -> Deferred:
        """Make ``table`` current: a change of volume ``name`` only, or of any (None)."""
        if table == self.table:
            return self.flush()
        self.table = table
        self._version += 1
        if name is None:
            self._rebase, self._lines = True, []
        elif not self._rebase:
            self._lines.append(table.volume_line(name))
        d: Deferred = Deferred()
        self._waiters.append((self._version, d))
        self._write()
        return d

    def _write(self, again: bool = False) -> None:
        if self._writing or (self._attempted == self._version and not again):
            return
        self._writing = True
        version = self._attempted = self._version
        data = b"".join(self._lines)
        base = self._rebase or self._length is None or not data or \
            self._appended + len(data) > max(self._compact_after, self._base)
        self._lines, self._rebase = [], False
        if base:
            data = self.table.base_line()
            d = self._run_blocking(write_mount_table, self.path, data)
            d.addCallback(lambda _: len(data))
        else:
            d = self._run_blocking(append_mount_lines, self.path, data, self._length)
        d.addBoth(self._wrote, version, base)

    def _wrote(self, result: Any, version: int, base: bool) -> None:
        self._writing = False
        failed = isinstance(result, Failure)
        if failed:
            log_event(_log, "pyflock:plugin:mounts-write-failed", LogLevel.error,
                      path=self.path, reason=str(result.value))
            # What the file holds is unknown: the next write is a base (the whole table).
            self._length, self._lines = None, []
        else:
            self._durable = version
            if base:
                self._length = self._base = result
                self._appended = 0
            else:
                self._appended += result - self._length
                self._length = result
        done = [d for v, d in self._waiters if v <= version]
        self._waiters = [(v, d) for v, d in self._waiters if v > version]
        for d in done:
            if failed:
                d.errback(result)
            else:
                d.callback(None)
        # Lines and bases carry every change made so far: one more write covers them.
        self._write()


__all__ = ["COMPACT_AFTER", "FORMAT_VERSION", "MountCounts", "MountLog", "MountTable",
           "MountsWriteError", "RECONCILED_PREFIX", "READABLE_VERSIONS", "VolumeMounts",
           "append_mount_lines", "docker_volume_mounts", "parse_mount_log", "read_mount_log",
           "read_mount_table", "write_mount_table"]
