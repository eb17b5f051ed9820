"""
The block-device backend interface, the volume record it returns and its typed errors.

A backend is a block store shared by the nodes of a cluster (a cloud's volumes, or the
loopback backend's shared folder): it creates volumes, attaches each to at most one node at
a time, and detaches and destroys them. Methods are synchronous and may block for a while
(they run commands and cloud calls): the agent calls them in threads, never on the reactor.
"""

from __future__ import annotations

import re
from typing import Optional

import attr
from zope.interface import Attribute, Interface

#: One mebibyte; sizes are binary throughout pyflock.
MiB = 1024 * 1024

#: One gibibyte.
GiB = 1024 * MiB

_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


class BackendError(Exception):
    """Base class of the refusals a backend raises."""


class InvalidVolumeRequest(BackendError, ValueError):
    """A dataset id or a size was malformed; the message says what was wrong."""


class UnknownVolume(BackendError):
    """No volume exists for this dataset."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id

    def __str__(self) -> str:
        return f"no volume exists for dataset {self.dataset_id}"


class VolumeExists(BackendError):
    """A volume already exists for this dataset."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id

    def __str__(self) -> str:
        return f"a volume already exists for dataset {self.dataset_id}"


class AlreadyAttached(BackendError):
    """
    The volume is attached, so it cannot be attached again or destroyed. ``holder`` is the
    node holding it, or None when the device was not made by pyflock (an operator must
    detach it); ``device`` is its device path when known.
    """

    def __init__(self, dataset_id: str, holder: Optional[str],
                 device: Optional[str] = None):
        super().__init__(dataset_id, holder, device)
        self.dataset_id = dataset_id
        self.holder = holder
        self.device = device

    def __str__(self) -> str:
        if self.holder is None:
            return (f"the volume of dataset {self.dataset_id} is attached to {self.device}, "
                    f"which pyflock did not set up; detach it by hand "
                    f"(losetup -d {self.device}) once nothing uses it")
        where = f" as {self.device}" if self.device else ""
        return (f"the volume of dataset {self.dataset_id} is attached to node "
                f"{self.holder}{where}; detach it there first")


class UnattachedVolume(BackendError):
    """The volume is not attached (to this node, for ``get_device_path``)."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id

    def __str__(self) -> str:
        return f"the volume of dataset {self.dataset_id} is not attached here"


class VolumeBusy(BackendError):
    """
    A detach was asked for but the device did not go away: something (typically a
    container's mount namespace) still holds it. The volume stays attached to its node;
    it detaches by itself once the last user lets go, and ``detach_volume`` may be retried.
    """

    def __init__(self, dataset_id: str, devices: tuple[str, ...]):
        super().__init__(dataset_id, devices)
        self.dataset_id = dataset_id
        self.devices = devices

    def __str__(self) -> str:
        return (f"the volume of dataset {self.dataset_id} is still in use through "
                f"{', '.join(self.devices)} (a container's mount namespace probably still "
                f"holds its filesystem); it stays attached until the last user lets go, "
                f"then detach_volume can be retried")


@attr.s(frozen=True, auto_attribs=True)
class BlockVolume:
    """
    One volume as the backend sees it: its dataset, size in bytes, the node it is attached
    to (None when unattached) and the device path it is attached as (None when unattached).

    One odd case: ``attached_to`` None with a ``device_path`` means a device that no node
    owns holds the volume (the loopback backend reports loop devices set up outside
    pyflock this way); attaching and destroying it are refused until it is detached.
    """

    dataset_id: str
    size: int
    attached_to: Optional[str] = None
    device_path: Optional[str] = None


class IBlockDeviceBackend(Interface):
    """
    A block store shared by the cluster's nodes, seen from one node. Every method blocks;
    call them in a thread. A volume is never attached to two nodes at once.

    A volume whose device went away without a completed detach (a busy detach whose last
    user has let go, a host reboot) counts as unattached: any node may attach it, and one
    ``detach_volume`` on it returns normally and tidies up what the backend recorded.
    """

    node_uuid = Attribute("The uuid of the node this backend object serves (a str).")

    def allocation_unit() -> int:
        """The granularity of volume sizes in bytes; sizes are rounded up to a multiple."""

    def list_volumes() -> list:
        """Every volume in the store, as ``BlockVolume`` records sorted by dataset id."""

    def create_volume(dataset_id: str, size: Optional[int] = None,
                      profile: Optional[str] = None) -> BlockVolume:
        """
        Create an unattached volume of ``size`` bytes (None: the backend's default size)
        rounded up to the allocation unit. ``profile`` is the dataset's storage profile
        (gold, silver, bronze; None: the default): a backend with volume types maps it to
        one, a backend without them ignores it (its docs say so). Raises ``VolumeExists``
        or ``InvalidVolumeRequest``.
        """

    def attach_volume(dataset_id: str, node_uuid: str) -> BlockVolume:
        """
        Attach the volume to ``node_uuid``; returns it with its device path. Raises
        ``UnknownVolume``, or ``AlreadyAttached`` naming the holder if it is attached
        anywhere (this node included).
        """

    def detach_volume(dataset_id: str, discard: bool = False) -> None:
        """
        Detach the volume from whichever node holds it; returns once the device is really
        gone, and (unless ``discard``: the volume is destroyed next) what was written
        through it is durable. Raises ``UnknownVolume``, ``UnattachedVolume``, or
        ``VolumeBusy`` when the device is still in use (the volume then stays attached to
        its node).
        """

    def destroy_volume(dataset_id: str) -> None:
        """
        Destroy an unattached volume and its data. Raises ``UnknownVolume``, or
        ``AlreadyAttached`` while it is attached.
        """

    def get_volume(dataset_id: str) -> BlockVolume:
        """
        One volume exactly as ``list_volumes`` would list it, without listing them all.
        Raises ``UnknownVolume``.
        """

    def get_device_path(dataset_id: str) -> str:
        """
        The device path of a volume attached to this backend's node. Raises
        ``UnknownVolume``, or ``UnattachedVolume`` if it is not attached to this node.
        """


def is_valid_dataset_id(dataset_id: object) -> bool:
    """Whether ``dataset_id`` can name a volume (and so a file or a cloud tag)."""
    return isinstance(dataset_id, str) and _DATASET_ID.match(dataset_id) is not None


def check_dataset_id(dataset_id: object) -> str:
    """Return ``dataset_id`` if it can name a volume, else raise ``InvalidVolumeRequest``."""
    if not is_valid_dataset_id(dataset_id):
        raise InvalidVolumeRequest(
            f"dataset id {dataset_id!r} cannot name a volume: use 1 to 128 letters, digits, "
            f"'-' or '_', starting with a letter or digit (a UUID is fine)")
    return dataset_id


def check_node_uuid(node_uuid: object) -> str:
    """Return ``node_uuid`` if it can name a node, else raise ``InvalidVolumeRequest``."""
    if not isinstance(node_uuid, str) or not node_uuid:
        raise InvalidVolumeRequest(f"node uuid {node_uuid!r} must be a non-empty string")
    return node_uuid


def round_size(size: object, unit: int) -> int:
    """
    ``size`` in bytes rounded up to a multiple of ``unit``; raises ``InvalidVolumeRequest``
    unless it is a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidVolumeRequest(
            f"volume size {size!r} must be a positive number of bytes")
    return -(-size // unit) * unit
