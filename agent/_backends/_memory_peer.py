"""
An in-memory peer-to-peer backend: each node's copies are dictionaries of files, and
streams are JSON documents carrying the files that changed since their base. It keeps the
rules of ``IPeerBackend`` (the contract suite in ``tests.contracts.peer_backends`` runs
against it) so that convergence and transfer code can be tested without btrfs.
"""

from __future__ import annotations

import base64
import errno
import json
import threading
from typing import BinaryIO, Optional

import attr
from zope.interface import implementer

from pyflock.agent._backends._interface import (
    GiB, MiB, UnknownVolume, VolumeExists, check_dataset_id, check_node_uuid, round_size,
)
from pyflock.agent._backends._peer import (
    BadStream, IncompleteCopy, IPeerBackend, PeerDataset, UnknownSnapshot,
)

#: The stream format this fake writes and reads.
STREAM_FORMAT = "pyflock-memory-peer-stream-1"


@attr.s(auto_attribs=True)
class _Copy:
    size: int
    complete: bool
    files: dict = attr.ib(factory=dict)
    snapshots: list = attr.ib(factory=list)   # (name, files), oldest first
    frozen: bool = False


def _encode_files(files: dict) -> dict:
    return {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}


@implementer(IPeerBackend)
class MemoryPeerBackend:
    """
    Node ``node_uuid``'s copies, in memory. ``write_file`` and ``read_file`` stand for
    what containers do in a complete copy's folder. Thread-safe.
    """

    def __init__(self, node_uuid: str, allocation_unit: int = MiB,
                 default_size: int = 10 * GiB):
        self.node_uuid = check_node_uuid(node_uuid)
        self._unit = allocation_unit
        self._default_size = default_size
        self._copies: dict[str, _Copy] = {}
        self._lock = threading.Lock()
        self._snapshots_taken = 0

    def allocation_unit(self) -> int:
        """The granularity of sizes, in bytes."""
        return self._unit

    def _record(self, dataset_id: str, copy: _Copy) -> PeerDataset:
        return PeerDataset(
            dataset_id=dataset_id, size=copy.size,
            path=f"/memory/{self.node_uuid}/{dataset_id}" if copy.complete else None,
            snapshots=tuple(name for name, _ in copy.snapshots),
            frozen=copy.complete and copy.frozen)

    def _complete_copy(self, dataset_id: str) -> _Copy:
        copy = self._copy(dataset_id)
        if not copy.complete:
            raise IncompleteCopy(dataset_id)
        return copy

    def _copy(self, dataset_id: str) -> _Copy:
        copy = self._copies.get(check_dataset_id(dataset_id))
        if copy is None:
            raise UnknownVolume(dataset_id)
        return copy

    def list_datasets(self) -> list:
        """Every copy here, sorted by dataset id."""
        with self._lock:
            return [self._record(i, c) for i, c in sorted(self._copies.items())]

    def get_dataset(self, dataset_id: str) -> PeerDataset:
        """One copy here."""
        with self._lock:
            return self._record(dataset_id, self._copy(dataset_id))

    def create_dataset(self, dataset_id: str, size: Optional[int] = None) -> PeerDataset:
        """An empty, complete copy of ``size`` bytes rounded up."""
        check_dataset_id(dataset_id)
        size = round_size(self._default_size if size is None else size, self._unit)
        with self._lock:
            if dataset_id in self._copies:
                raise VolumeExists(dataset_id)
            copy = self._copies[dataset_id] = _Copy(size=size, complete=True)
            return self._record(dataset_id, copy)

    def _stream(self, dataset_id: str, copy: _Copy, base: Optional[str],
                name: str) -> bytes:
        """The stream from ``base`` to the copy's files now, as snapshot ``name``."""
        if not copy.complete:
            raise IncompleteCopy(dataset_id)
        before: dict = {}
        if base is not None:
            found = [files for snapshot, files in copy.snapshots if snapshot == base]
            if not found:
                raise UnknownSnapshot(dataset_id, base)
            before = found[0]
        changed = {k: v for k, v in copy.files.items() if before.get(k) != v}
        return json.dumps({
            "format": STREAM_FORMAT, "dataset_id": dataset_id, "size": copy.size,
            "base": base, "snapshot": name, "files": _encode_files(changed),
            "removed": sorted(set(before) - set(copy.files))}).encode("utf-8")

    def export_dataset(self, dataset_id: str, into: BinaryIO,
                       base: Optional[str] = None) -> str:
        """Snapshot the copy and write a stream from ``base`` (None: whole) to it."""
        with self._lock:
            copy = self._copy(dataset_id)
            name = f"{self.node_uuid}-{self._snapshots_taken + 1}"
            stream = self._stream(dataset_id, copy, base, name)
            self._snapshots_taken += 1
            copy.snapshots.append((name, dict(copy.files)))
        into.write(stream)
        return name

    def estimate_export(self, dataset_id: str, base: Optional[str] = None) -> int:
        """The size in bytes of the stream ``export_dataset`` would write now."""
        with self._lock:
            return len(self._stream(dataset_id, self._copy(dataset_id), base, "estimate"))

    def import_dataset(self, dataset_id: str, source: BinaryIO) -> PeerDataset:
        """Read a stream into this node's partial copy of ``dataset_id``."""
        check_dataset_id(dataset_id)
        stream = self._read_stream(dataset_id, source)
        with self._lock:
            copy = self._copies.get(dataset_id)
            if stream["base"] is None:
                if copy is not None:
                    raise VolumeExists(dataset_id)
                copy = _Copy(size=stream["size"], complete=False)
                files: dict = {}
            else:
                if copy is None:
                    raise UnknownVolume(dataset_id)
                if copy.complete:
                    raise VolumeExists(dataset_id)
                if not copy.snapshots or copy.snapshots[-1][0] != stream["base"]:
                    raise UnknownSnapshot(dataset_id, stream["base"])
                files = dict(copy.snapshots[-1][1])
            for name in stream["removed"]:
                files.pop(name, None)
            files.update(stream["files"])
            copy.snapshots.append((stream["snapshot"], files))
            copy.files = dict(files)
            copy.size = stream["size"]
            self._copies[dataset_id] = copy
            return self._record(dataset_id, copy)

    @staticmethod
    def _read_stream(dataset_id: str, source: BinaryIO) -> dict:
        """The stream in ``source``, checked; ``BadStream`` saying what is wrong."""
        try:
            stream = json.loads(source.read().decode("utf-8"))
            if not isinstance(stream, dict) or stream.get("format") != STREAM_FORMAT:
                raise ValueError(f"not a {STREAM_FORMAT} stream")
            stream["files"] = {str(k): base64.b64decode(v, validate=True)
                               for k, v in stream["files"].items()}
            if not isinstance(stream["size"], int) or not isinstance(stream["snapshot"], str):
                raise ValueError("no size or snapshot")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadStream(f"the stream for dataset {dataset_id} is malformed: {e}") from None
        if stream.get("dataset_id") != dataset_id:
            raise BadStream(f"the stream is of dataset {stream.get('dataset_id')}, "
                            f"not {dataset_id}")
        return stream

    def complete_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the partial copy's latest snapshot the writable dataset."""
        with self._lock:
            copy = self._copy(dataset_id)
            if not copy.complete:
                if not copy.snapshots:
                    raise UnknownSnapshot(dataset_id, "(any)")
                copy.files = dict(copy.snapshots[-1][1])
                copy.complete = True
            return self._record(dataset_id, copy)

    def freeze_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the complete copy read-only: ``write_file`` fails from now on."""
        with self._lock:
            copy = self._complete_copy(dataset_id)
            copy.frozen = True
            return self._record(dataset_id, copy)

    def thaw_dataset(self, dataset_id: str) -> PeerDataset:
        """Make the complete copy writable again."""
        with self._lock:
            copy = self._complete_copy(dataset_id)
            copy.frozen = False
            return self._record(dataset_id, copy)

    def demote_dataset(self, dataset_id: str) -> PeerDataset:
        """Drop the writable copy, keeping its snapshots: the copy becomes partial."""
        with self._lock:
            copy = self._copy(dataset_id)
            copy.complete = copy.frozen = False
            copy.files = {}
            return self._record(dataset_id, copy)

    def prune_snapshots(self, dataset_id: str, keep) -> PeerDataset:
        """Delete every snapshot not named in ``keep``."""
        keep = set(keep)
        with self._lock:
            copy = self._copy(dataset_id)
            copy.snapshots = [(n, f) for n, f in copy.snapshots if n in keep]
            return self._record(dataset_id, copy)

    def destroy_dataset(self, dataset_id: str) -> None:
        """Forget this node's copy and its snapshots."""
        with self._lock:
            self._copy(dataset_id)
            del self._copies[dataset_id]

    # -- what containers do in a complete copy ------------------------------------------

    def write_file(self, dataset_id: str, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` of the complete copy (as a container would)."""
        with self._lock:
            copy = self._complete_copy(dataset_id)
            if copy.frozen:
                raise OSError(errno.EROFS, f"dataset {dataset_id} is read-only (frozen)")
            copy.files[name] = bytes(data)

    def remove_file(self, dataset_id: str, name: str) -> None:
        """Remove file ``name`` from the complete copy."""
        with self._lock:
            copy = self._complete_copy(dataset_id)
            if copy.frozen:
                raise OSError(errno.EROFS, f"dataset {dataset_id} is read-only (frozen)")
            copy.files.pop(name)

    def read_file(self, dataset_id: str, name: str) -> Optional[bytes]:
        """File ``name`` of the complete copy, or None if there is none."""
        with self._lock:
            return self._copy(dataset_id).files.get(name)
