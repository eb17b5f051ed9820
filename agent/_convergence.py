"""
Pure convergence: what this node does next about each dataset, as comparable values.

``calculate_changes(desired, discovered)`` compares the configuration as it concerns this
node (``Desired``: every dataset's primary, size, deleted flag and live lease holder, and
which nodes are alive) with what this node found (``Discovered``, made by
``pyflock.agent._discovery``) and returns the next step: leaf changes (``CreateVolume``,
``AttachVolume``, ``MountFilesystem``, ...) combined with ``in_parallel`` and
``sequentially``. The decision for one dataset is the data table
``TRANSITIONS[desired state][discovered state]``. Nothing here does IO or reads a clock;
``pyflock.agent._runner`` runs changes and ``pyflock.agent._loop`` repeats
discover -> calculate -> run until nothing is left to do, so each table entry is one step
and a dataset walks through its steps one rediscovery after another, without waiting for a
timer. A step chains the changes whose inputs this discovery already knows (create and
attach; make a filesystem and mount it, on the device found; unmount, detach and remove
the mount point), since each rediscovery costs a snapshot of the block store: a new
dataset takes two steps, the old primary of a moved one one step, the new primary two.

Safety rules the table keeps (see docs/architecture.md, "Convergence"):

- Only a dataset's primary attaches it, and only while it is attached nowhere: a volume
  attached elsewhere is waited for, never taken.
- A volume held by a node known to be dead (the node list says so, not merely "unknown")
  is taken over by the node that needs it, and only once no other node holds a live lease
  on the dataset: the taker calls the backend's ordinary ``detach_volume``, which never
  pulls a device from under a mounted filesystem (it raises ``VolumeBusy`` instead).
- A node never detaches a volume whose device it still has mounted, never destroys an
  attached volume, and leaves datasets the configuration does not know alone (apart from
  unmounting their devices from other datasets' mount points).
"""

from __future__ import annotations

import enum
import os
from typing import Callable, Iterable, Iterator, Mapping, Optional

import attr
from pyrsistent import PClass, field, pmap, pmap_field

from pyflock.common._records import DatasetReport


class DesiredState(enum.Enum):
    """What this node wants for one dataset."""

    #: This node is the primary: the dataset is mounted at ``<mount_root>/<dataset_id>``.
    MOUNTED = "mounted"
    #: Another node is the primary (or the dataset is deleted and another node destroys
    #: it): not mounted nor attached here, so that the other node can attach it.
    NOT_HERE = "not-here"
    #: Deleted, and this node destroys it: unmounted, detached, destroyed, nothing left.
    DESTROYED = "destroyed"
    #: Deleted but kept for a while, restorable: unmounted and detached on every node
    #: (as ``NOT_HERE``), its volume or copy never destroyed.
    RETAINED = "retained"
    #: Unknown to the configuration: left alone.
    IGNORED = "ignored"


class DiscoveredState(enum.Enum):
    """What this node found about one dataset (``pyflock.agent._discovery.classify``)."""

    #: No volume exists.
    NON_EXISTENT = "non-existent"
    #: A volume exists and no device holds it (a stale record after a reboot counts too).
    UNATTACHED = "unattached"
    #: The volume is attached to another node (``holder``), or to a device no node owns
    #: (``holder`` None: an operator has to detach it).
    ATTACHED_ELSEWHERE = "attached-elsewhere"
    #: Attached to a node that the node list says is dead. Only ``calculate_changes``
    #: gives this state (discovery cannot know who is alive).
    ATTACHED_TO_DEAD_NODE = "attached-to-dead-node"
    #: Attached here, with no filesystem on the device.
    ATTACHED_NO_FILESYSTEM = "attached-no-filesystem"
    #: Attached here with a half-made filesystem (made, but its root not yet prepared:
    #: ``lost+found`` still there, mode 0755): the agent stopped in the middle.
    ATTACHED_UNFINISHED_FILESYSTEM = "attached-unfinished-filesystem"
    #: Attached here with a filesystem, not mounted at its mount point.
    ATTACHED = "attached"
    #: Attached here and mounted at its mount point.
    MOUNTED = "mounted"
    #: Attached here and its device also mounted at other places under the mount root
    #: (``stray_mounts``), which must go before anything else happens to it.
    MOUNTED_ASTRAY = "mounted-astray"
    #: Something that is not this dataset's device attached here is mounted at its mount
    #: point (a mount no record explains).
    STRAY_MOUNT = "stray-mount"
    #: Another dataset's device is mounted at this dataset's mount point; that dataset's
    #: row unmounts it, this one waits.
    MOUNT_POINT_TAKEN = "mount-point-taken"


#: Discovered states in which the volume is attached to this node.
ATTACHED_HERE = frozenset({
    DiscoveredState.ATTACHED_NO_FILESYSTEM, DiscoveredState.ATTACHED_UNFINISHED_FILESYSTEM,
    DiscoveredState.ATTACHED, DiscoveredState.MOUNTED, DiscoveredState.MOUNTED_ASTRAY,
})


# ---------------------------------------------------------------------------------------
# Desired

@attr.s(frozen=True, auto_attribs=True)
class DesiredDataset:
    """
    One dataset as configured: its primary node, size in bytes (None: the backend's
    default), its storage profile (metadata ``profile``: gold, silver, bronze, or None),
    whether it is deleted (and if so whether its data is still kept: ``retained``), the
    node holding a live lease on it (if any), and
    the other nodes that report holding it. The table never reads ``holders``: the
    discovery is the truth about who holds a volume. They are here so that the desired
    state changes when another node takes or lets go of the dataset, which wakes a node
    waiting for it (``pyflock.agent._loop``).
    """

    dataset_id: str
    primary: str
    maximum_size: Optional[int] = None
    deleted: bool = False
    lease_holder: Optional[str] = None
    holders: tuple = ()
    profile: Optional[str] = None
    retained: bool = False


class Desired(PClass):
    """
    The configuration as it concerns node ``node_uuid``: every dataset by id, and the
    cluster's nodes with their alive flags. A node missing from ``nodes`` counts as
    possibly alive: only a node reported dead loses its volumes to a takeover.
    """

    node_uuid = field(type=str, mandatory=True)
    datasets = pmap_field(str, DesiredDataset)
    nodes = pmap_field(str, bool)

    def is_dead(self, node_uuid: Optional[str]) -> bool:
        """Whether the node list says ``node_uuid`` is dead."""
        return node_uuid is not None and self.nodes.get(node_uuid) is False

    def destroyer(self, dataset: DesiredDataset) -> Optional[str]:
        """
        The node that destroys a deleted dataset: its primary, or if the primary is dead
        the alive node with the smallest uuid (None if no node is known alive).
        """
        if not self.is_dead(dataset.primary):
            return dataset.primary
        alive = sorted(n for n, is_alive in self.nodes.items() if is_alive)
        return alive[0] if alive else None

    def state_of(self, dataset_id: str) -> DesiredState:
        """What this node wants for ``dataset_id``."""
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            return DesiredState.IGNORED
        if dataset.deleted and dataset.retained:
            return DesiredState.RETAINED
        if dataset.deleted:
            if self.destroyer(dataset) == self.node_uuid:
                return DesiredState.DESTROYED
            return DesiredState.NOT_HERE
        if dataset.primary == self.node_uuid:
            return DesiredState.MOUNTED
        return DesiredState.NOT_HERE

    def may_take_over(self, dataset_id: str, holder: Optional[str]) -> bool:
        """
        Whether this node may detach ``dataset_id`` from ``holder``: the holder is known
        dead and no other node holds a live lease on the dataset.
        """
        dataset = self.datasets.get(dataset_id)
        lease_holder = None if dataset is None else dataset.lease_holder
        return (self.is_dead(holder)
                and lease_holder in (None, self.node_uuid))


def desired_from_configuration(node_uuid: str, datasets: Iterable, leases: Iterable,
                               nodes: Mapping[str, bool], now: float,
                               holders: Mapping[str, Iterable[str]] = pmap()) -> Desired:
    """
    Build ``Desired`` for ``node_uuid`` from configuration values (pure): ``datasets``
    are ``pyflock.common.Dataset`` values (or ``DatasetEntry``), ``leases`` are
    ``pyflock.common.Lease`` values (absolute ``expiration``); ``nodes``
    maps node uuids to alive flags; ``now`` decides which leases are still live;
    ``holders`` gives the nodes that report holding each dataset (this node left out).
    """
    lease_holders = {lease.dataset_id: lease.node_uuid for lease in leases
                     if not lease.expired(now)}
    records = {}
    for dataset in datasets:
        records[dataset.dataset_id] = DesiredDataset(
            dataset_id=dataset.dataset_id, primary=dataset.primary,
            maximum_size=dataset.maximum_size, deleted=bool(dataset.deleted),
            retained=dataset.retained_until is not None,
            profile=dataset.metadata.get("profile"),
            lease_holder=None if dataset.deleted else lease_holders.get(dataset.dataset_id),
            holders=tuple(sorted(n for n in holders.get(dataset.dataset_id, ())
                                 if n != node_uuid)))
    return Desired(node_uuid=node_uuid, datasets=pmap(records),
                   nodes=pmap({k: bool(v) for k, v in nodes.items()}))


def desired_from_view(node_uuid: str, view, now: float) -> Optional[Desired]:
    """
    ``Desired`` for ``node_uuid`` from the agent's ``AgentView`` at ``now`` (pure): its
    datasets with their leases and holders, its nodes with their alive flags. None while
    the view is the empty one an agent starts with (no view loaded or received yet):
    nothing can be decided then.
    """
    if view.current is None:
        return None
    entries = view.datasets.values()
    return desired_from_configuration(
        node_uuid, datasets=entries,
        leases=[d.lease for d in entries if d.lease is not None],
        nodes={n.uuid: n.alive for n in view.nodes.values()}, now=now,
        holders={d.dataset_id: d.holders for d in entries})


def view_desire(node_uuid: str) -> Callable:
    """The ``desire(view, now)`` of ``node_uuid``'s convergence loop: ``desired_from_view``."""
    def desire(view, now: float) -> Optional[Desired]:
        return desired_from_view(node_uuid, view, now)
    return desire


# ---------------------------------------------------------------------------------------
# Discovered

@attr.s(frozen=True, auto_attribs=True)
class DiscoveredDataset:
    """
    One dataset as this node found it: its state, its mount point here, the volume's
    size, the device it is attached as here, the node holding it elsewhere, the other
    places its device is mounted (``MOUNTED_ASTRAY``), and whether an empty, unmounted
    directory is left at its mount point.
    """

    dataset_id: str
    state: DiscoveredState
    mount_point: str
    size: Optional[int] = None
    device: Optional[str] = None
    holder: Optional[str] = None
    stray_mounts: tuple = ()
    mount_point_left: bool = False
    #: Peer-to-peer backends only (``state`` a ``PeerState``): the latest snapshot of a
    #: partial copy here; ``device`` is then the folder of a complete copy's data.
    snapshot: Optional[str] = None
    #: Peer-to-peer backends only: whether the complete copy is frozen (read-only: a
    #: move's phase 2 stopped its writes).
    frozen: bool = False


class Discovered(PClass):
    """What node ``node_uuid`` found, by dataset id, with its mount root."""

    node_uuid = field(type=str, mandatory=True)
    mount_root = field(type=str, mandatory=True)
    datasets = pmap_field(str, DiscoveredDataset)

    def mount_point(self, dataset_id: str) -> str:
        """Where ``dataset_id`` is mounted on this node."""
        return os.path.join(self.mount_root, dataset_id)

    def get(self, dataset_id: str) -> DiscoveredDataset:
        """The dataset as found; a dataset nothing was found of is ``NON_EXISTENT``."""
        found = self.datasets.get(dataset_id)
        if found is None:
            return DiscoveredDataset(dataset_id=dataset_id,
                                     state=DiscoveredState.NON_EXISTENT,
                                     mount_point=self.mount_point(dataset_id))
        return found


# ---------------------------------------------------------------------------------------
# Changes

@attr.s(frozen=True, auto_attribs=True)
class CreateVolume:
    """Create the dataset's volume, ``size`` bytes (None: the backend's default), of the
    dataset's storage ``profile`` (None: the backend's default)."""

    dataset_id: str
    size: Optional[int] = None
    profile: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class AttachVolume:
    """
    Attach the dataset's (unattached) volume to ``node_uuid``, this node; with
    ``mount_point``, then mount it there at once if it holds a filesystem ready to mount
    (a spare's, a moved volume's), as the next pass would: a new volume's first Mount
    waits one discovery less. Anything else (no filesystem, a half-made one, a mount
    that fails) is left to the next pass.
    """

    dataset_id: str
    node_uuid: str
    mount_point: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class CreateFilesystem:
    """Make a filesystem on ``device``, the dataset's volume attached here."""

    dataset_id: str
    device: str


@attr.s(frozen=True, auto_attribs=True)
class FinishFilesystem:
    """Prepare the root of the half-made filesystem on ``device`` (no lost+found, 0777)."""

    dataset_id: str
    device: str


@attr.s(frozen=True, auto_attribs=True)
class MountFilesystem:
    """Mount ``device``, the dataset's volume attached here, at ``mount_point``."""

    dataset_id: str
    device: str
    mount_point: str


@attr.s(frozen=True, auto_attribs=True)
class UnmountFilesystem:
    """Unmount whatever is mounted at ``mount_point`` (concerning ``dataset_id``)."""

    dataset_id: str
    mount_point: str


@attr.s(frozen=True, auto_attribs=True)
class RemoveMountPoint:
    """Remove the empty, unmounted directory ``mount_point``."""

    dataset_id: str
    mount_point: str


@attr.s(frozen=True, auto_attribs=True)
class DetachVolume:
    """
    Detach the dataset's volume from ``node_uuid``: this node, or a dead node whose volume
    this node takes over. Done only while ``node_uuid`` still holds it. ``discard``: the
    volume is destroyed next, so what it holds need not be made durable first.
    """

    dataset_id: str
    node_uuid: str
    discard: bool = False


@attr.s(frozen=True, auto_attribs=True)
class DestroyVolume:
    """Destroy the dataset's unattached volume and its data."""

    dataset_id: str


#: The leaf change classes; each touches one dataset.
LEAF_CHANGES = (CreateVolume, AttachVolume, CreateFilesystem, FinishFilesystem,
                MountFilesystem, UnmountFilesystem, RemoveMountPoint, DetachVolume,
                DestroyVolume)


@attr.s(frozen=True, auto_attribs=True)
class InParallel:
    """Changes run at the same time; done when all are, failed if any failed."""

    changes: tuple = ()


@attr.s(frozen=True, auto_attribs=True)
class Sequentially:
    """Changes run one after the other; the first failure stops the rest."""

    changes: tuple = ()


def is_nothing(change) -> bool:
    """Whether ``change`` has nothing to do."""
    return isinstance(change, (InParallel, Sequentially)) and all(
        is_nothing(c) for c in change.changes)


def _combine(kind: type, changes: Iterable) -> tuple:
    result = []
    for change in changes:
        if is_nothing(change):
            continue
        if isinstance(change, kind):
            result.extend(change.changes)
        else:
            result.append(change)
    return tuple(result)


def in_parallel(changes: Iterable) -> InParallel:
    """Run ``changes`` at the same time (nested parallel groups and no-ops flattened)."""
    return InParallel(changes=_combine(InParallel, changes))


def sequentially(changes: Iterable) -> Sequentially:
    """Run ``changes`` in order (nested sequences and no-ops flattened)."""
    return Sequentially(changes=_combine(Sequentially, changes))


#: The change that does nothing.
NOTHING = InParallel()


def leaves(change) -> Iterator:
    """The leaf changes in ``change``, in order."""
    if isinstance(change, (InParallel, Sequentially)):
        for child in change.changes:
            yield from leaves(child)
    else:
        yield change


def without(change, skipped) -> object:
    """
    ``change`` without the leaves in ``skipped`` (pure). A sequence stops before its first
    part that holds a skipped leaf, since what follows relies on it.
    """
    if isinstance(change, InParallel):
        return in_parallel(without(c, skipped) for c in change.changes)
    if isinstance(change, Sequentially):
        kept = []
        for child in change.changes:
            if any(leaf in skipped for leaf in leaves(child)):
                break
            kept.append(child)
        return sequentially(kept)
    return NOTHING if change in skipped else change


def summarize(change) -> str:
    """A short, human-readable list of the leaf changes, for logs."""
    return "; ".join(f"{type(c).__name__}({c.dataset_id})" for c in leaves(change))


# ---------------------------------------------------------------------------------------
# The table

#: A table entry: from this node's uuid, the configured dataset (None when IGNORED) and
#: the dataset as found, the change to make now.
Transition = Callable[[str, Optional[DesiredDataset], DiscoveredDataset], object]


def wait(node_uuid, wanted, found):
    """Nothing to do now: another node (or an operator, or another row) acts first."""
    return NOTHING


def create(node_uuid, wanted, found):
    """Create the volume, of the configured size."""
    return CreateVolume(dataset_id=found.dataset_id, size=wanted.maximum_size,
                        profile=wanted.profile)


def attach(node_uuid, wanted, found):
    """Attach the unattached volume here, and mount it if its filesystem is ready."""
    return AttachVolume(dataset_id=found.dataset_id, node_uuid=node_uuid,
                        mount_point=found.mount_point)


def create_and_attach(node_uuid, wanted, found):
    """Create the volume, of the configured size, attach it here and mount it if it came
    with a filesystem (a spare)."""
    return sequentially([create(node_uuid, wanted, found), attach(node_uuid, wanted, found)])


def take_over(node_uuid, wanted, found):
    """Detach the volume from the dead node holding it, so that this node can have it."""
    return DetachVolume(dataset_id=found.dataset_id, node_uuid=found.holder)


def make_filesystem(node_uuid, wanted, found):
    """Make a filesystem on the attached device."""
    return CreateFilesystem(dataset_id=found.dataset_id, device=found.device)


def finish_filesystem(node_uuid, wanted, found):
    """Finish the half-made filesystem."""
    return FinishFilesystem(dataset_id=found.dataset_id, device=found.device)


def mount(node_uuid, wanted, found):
    """Mount the attached device (or a peer copy's folder) at the dataset's mount point."""
    return MountFilesystem(dataset_id=found.dataset_id, device=found.device,
                           mount_point=found.mount_point)


def make_filesystem_and_mount(node_uuid, wanted, found):
    """Make a filesystem on the attached device and mount it."""
    return sequentially([make_filesystem(node_uuid, wanted, found),
                         mount(node_uuid, wanted, found)])


def finish_filesystem_and_mount(node_uuid, wanted, found):
    """Finish the half-made filesystem and mount it."""
    return sequentially([finish_filesystem(node_uuid, wanted, found),
                         mount(node_uuid, wanted, found)])


def unmount(node_uuid, wanted, found):
    """Unmount whatever is mounted at the dataset's mount point."""
    return UnmountFilesystem(dataset_id=found.dataset_id, mount_point=found.mount_point)


def unmount_strays(node_uuid, wanted, found):
    """Unmount the dataset's device from the other places it is mounted at."""
    return in_parallel(UnmountFilesystem(dataset_id=found.dataset_id, mount_point=path)
                       for path in found.stray_mounts)


def detach(node_uuid, wanted, found):
    """Detach the (unmounted) volume from this node."""
    return DetachVolume(dataset_id=found.dataset_id, node_uuid=node_uuid)


def unmount_and_detach(node_uuid, wanted, found):
    """Unmount the dataset and detach its volume from this node."""
    return sequentially([unmount(node_uuid, wanted, found), detach(node_uuid, wanted, found)])


def tidy(node_uuid, wanted, found):
    """Remove an empty directory left at the mount point, if any."""
    if found.mount_point_left:
        return RemoveMountPoint(dataset_id=found.dataset_id, mount_point=found.mount_point)
    return NOTHING


def destroy(node_uuid, wanted, found):
    """Destroy the unattached volume (and tidy the mount point)."""
    return in_parallel([DestroyVolume(dataset_id=found.dataset_id),
                        tidy(node_uuid, wanted, found)])


def detach_and_destroy(node_uuid, wanted, found):
    """Detach the deleted dataset's volume from this node and destroy it, in one step."""
    return sequentially([DetachVolume(dataset_id=found.dataset_id, node_uuid=node_uuid,
                                      discard=True),
                         destroy(node_uuid, wanted, found)])


def unmount_detach_and_destroy(node_uuid, wanted, found):
    """Unmount the deleted dataset, detach its volume from this node, destroy it and
    remove the mount point, in one step."""
    return sequentially([unmount(node_uuid, wanted, found),
                         DetachVolume(dataset_id=found.dataset_id, node_uuid=node_uuid,
                                      discard=True),
                         in_parallel([DestroyVolume(dataset_id=found.dataset_id),
                                      RemoveMountPoint(dataset_id=found.dataset_id,
                                                       mount_point=found.mount_point)])])


def take_over_and_tidy(node_uuid, wanted, found):
    """Take the volume from its dead holder (and tidy the mount point)."""
    return in_parallel([take_over(node_uuid, wanted, found), tidy(node_uuid, wanted, found)])


def let_go(node_uuid, wanted, found):
    """
    Unmount the dataset, detach its volume from this node and remove the mount point
    left empty, so that its new primary can have it.
    """
    return sequentially([unmount_and_detach(node_uuid, wanted, found),
                         RemoveMountPoint(dataset_id=found.dataset_id,
                                          mount_point=found.mount_point)])


_D = DiscoveredState

#: The row of a dataset that must not be here: mounted nowhere, attached nowhere here.
_LET_GO_ROW: Mapping[DiscoveredState, Transition] = {
    _D.NON_EXISTENT: tidy,
    _D.UNATTACHED: tidy,
    _D.ATTACHED_ELSEWHERE: tidy,
    _D.ATTACHED_TO_DEAD_NODE: tidy,
    _D.ATTACHED_NO_FILESYSTEM: detach,
    _D.ATTACHED_UNFINISHED_FILESYSTEM: detach,
    _D.ATTACHED: detach,
    _D.MOUNTED: let_go,
    _D.MOUNTED_ASTRAY: unmount_strays,
    _D.STRAY_MOUNT: unmount,
    _D.MOUNT_POINT_TAKEN: wait,
}

#: ``TRANSITIONS[desired state][discovered state]``: the next step for one dataset.
TRANSITIONS: Mapping[DesiredState, Mapping[DiscoveredState, Transition]] = {
    DesiredState.MOUNTED: {
        _D.NON_EXISTENT: create_and_attach,
        _D.UNATTACHED: attach,
        _D.ATTACHED_ELSEWHERE: wait,
        _D.ATTACHED_TO_DEAD_NODE: take_over,
        _D.ATTACHED_NO_FILESYSTEM: make_filesystem_and_mount,
        _D.ATTACHED_UNFINISHED_FILESYSTEM: finish_filesystem_and_mount,
        _D.ATTACHED: mount,
        _D.MOUNTED: wait,
        _D.MOUNTED_ASTRAY: unmount_strays,
        _D.STRAY_MOUNT: unmount,
        _D.MOUNT_POINT_TAKEN: wait,
    },
    DesiredState.NOT_HERE: _LET_GO_ROW,
    DesiredState.DESTROYED: {
        _D.NON_EXISTENT: tidy,
        _D.UNATTACHED: destroy,
        _D.ATTACHED_ELSEWHERE: tidy,
        _D.ATTACHED_TO_DEAD_NODE: take_over_and_tidy,
        _D.ATTACHED_NO_FILESYSTEM: detach_and_destroy,
        _D.ATTACHED_UNFINISHED_FILESYSTEM: detach_and_destroy,
        _D.ATTACHED: detach_and_destroy,
        _D.MOUNTED: unmount_detach_and_destroy,
        _D.MOUNTED_ASTRAY: unmount_strays,
        _D.STRAY_MOUNT: unmount,
        _D.MOUNT_POINT_TAKEN: wait,
    },
    # Deleted but kept: let go of everywhere, as for a dataset whose primary is elsewhere,
    # so that the volume stays whole and unattached until restored or purged.
    DesiredState.RETAINED: _LET_GO_ROW,
    # Unknown datasets may be the configuration's future (a view not yet received) or
    # someone else's: their volumes and mounts stay, but their devices never squat other
    # datasets' mount points, and an empty directory is no loss.
    DesiredState.IGNORED: {
        _D.NON_EXISTENT: tidy,
        _D.UNATTACHED: tidy,
        _D.ATTACHED_ELSEWHERE: tidy,
        _D.ATTACHED_TO_DEAD_NODE: tidy,
        _D.ATTACHED_NO_FILESYSTEM: wait,
        _D.ATTACHED_UNFINISHED_FILESYSTEM: wait,
        _D.ATTACHED: wait,
        _D.MOUNTED: wait,
        _D.MOUNTED_ASTRAY: unmount_strays,
        _D.STRAY_MOUNT: wait,
        _D.MOUNT_POINT_TAKEN: wait,
    },
}


def effective_state(desired: Desired, found: DiscoveredDataset) -> DiscoveredDataset:
    """``found``, as ``ATTACHED_TO_DEAD_NODE`` if this node may take it over (pure)."""
    if (found.state is DiscoveredState.ATTACHED_ELSEWHERE
            and desired.may_take_over(found.dataset_id, found.holder)):
        return attr.evolve(found, state=DiscoveredState.ATTACHED_TO_DEAD_NODE)
    return found


def _check_same_node(desired: Desired, discovered: Discovered) -> None:
    """``ValueError`` unless ``desired`` and ``discovered`` are of one node."""
    if desired.node_uuid != discovered.node_uuid:
        raise ValueError(f"desired state of node {desired.node_uuid} compared with what "
                         f"node {discovered.node_uuid} discovered")


def calculate_changes(desired: Desired, discovered: Discovered):
    """
    The next step towards ``desired`` from ``discovered`` (pure): one table entry per
    dataset, all in parallel, in dataset id order; ``NOTHING`` when nothing is left to do.
    """
    _check_same_node(desired, discovered)
    changes = []
    for dataset_id in sorted(set(desired.datasets) | set(discovered.datasets)):
        found = effective_state(desired, discovered.get(dataset_id))
        wanted = desired.datasets.get(dataset_id)
        transition = TRANSITIONS[desired.state_of(dataset_id)][found.state]
        changes.append(transition(desired.node_uuid, wanted, found))
    return in_parallel(changes)


def is_waiting(desired: Desired, discovered: Discovered) -> bool:
    """
    Whether this node waits for another node to let go of a volume it needs (pure). The
    push of that node's report that it let go (the dataset's ``holders``) wakes the loop;
    while waiting it also looks again soon rather than at its slow, safety-net pace, for
    the volumes no report announces (one attached to a device no node owns).
    """
    for dataset_id in desired.datasets:
        if desired.state_of(dataset_id) not in (DesiredState.MOUNTED, DesiredState.DESTROYED):
            continue
        found = discovered.get(dataset_id)
        if found.state is DiscoveredState.ATTACHED_ELSEWHERE and found.holder is not None:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Reported state

_COMING = frozenset({_D.ATTACHED_ELSEWHERE, _D.ATTACHED_TO_DEAD_NODE})


def _status(desired: Desired, found: DiscoveredDataset) -> Optional[str]:
    wanted = desired.datasets.get(found.dataset_id)
    here = found.state in ATTACHED_HERE
    state = desired.state_of(found.dataset_id)
    if state is DesiredState.MOUNTED:
        if found.state is _D.MOUNTED:
            return "mounted"
        if found.state is _D.NON_EXISTENT:
            return "creating"
        if found.state in _COMING:
            return "moving"
        return "attaching"
    if state is DesiredState.DESTROYED:
        return None if found.state is _D.NON_EXISTENT else "deleting"
    if state in (DesiredState.NOT_HERE, DesiredState.RETAINED) and here:
        return "deleting" if wanted.deleted else "moving"
    return None


def dataset_states(desired: Desired, discovered: Discovered):
    """
    What this node reports (pure): a ``pmap`` of dataset id to ``DatasetReport`` for the
    datasets this node is the primary of, holds, or destroys; unknown datasets and those
    with nothing here are left out. ``state`` is ``creating`` (no volume yet),
    ``attaching`` (attaching, making its filesystem, mounting), ``mounted``, ``moving``
    (held by another node on its way here, or leaving this node) or ``deleting``; ``path``
    is set once mounted; ``maximum_size`` is the volume's size (the configured size until
    the volume exists). The agent channel sends these as they are.
    """
    states = {}
    for dataset_id in sorted(set(desired.datasets) | set(discovered.datasets)):
        found = effective_state(desired, discovered.get(dataset_id))
        status = _status(desired, found)
        if status is None:
            continue
        wanted = desired.datasets.get(dataset_id)
        size = found.size if found.size is not None else wanted.maximum_size
        states[dataset_id] = DatasetReport(
            dataset_id=dataset_id, state=status, maximum_size=size,
            path=found.mount_point if status == "mounted" else None)
    return pmap(states)


# ---------------------------------------------------------------------------------------
# Backend kinds: the peer-to-peer rows
#
# A block-device backend (loopback, EBS) moves a dataset by detaching its one volume and
# attaching it elsewhere: the rows above. A peer-to-peer backend (btrfs, a later issue)
# keeps a copy per node and moves a dataset by copying it: the new primary receives it
# from a node holding a complete copy (bulk while it is still in use there, then the
# last delta once the old primary froze it: ``pyflock.agent._peer_move``), instead of
# attaching it. The old primary keeps its frozen copy mounted until the primary holds
# the dataset, then unmounts it and demotes it to its last snapshot, the base of a move
# back; a frozen copy whose node is the primary again (a cancelled move) is thawed, or,
# if the new node already took the dataset, demoted so that its changes come back. Both kinds
# share the mount steps (``MountFilesystem``, ``UnmountFilesystem``,
# ``RemoveMountPoint``; the mount states and their rows); a peer copy is a filesystem
# when it is made, so it has no filesystem steps of its own.
#
# Who holds what comes from the view's ``holders``: on a peer backend a node reports a
# dataset only while it holds a complete copy of it (or creates it as its primary), never
# a partial one, so that "the primary holds it" means the move is done and the old copy
# may go, and never a frozen copy once another node reports a complete one (that copy
# was made from the frozen one). A copy lets go only once frozen: only then can another
# node hold all of its data. Known gap (it needs the view to say which copy is the current
# one, a new field and so a new protocol version): a dataset whose only copy is on a dead
# node (wiped from the holders) looks never made, and its primary would create it empty.


class BackendKind(enum.Enum):
    """How a backend moves a dataset between nodes."""

    #: One shared volume, detached and attached (loopback, EBS): ``TRANSITIONS``.
    BLOCK_DEVICE = "block-device"
    #: A copy per node, streamed from node to node (btrfs): ``PEER_TRANSITIONS``.
    PEER_TO_PEER = "peer-to-peer"


class PeerState(enum.Enum):
    """What a node with a peer-to-peer backend found about one dataset."""

    #: No copy here, and no other live node reports holding one.
    NON_EXISTENT = "non-existent"
    #: No copy here; another live node (``holder``) holds a complete one. Only
    #: ``calculate_changes`` gives this state (discovery cannot know who holds what).
    HELD_ELSEWHERE = "held-elsewhere"
    #: A partial copy here (received up to ``snapshot``), and a live node (``holder``)
    #: holds a complete one to continue from (discovery gives it with no holder).
    PARTIAL = "partial"
    #: A partial copy here, and no live node holds a complete one to continue from.
    PARTIAL_NO_SOURCE = "partial-no-source"
    #: A complete copy here (its data in the folder ``device``), not mounted.
    UNMOUNTED = "unmounted"
    #: A complete copy here, not mounted, and the dataset's primary (another node) holds
    #: a complete copy too: the move is done. Only ``calculate_changes`` gives it.
    SUPERSEDED = "superseded"
    #: A complete copy here, mounted at its mount point.
    MOUNTED = "mounted"
    #: As ``DiscoveredState.MOUNTED_ASTRAY``: mounted at other places too.
    MOUNTED_ASTRAY = "mounted-astray"
    #: As ``DiscoveredState.STRAY_MOUNT``: something unexplained is mounted there.
    STRAY_MOUNT = "stray-mount"
    #: As ``DiscoveredState.MOUNT_POINT_TAKEN``: another dataset is mounted there.
    MOUNT_POINT_TAKEN = "mount-point-taken"


@attr.s(frozen=True, auto_attribs=True)
class CreateDataset:
    """Create this node's (empty, complete) copy of the dataset, ``size`` bytes."""

    dataset_id: str
    size: Optional[int] = None


@attr.s(frozen=True, auto_attribs=True)
class ReceiveDataset:
    """
    Copy the dataset from ``from_node``: its stream from ``base`` (the latest snapshot of
    this node's partial copy; None: the whole dataset), imported here. The runner
    makes the whole move (``pyflock.agent._peer_move``): phase-1 rounds, then the final
    delta once ``from_node`` froze its copy, then it completes the copy here.
    """

    dataset_id: str
    from_node: str
    base: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class DestroyDataset:
    """Destroy this node's unmounted copy of the dataset (complete or partial)."""

    dataset_id: str


@attr.s(frozen=True, auto_attribs=True)
class DemoteDataset:
    """
    Drop this node's unmounted writable copy of a dataset that moved on, keeping only its
    snapshot ``keep`` (the last one sent: the base of a move back).
    """

    dataset_id: str
    keep: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ThawDataset:
    """Make this node's frozen copy writable again: the move away from here was cancelled."""

    dataset_id: str


#: The leaf changes of peer-to-peer rows; each touches one dataset.
PEER_LEAF_CHANGES = (CreateDataset, ReceiveDataset, DestroyDataset, DemoteDataset,
                     ThawDataset, MountFilesystem, UnmountFilesystem, RemoveMountPoint)


def create_copy(node_uuid, wanted, found):
    """Create this node's copy, of the configured size."""
    return CreateDataset(dataset_id=found.dataset_id, size=wanted.maximum_size)


def receive(node_uuid, wanted, found):
    """Receive the dataset from the node holding it (whole, or from the partial copy on)."""
    return ReceiveDataset(dataset_id=found.dataset_id, from_node=found.holder,
                          base=found.snapshot)


def destroy_copy(node_uuid, wanted, found):
    """Destroy this node's unmounted copy (and tidy the mount point)."""
    return in_parallel([DestroyDataset(dataset_id=found.dataset_id),
                        tidy(node_uuid, wanted, found)])


def unmount_and_keep(node_uuid, wanted, found):
    """Unmount the copy and remove its mount point, keeping the copy (a retained one)."""
    return sequentially([unmount(node_uuid, wanted, found),
                         RemoveMountPoint(dataset_id=found.dataset_id,
                                          mount_point=found.mount_point)])


def _primary_holds(wanted) -> bool:
    """Whether the dataset's primary (another node) reports holding a complete copy."""
    return wanted is not None and wanted.primary in wanted.holders


def hand_over(node_uuid, wanted, found):
    """
    Keep the old primary's copy mounted while the new primary copies it (its transfer
    freezes it for the last delta); once the new primary holds it, unmount it here. A copy
    that is not frozen was never sent whole, so whatever the primary holds is older.
    """
    if found.frozen and _primary_holds(wanted):
        return unmount_and_keep(node_uuid, wanted, found)
    return wait(node_uuid, wanted, found)


def _taken_elsewhere(wanted, found) -> bool:
    """
    Whether this node's copy is frozen and another node reports a complete copy: a move
    away froze it and completed elsewhere (that copy was made from this one's last
    snapshot, and may have been written since), so this one no longer counts.
    """
    return found.frozen and wanted is not None and bool(wanted.holders)


def keep_mounted(node_uuid, wanted, found):
    """
    The primary's mounted copy: thaw it if a move away froze it and was cancelled before
    any other node took the dataset (then only this copy counts); if another node took
    it, let go of this copy to receive that one's changes back.
    """
    if _taken_elsewhere(wanted, found):
        return unmount_and_keep(node_uuid, wanted, found)
    if found.frozen:
        return ThawDataset(dataset_id=found.dataset_id)
    return wait(node_uuid, wanted, found)


def mount_copy(node_uuid, wanted, found):
    """
    Mount the primary's complete copy, unless it is frozen and another node took the
    dataset: then demote it to its last snapshot, the base to receive that copy from.
    """
    if _taken_elsewhere(wanted, found):
        return DemoteDataset(dataset_id=found.dataset_id, keep=found.snapshot)
    return mount(node_uuid, wanted, found)


def demote(node_uuid, wanted, found):
    """Demote this node's copy of a dataset the primary now holds to its last snapshot."""
    return in_parallel([DemoteDataset(dataset_id=found.dataset_id, keep=found.snapshot),
                        tidy(node_uuid, wanted, found)])


def unmount_and_destroy(node_uuid, wanted, found):
    """Unmount the copy, then destroy it."""
    return sequentially([unmount(node_uuid, wanted, found),
                         DestroyDataset(dataset_id=found.dataset_id)])


_P = PeerState

#: ``PEER_TRANSITIONS[desired state][peer state]``: the next step for one dataset on a
#: peer-to-peer backend. ``DESTROYED`` is every node with a copy of a deleted dataset.
PEER_TRANSITIONS: Mapping[DesiredState, Mapping[PeerState, Transition]] = {
    DesiredState.MOUNTED: {
        _P.NON_EXISTENT: create_copy,
        _P.HELD_ELSEWHERE: receive,
        _P.PARTIAL: receive,
        _P.PARTIAL_NO_SOURCE: wait,
        _P.UNMOUNTED: mount_copy,
        _P.SUPERSEDED: mount,
        _P.MOUNTED: keep_mounted,
        _P.MOUNTED_ASTRAY: unmount_strays,
        _P.STRAY_MOUNT: unmount,
        _P.MOUNT_POINT_TAKEN: wait,
    },
    DesiredState.NOT_HERE: {
        _P.NON_EXISTENT: tidy,
        _P.HELD_ELSEWHERE: tidy,
        # A demoted copy, or a cancelled receive: the base of a later move here.
        _P.PARTIAL: tidy,
        _P.PARTIAL_NO_SOURCE: tidy,
        # The source the primary copies from: kept until the primary holds it.
        _P.UNMOUNTED: tidy,
        _P.SUPERSEDED: demote,
        _P.MOUNTED: hand_over,
        _P.MOUNTED_ASTRAY: unmount_strays,
        _P.STRAY_MOUNT: unmount,
        _P.MOUNT_POINT_TAKEN: wait,
    },
    # Deleted but kept: every copy stays, unmounted; partial copies, never complete, go.
    DesiredState.RETAINED: {
        _P.NON_EXISTENT: tidy,
        _P.HELD_ELSEWHERE: tidy,
        _P.PARTIAL: destroy_copy,
        _P.PARTIAL_NO_SOURCE: destroy_copy,
        _P.UNMOUNTED: tidy,
        _P.SUPERSEDED: tidy,
        _P.MOUNTED: unmount_and_keep,
        _P.MOUNTED_ASTRAY: unmount_strays,
        _P.STRAY_MOUNT: unmount,
        _P.MOUNT_POINT_TAKEN: wait,
    },
    DesiredState.DESTROYED: {
        _P.NON_EXISTENT: tidy,
        _P.HELD_ELSEWHERE: tidy,
        _P.PARTIAL: destroy_copy,
        _P.PARTIAL_NO_SOURCE: destroy_copy,
        _P.UNMOUNTED: destroy_copy,
        _P.SUPERSEDED: destroy_copy,
        _P.MOUNTED: unmount_and_destroy,
        _P.MOUNTED_ASTRAY: unmount_strays,
        _P.STRAY_MOUNT: unmount,
        _P.MOUNT_POINT_TAKEN: wait,
    },
    DesiredState.IGNORED: {
        _P.NON_EXISTENT: tidy,
        _P.HELD_ELSEWHERE: tidy,
        _P.PARTIAL: wait,
        _P.PARTIAL_NO_SOURCE: wait,
        _P.UNMOUNTED: wait,
        _P.SUPERSEDED: wait,
        _P.MOUNTED: wait,
        _P.MOUNTED_ASTRAY: unmount_strays,
        _P.STRAY_MOUNT: wait,
        _P.MOUNT_POINT_TAKEN: wait,
    },
}

#: The rows of each backend kind.
TRANSITIONS_BY_KIND = {BackendKind.BLOCK_DEVICE: TRANSITIONS,
                       BackendKind.PEER_TO_PEER: PEER_TRANSITIONS}


def peer_desired_state(desired: Desired, dataset_id: str) -> DesiredState:
    """
    What this node wants for ``dataset_id`` on a peer-to-peer backend (pure): as
    ``Desired.state_of``, except that every node destroys its own copy of a deleted one
    once it is no longer retained.
    """
    dataset = desired.datasets.get(dataset_id)
    if dataset is not None and dataset.deleted and not dataset.retained:
        return DesiredState.DESTROYED
    return desired.state_of(dataset_id)


def copy_source(desired: Desired, dataset_id: str) -> Optional[str]:
    """The live node (smallest uuid) reporting a complete copy of ``dataset_id``, if any."""
    dataset = desired.datasets.get(dataset_id)
    live = [] if dataset is None else [n for n in dataset.holders if not desired.is_dead(n)]
    return min(live) if live else None


def peer_found(desired: Desired, discovered: Discovered,
               dataset_id: str) -> DiscoveredDataset:
    """
    What this node found of ``dataset_id`` on a peer-to-peer backend, completed with what
    the view says of other nodes (pure): who to receive it from, and whether the primary
    already holds the copy this node keeps.
    """
    found = discovered.datasets.get(dataset_id)
    if found is None:
        found = DiscoveredDataset(dataset_id=dataset_id, state=_P.NON_EXISTENT,
                                  mount_point=discovered.mount_point(dataset_id))
    source = copy_source(desired, dataset_id)
    if found.state is _P.NON_EXISTENT and source is not None:
        return attr.evolve(found, state=_P.HELD_ELSEWHERE, holder=source)
    if found.state in (_P.PARTIAL, _P.PARTIAL_NO_SOURCE):
        return attr.evolve(found, holder=source,
                           state=_P.PARTIAL if source else _P.PARTIAL_NO_SOURCE)
    wanted = desired.datasets.get(dataset_id)
    # Only a frozen copy can have been sent whole (a move's phase 2 froze it): a copy
    # still writable here is newer than whatever the primary holds, and stays the source.
    if (found.state is _P.UNMOUNTED and wanted is not None and found.frozen
            and wanted.primary != desired.node_uuid and wanted.primary in wanted.holders
            and not desired.is_dead(wanted.primary)):
        return attr.evolve(found, state=_P.SUPERSEDED)
    return found


def calculate_peer_changes(desired: Desired, discovered: Discovered):
    """
    The next step on a peer-to-peer backend (pure): one ``PEER_TRANSITIONS`` entry per
    dataset, all in parallel, in dataset id order; ``NOTHING`` when nothing is left to do.
    """
    _check_same_node(desired, discovered)
    changes = []
    for dataset_id in sorted(set(desired.datasets) | set(discovered.datasets)):
        found = peer_found(desired, discovered, dataset_id)
        transition = PEER_TRANSITIONS[peer_desired_state(desired, dataset_id)][found.state]
        changes.append(transition(desired.node_uuid, desired.datasets.get(dataset_id),
                                  found))
    return in_parallel(changes)


_DELETING = {_P.UNMOUNTED: "deleting", _P.SUPERSEDED: "deleting", _P.MOUNTED: "deleting",
             _P.MOUNTED_ASTRAY: "deleting"}

#: What a node reports of a dataset on a peer-to-peer backend, by desired and found state
#: (absent: nothing). A partial copy is never reported: see the holders rule above.
_PEER_STATUS = {
    DesiredState.MOUNTED: {_P.NON_EXISTENT: "creating", _P.UNMOUNTED: "attaching",
                           _P.SUPERSEDED: "attaching", _P.MOUNTED: "mounted",
                           _P.MOUNTED_ASTRAY: "attaching"},
    DesiredState.NOT_HERE: {_P.UNMOUNTED: "moving", _P.SUPERSEDED: "moving",
                            _P.MOUNTED: "moving", _P.MOUNTED_ASTRAY: "moving"},
    DesiredState.DESTROYED: _DELETING,
    # A kept copy is reported, so that a restore onto another node copies it from here.
    DesiredState.RETAINED: _DELETING,
}


def _superseded_frozen(desired: Desired, found: DiscoveredDataset) -> bool:
    """
    Whether this node's copy is frozen while another live node reports a complete one:
    that copy was made from this one's last snapshot (and may have been written since),
    so this one no longer counts and is not reported, lest a node copy from it.
    """
    wanted = desired.datasets.get(found.dataset_id)
    return (found.frozen and wanted is not None
            and any(not desired.is_dead(n) for n in wanted.holders))


def peer_dataset_states(desired: Desired, discovered: Discovered):
    """
    What this node reports on a peer-to-peer backend (pure): a ``pmap`` of dataset id to
    ``DatasetReport`` for the complete copies it holds and the datasets it creates.
    """
    states = {}
    for dataset_id in sorted(set(desired.datasets) | set(discovered.datasets)):
        found = peer_found(desired, discovered, dataset_id)
        wanted_state = peer_desired_state(desired, dataset_id)
        status = _PEER_STATUS.get(wanted_state, {}).get(found.state)
        if status is None or _superseded_frozen(desired, found):
            continue
        wanted = desired.datasets[dataset_id]
        states[dataset_id] = DatasetReport(
            dataset_id=dataset_id, state=status,
            maximum_size=found.size if found.size is not None else wanted.maximum_size,
            path=found.mount_point if status == "mounted" else None)
    return pmap(states)
