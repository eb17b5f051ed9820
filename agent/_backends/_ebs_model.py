"""
The pure decisions of the ``ebs`` backend: no boto3, no files, no clock.

- ``volume_size_gib``: a size in bytes as whole GiB (EBS sizes are whole GiB);
- ``creation_parameters``: a profile as a volume type (gold io2, silver gp3 above its
  baseline, bronze gp3 at its baseline) with encryption;
- ``phase_of`` and ``wait_decision``: the explicit state machine every wait follows;
- ``choose_device_name``: a device name no other attachment of the instance uses, within
  the instance's attachment limit;
- ``block_volume``/``pick_volume``: an EC2 volume description as a ``BlockVolume``;
- ``device_candidates``/``nvme_device_for``: where the kernel shows a volume, found by its
  id (the NVMe serial or the by-id link), never by comparing device lists.

Volumes are described in boto3's shapes (``VolumeId``, ``Size``, ``State``, ``Attachments``,
``Tags``), so the shell hands what ``describe_volumes`` answered straight in.
"""

from __future__ import annotations

import enum
import os
from typing import Iterable, Mapping, Optional

import attr

from pyflock.agent._backends._interface import (
    GiB, BackendError, BlockVolume, InvalidVolumeRequest, round_size,
)

#: The tag naming the cluster a volume belongs to (its value: the cluster uuid).
TAG_CLUSTER = "pyflock-cluster"

#: The tag naming the dataset a volume holds.
TAG_DATASET = "pyflock-dataset"

#: The tag naming the node that attached the volume (written before the attach).
TAG_NODE = "pyflock-node"

#: The tag naming the instance of that node, so a foreign attachment is told apart.
TAG_INSTANCE = "pyflock-instance"

#: The tag on a volume force-detached from a dead node's instance: the next node to attach
#: it checks its filesystem (``e2fsck -f -p``) before anything mounts it, then removes the tag.
TAG_FSCK = "pyflock-fsck"

#: The instance states in which nothing runs that could still write to a volume.
STOPPED_STATES = frozenset({"stopped", "terminated"})

#: The largest volume EBS makes of the types pyflock uses (gp3 and io2): 16 TiB.
MAX_SIZE_GIB = 16384

#: The profiles and the volume types they map to.
PROFILES = {"gold": "io2", "silver": "gp3", "bronze": "gp3"}

#: The profile of a dataset that names none.
DEFAULT_PROFILE = "bronze"

#: The udev by-id name of an EBS volume on a Nitro instance, before the serial.
BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"

#: Device names pyflock asks for, in order: xvdf..xvdz, then xvdba..xvdcz (the names EC2
#: accepts for EBS on Linux; on Xen the kernel shows the volume under the same name).
DEVICE_NAMES = tuple(
    [f"/dev/xvd{c}" for c in "fghijklmnopqrstuvwxyz"]
    + [f"/dev/xvd{a}{b}" for a in "bc" for b in "abcdefghijklmnopqrstuvwxyz"])

#: The default number of EBS volumes an instance may have attached, its root included.
DEFAULT_ATTACHMENT_LIMIT = 26

_ATTACHED_STATES = frozenset({"attaching", "attached", "detaching", "busy"})


class AttachmentLimitReached(BackendError):
    """The instance has as many volumes attached as it may; the message says how many."""

    def __init__(self, instance_id: str, limit: int):
        super().__init__(instance_id, limit)
        self.instance_id = instance_id
        self.limit = limit

    def __str__(self) -> str:
        return (f"instance {self.instance_id} already has {self.limit} EBS volumes attached, "
                f"its limit (dataset.attachment_limit in agent.yml): detach a dataset from "
                f"this node or move some to another node first")


class VolumeStuck(BackendError):
    """A wait on a volume ended in a state it cannot leave, or took too long."""


class Phase(enum.Enum):
    """Where a volume stands, read from one description (see ``phase_of``)."""

    GONE = "gone"            # not described (not yet visible, or deleted)
    CREATING = "creating"
    AVAILABLE = "available"
    ATTACHING = "attaching"
    IN_USE = "in-use"
    DETACHING = "detaching"
    DELETING = "deleting"
    ERROR = "error"


class Goal(enum.Enum):
    """What a wait waits for."""

    CREATED = "created"
    ATTACHED = "attached"
    DETACHED = "detached"
    DELETED = "deleted"


class Decision(enum.Enum):
    """What a wait does after one look: stop (done), look again, or give up."""

    DONE = "done"
    WAIT = "wait"
    FAIL = "fail"


#: For each goal: the phases that reach it, and those a wait passes through (eventual
#: consistency included: a new volume not yet described, an attach or a detach not yet
#: reported). Any other phase fails the wait.
WAITS: Mapping[Goal, tuple[frozenset, frozenset]] = {
    Goal.CREATED: (frozenset({Phase.AVAILABLE}), frozenset({Phase.CREATING, Phase.GONE})),
    Goal.ATTACHED: (frozenset({Phase.IN_USE}), frozenset({Phase.AVAILABLE, Phase.ATTACHING})),
    Goal.DETACHED: (frozenset({Phase.AVAILABLE}),
                    frozenset({Phase.IN_USE, Phase.ATTACHING, Phase.DETACHING})),
    Goal.DELETED: (frozenset({Phase.DELETING, Phase.GONE}), frozenset({Phase.AVAILABLE})),
}


@attr.s(frozen=True, auto_attribs=True)
class Attachment:
    """A volume's live attachment: the instance, the device name asked for, its state."""

    instance_id: str
    device: str
    state: str


@attr.s(frozen=True, auto_attribs=True)
class WaitLimits:
    """Seconds each wait may last, and between two looks."""

    created: float = 300.0
    attached: float = 300.0
    detached: float = 120.0
    deleted: float = 120.0
    device: float = 60.0
    interval: float = 1.0

    def of(self, goal: Goal) -> float:
        """The limit of a wait for ``goal``."""
        return getattr(self, goal.value)


def tags_of(volume: Mapping) -> dict:
    """A described volume's tags as a dict."""
    return {t["Key"]: t["Value"] for t in volume.get("Tags") or ()}


def attachment_of(volume: Mapping) -> Optional[Attachment]:
    """The volume's live attachment (attaching, attached, detaching or busy), if any."""
    for a in volume.get("Attachments") or ():
        if a.get("State") in _ATTACHED_STATES:
            return Attachment(a.get("InstanceId", ""), a.get("Device", ""), a["State"])
    return None


def phase_of(volume: Optional[Mapping]) -> Phase:
    """The phase of a described volume (None: not described)."""
    if volume is None:
        return Phase.GONE
    state = volume.get("State")
    if state in ("deleting", "deleted"):
        return Phase.DELETING if state == "deleting" else Phase.GONE
    if state in ("creating", "error"):
        return Phase(state)
    attachment = attachment_of(volume)
    if attachment is None:
        # "in-use" with only detached attachments is a detach not fully reported yet.
        return Phase.AVAILABLE if state == "available" else Phase.DETACHING
    if attachment.state == "attaching":
        return Phase.ATTACHING
    if attachment.state == "attached":
        return Phase.IN_USE
    return Phase.DETACHING


def wait_decision(goal: Goal, phase: Phase, elapsed: float, limit: float,
                  instance_ok: bool = True, attached_elsewhere: bool = False) -> Decision:
    """
    One step of a wait for ``goal``: DONE when ``phase`` reaches it (for ATTACHED, on our
    instance: ``instance_ok``; for DETACHED, also once the volume is attached to another
    instance than the one it was detached from: ``attached_elsewhere``, the next node was
    quicker than our look), WAIT while it passes through and ``elapsed`` is within
    ``limit``, FAIL otherwise.
    """
    if goal is Goal.DETACHED and attached_elsewhere:
        return Decision.DONE
    done, passing = WAITS[goal]
    if phase in done and instance_ok:
        return Decision.DONE
    if phase in passing and elapsed < limit:
        return Decision.WAIT
    return Decision.FAIL


def may_force_detach(instance_state: Optional[str], ours: bool) -> bool:
    """
    Whether a detach that did not finish may be forced: only from another instance than
    ours (the caller, convergence, asks for it only once that node is dead and its lease
    has expired), and only once EC2 reports that instance stopped or terminated.
    """
    return not ours and instance_state in STOPPED_STATES


def fsck_succeeded(returncode: int) -> bool:
    """Whether ``e2fsck -p`` left a mountable filesystem: 0 clean, 1 errors corrected, 2
    corrected (a reboot would be advised for a root filesystem)."""
    return returncode in (0, 1, 2)


def volume_size_gib(size: object) -> int:
    """``size`` in bytes as whole GiB, rounded up; ``InvalidVolumeRequest`` if bad or too big."""
    gib = round_size(size, GiB) // GiB
    if gib > MAX_SIZE_GIB:
        raise InvalidVolumeRequest(
            f"volume size {size!r} is more than EBS allows ({MAX_SIZE_GIB} GiB)")
    return gib


def creation_parameters(size_gib: int, profile: Optional[str], encrypted: bool = True,
                        kms_key_id: Optional[str] = None) -> dict:
    """
    The ``CreateVolume`` parameters of a profile: gold is io2 at 500 IOPS a GiB (at least
    100, at most 64000), silver gp3 at 6000 IOPS (as the size allows) and 250 MiB/s, bronze
    (and no profile) gp3 at its baseline (3000 IOPS, 125 MiB/s, the price of the size
    alone). Encrypted unless ``encrypted`` is false, with ``kms_key_id`` if given.
    """
    name = DEFAULT_PROFILE if profile in (None, "") else str(profile).lower()
    if name not in PROFILES:
        raise InvalidVolumeRequest(
            f"profile {profile!r} is not one of {sorted(PROFILES)} (the ebs backend maps "
            f"gold to io2, silver and bronze to gp3)")
    parameters: dict = {"VolumeType": PROFILES[name], "Size": size_gib}
    if name == "gold":
        parameters["Iops"] = max(100, min(64000, 500 * size_gib))
    elif name == "silver":
        parameters["Iops"] = max(3000, min(6000, 500 * size_gib))
        parameters["Throughput"] = 250
    parameters["Encrypted"] = bool(encrypted)
    if encrypted and kms_key_id:
        parameters["KmsKeyId"] = kms_key_id
    return parameters


def choose_device_name(taken: Iterable[str], limit: int, instance_id: str) -> str:
    """
    The first of ``DEVICE_NAMES`` that no attachment in ``taken`` uses (``/dev/sdX`` and
    ``/dev/xvdX`` count as one); ``AttachmentLimitReached`` once ``taken`` has ``limit``.
    """
    used = {device_letters(name) for name in taken}
    if len(used) >= limit:
        raise AttachmentLimitReached(instance_id, limit)
    for name in DEVICE_NAMES:
        if device_letters(name) not in used:
            return name
    raise AttachmentLimitReached(instance_id, len(used))


def device_letters(device: str) -> str:
    """What tells a device name from the others: ``f`` for ``/dev/sdf`` and ``/dev/xvdf``."""
    base = os.path.basename(device)
    for prefix in ("xvd", "sd"):
        if base.startswith(prefix):
            return base[len(prefix):]
    return base


def nvme_serial(volume_id: str) -> str:
    """The NVMe serial of an EBS volume on a Nitro instance: its id without the dash."""
    return volume_id.replace("-", "")


def by_id_path(device_folder: str, volume_id: str) -> str:
    """The udev link of a volume on a Nitro instance, under ``device_folder``."""
    return os.path.join(device_folder, "disk", "by-id", BY_ID_PREFIX + nvme_serial(volume_id))


def xen_device_path(device_folder: str, device_name: str) -> str:
    """Where a Xen instance shows the volume attached as ``device_name`` (sdf: xvdf)."""
    return os.path.join(device_folder, "xvd" + device_letters(device_name))


def device_path_of(device_folder: str, volume_id: str, attachment: Attachment,
                   xen: bool) -> str:
    """The device path pyflock reports for an attached volume (the by-id link, or on Xen
    the ``xvd`` name)."""
    if xen:
        return xen_device_path(device_folder, attachment.device)
    return by_id_path(device_folder, volume_id)


def nvme_device_for(volume_id: str, serials: Mapping[str, str]) -> Optional[str]:
    """The block device name (``nvme1n1``) whose controller serial is the volume's, if
    any, from ``serials`` (block device name: serial)."""
    wanted = nvme_serial(volume_id)
    found = sorted(name for name, serial in serials.items() if serial.strip() == wanted)
    return found[0] if found else None


def block_volume(volume: Mapping, device_folder: str, xen: bool) -> BlockVolume:
    """
    A described volume as a ``BlockVolume``: attached to the node its tags name when its
    attachment is on the instance they name; an attachment pyflock did not make has no node
    (``attached_to`` None) and its device path.
    """
    tags = tags_of(volume)
    size = int(volume["Size"]) * GiB
    attachment = attachment_of(volume)
    if attachment is None:
        return BlockVolume(dataset_id=tags[TAG_DATASET], size=size)
    path = device_path_of(device_folder, volume["VolumeId"], attachment, xen)
    node = tags.get(TAG_NODE) if tags.get(TAG_INSTANCE) == attachment.instance_id else None
    return BlockVolume(dataset_id=tags[TAG_DATASET], size=size, attached_to=node,
                       device_path=path)


def is_listed(volume: Mapping) -> bool:
    """Whether a described volume counts as a dataset's volume (not being deleted, tagged)."""
    return (volume.get("State") not in ("deleting", "deleted", "error")
            and TAG_DATASET in tags_of(volume))


def pick_volume(volumes: Iterable[Mapping]) -> Optional[Mapping]:
    """
    The one volume of a dataset among those described with its tag: an attached one first,
    then the oldest (two exist only if creations raced); None if none counts.
    """
    candidates = [v for v in volumes if is_listed(v)]
    if not candidates:
        return None
    return min(candidates, key=lambda v: (attachment_of(v) is None,
                                          str(v.get("CreateTime", "")), v["VolumeId"]))


def volumes_by_dataset(volumes: Iterable[Mapping]) -> dict:
    """The described volumes grouped by dataset, one each (``pick_volume``)."""
    groups: dict = {}
    for volume in volumes:
        if is_listed(volume):
            groups.setdefault(tags_of(volume)[TAG_DATASET], []).append(volume)
    return {dataset_id: pick_volume(group) for dataset_id, group in sorted(groups.items())}
