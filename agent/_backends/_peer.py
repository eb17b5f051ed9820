"""
The peer-to-peer backend interface (the kind ``btrfs`` will be), its record and errors.

A peer-to-peer backend keeps each dataset as a local copy on one node's own storage (a
btrfs subvolume, its size a quota). Nothing is shared between nodes: a dataset moves by
copying it, as a stream of its data that one node exports and another imports, first in
bulk while the dataset is still in use, then as an incremental delta after a short
freeze. Block-device backends (``IBlockDeviceBackend``: loopback, EBS) move a dataset by
detaching and attaching its volume instead. Both kinds share the filesystem and mount
steps of convergence. Methods are synchronous and may block for a long while (a
multi-GiB stream): the agent calls them in threads, never on the reactor.
"""

from __future__ import annotations

from typing import BinaryIO, Optional

import attr
from zope.interface import Attribute, Interface

from pyflock.agent._backends._interface import BackendError


class UnknownSnapshot(BackendError):
    """
    An incremental stream was asked from, or brought to, a snapshot the copy does not
    have (as its latest, for an import).
    """

    def __init__(self, dataset_id: str, snapshot: str):
        super().__init__(dataset_id, snapshot)
        self.dataset_id = dataset_id
        self.snapshot = snapshot

    def __str__(self) -> str:
        return (f"the copy of dataset {self.dataset_id} here has no snapshot "
                f"{self.snapshot!r} to stream from or onto; send it whole instead")


class IncompleteCopy(BackendError):
    """The copy here is a partial one (received, not completed): it cannot be exported."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id

    def __str__(self) -> str:
        return (f"the copy of dataset {self.dataset_id} here is still being received; "
                f"only a complete copy can be sent on")


class BadStream(BackendError):
    """A stream to import is not one this backend made, or is for another dataset."""


@attr.s(frozen=True, auto_attribs=True)
class PeerDataset:
    """
    One dataset's copy on this node: its size in bytes (the quota), the path of its data
    (None while the copy is partial: received snapshots, not yet completed), its
    snapshots, oldest first (the points a stream can start from, or continue), and
    whether writes to the complete copy are stopped.
    """

    dataset_id: str
    size: int
    path: Optional[str] = None
    snapshots: tuple = ()
    #: Whether the complete copy is read-only (``freeze_dataset``: a move's phase 2).
    frozen: bool = False

    @property
    def complete(self) -> bool:
        """Whether the copy is a writable dataset (created here, or completed)."""
        return self.path is not None

    @property
    def latest(self) -> Optional[str]:
        """The newest snapshot, or None."""
        return self.snapshots[-1] if self.snapshots else None


class IPeerBackend(Interface):
    """
    This node's local storage of dataset copies. Every method blocks; call them in a
    thread. Another node's copies are reached only through streams.
    """

    node_uuid = Attribute("The uuid of the node whose storage this is (a str).")

    def allocation_unit() -> int:
        """The granularity of sizes (quotas) in bytes; sizes are rounded up to a multiple."""

    def list_datasets() -> list:
        """Every copy on this node, as ``PeerDataset`` records sorted by dataset id."""

    def get_dataset(dataset_id: str) -> PeerDataset:
        """One copy exactly as ``list_datasets`` lists it. Raises ``UnknownVolume``."""

    def create_dataset(dataset_id: str, size: Optional[int] = None) -> PeerDataset:
        """
        Create an empty, complete copy of ``size`` bytes (None: the backend's default)
        rounded up to the allocation unit, its root writable by containers. Raises
        ``VolumeExists`` or ``InvalidVolumeRequest``.
        """

    def export_dataset(dataset_id: str, into: BinaryIO,
                       base: Optional[str] = None) -> str:
        """
        Snapshot the complete copy now and write to ``into`` a stream bringing a copy
        that has ``base`` as its latest snapshot (None: no copy at all) to this new
        snapshot; returns its name. The stream carries the size. Raises
        ``UnknownVolume``, ``IncompleteCopy``, or ``UnknownSnapshot`` for a ``base`` the
        copy does not have.
        """

    def import_dataset(dataset_id: str, source: BinaryIO) -> PeerDataset:
        """
        Read a stream made by ``export_dataset`` from ``source`` into this node's copy:
        a whole stream starts a partial copy, an incremental one continues the partial
        copy whose latest snapshot is its base. The copy stays partial until
        ``complete_dataset``. Raises ``VolumeExists`` (a whole stream onto an existing
        copy, or any stream onto a complete one), ``UnknownSnapshot``, ``UnknownVolume``
        (an incremental stream and no copy) or ``BadStream``; nothing changes then.
        """

    def complete_dataset(dataset_id: str) -> PeerDataset:
        """
        Make the partial copy's latest snapshot the writable dataset, as a writable
        snapshot of it (the received snapshot stays read-only, a base for later streams);
        a complete copy is returned as it is. Raises ``UnknownVolume``.
        """

    def freeze_dataset(dataset_id: str) -> PeerDataset:
        """
        Make the complete copy read-only in place, also while it is mounted and in use
        (writes fail from then on); idempotent. Raises ``UnknownVolume`` or
        ``IncompleteCopy``.
        """

    def thaw_dataset(dataset_id: str) -> PeerDataset:
        """
        Make a frozen complete copy writable again (a cancelled move); idempotent.
        Raises ``UnknownVolume`` or ``IncompleteCopy``.
        """

    def demote_dataset(dataset_id: str) -> PeerDataset:
        """
        Once a move is done, drop this node's writable copy (it must be unmounted) but
        keep its snapshots: the copy becomes partial (path None) with its snapshots, so
        that a later move back sends only what changed since the newest common snapshot.
        A partial copy is returned as it is. Raises ``UnknownVolume``.
        """

    def prune_snapshots(dataset_id: str, keep) -> PeerDataset:
        """
        Delete every snapshot of the copy whose name is not in the iterable ``keep``.
        Raises ``UnknownVolume``.
        """

    def destroy_dataset(dataset_id: str) -> None:
        """Destroy this node's copy, complete or partial, and its snapshots. ``UnknownVolume``."""
