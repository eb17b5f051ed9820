"""
Discovery: one raw IO snapshot of this node's world, then a pure classification.

``discover_raw(backend, filesystems, mount_root)`` reads, and only reads: the backend's
volumes, the mounts at ``<mount_root>/*``, the device numbers and filesystem probes of the
devices attached here, and the empty directories under the mount root. It blocks (it runs
``blkid`` and ``debugfs``): call it in a thread. ``classify(raw)`` turns that ``RawState``
into a ``Discovered`` value, one ``DiscoveredDataset`` per dataset, without IO.
"""

from __future__ import annotations

import enum
import os
from typing import Callable, Optional

import attr
from pyrsistent import pmap

from pyflock.agent._backends._interface import BlockVolume, is_valid_dataset_id
from pyflock.agent._convergence import Discovered, DiscoveredDataset, DiscoveredState


@attr.s(frozen=True, auto_attribs=True)
class Mount:
    """
    One mount at ``<mount_root>/<name>`` (the top one, if several are stacked): its
    source (e.g. ``/dev/loop3``) and its device number (major, minor) when known.
    """

    mount_point: str
    source: str
    device_number: Optional[tuple] = None


@attr.s(frozen=True, auto_attribs=True)
class FilesystemProbe:
    """
    What a device holds: ``fstype`` (None: no filesystem) and, for ext4, the entries of
    its root directory as ``(name, mode)`` pairs (``.`` gives the root's own mode).
    """

    fstype: Optional[str]
    root: tuple = ()


class FilesystemCondition(enum.Enum):
    """Whether a device's filesystem is there and ready to mount."""

    NONE = "none"
    UNFINISHED = "unfinished"
    READY = "ready"


#: The root of a filesystem mkfs.ext4 just made: what ``make_filesystem`` then fixes.
_FRESH_ROOT_NAMES = [".", "..", "lost+found"]
_FRESH_ROOT_MODE = 0o40755


def filesystem_condition(probe: FilesystemProbe) -> FilesystemCondition:
    """
    Classify a probe (pure): no filesystem; a half-made one (an ext4 whose root holds only
    ``lost+found`` and still has mkfs's mode 0755, so nothing was ever stored there); or
    one ready to mount (anything else: a filesystem with data is never touched).
    """
    if probe.fstype is None:
        return FilesystemCondition.NONE
    names = sorted(name for name, _ in probe.root)
    modes = {mode for name, mode in probe.root if name == "."}
    if (probe.fstype == "ext4" and names == _FRESH_ROOT_NAMES
            and modes == {_FRESH_ROOT_MODE}):
        return FilesystemCondition.UNFINISHED
    return FilesystemCondition.READY


@attr.s(frozen=True, auto_attribs=True)
class RawState:
    """
    Everything discovery read, uninterpreted: this node's uuid and (real) mount root,
    the backend's volumes, the mounts directly under the mount root, the device numbers
    and filesystem probes of the devices attached here (probes only of those not mounted),
    and the names of empty directories directly under the mount root.
    """

    node_uuid: str
    mount_root: str
    volumes: tuple = ()
    mounts: tuple = ()
    device_numbers: object = pmap()
    probes: object = pmap()
    empty_directories: frozenset = frozenset()


def _attached_here(raw: RawState) -> dict[str, BlockVolume]:
    return {v.dataset_id: v for v in raw.volumes
            if v.attached_to == raw.node_uuid and v.device_path is not None}


def _owners(raw: RawState, here: dict[str, BlockVolume]) -> Callable[[Mount], Optional[str]]:
    """
    ``owner(mount)``: the first (by id) dataset attached here whose device ``mount`` is
    of, told by device number when both are known, else by device path; None if none.
    """
    by_number, by_path, by_path_unnumbered = {}, {}, {}
    # Backwards, so that the first dataset in id order is the one left in each map.
    for dataset_id, volume in sorted(here.items(), reverse=True):
        number = raw.device_numbers.get(volume.device_path)
        by_path[volume.device_path] = dataset_id
        if number is None:
            by_path_unnumbered[volume.device_path] = dataset_id
        else:
            by_number[number] = dataset_id

    def owner(mount: Mount) -> Optional[str]:
        if mount.device_number is None:
            return by_path.get(mount.source)
        found = [i for i in (by_number.get(mount.device_number),
                             by_path_unnumbered.get(mount.source)) if i is not None]
        return min(found) if found else None
    return owner


def discover_raw(backend, filesystems, mount_root: str) -> RawState:
    """
    Read this node's world (blocking): ``backend`` is the node's ``IBlockDeviceBackend``,
    ``filesystems`` its ``IFilesystems`` (``pyflock.agent._runner``), ``mount_root`` where
    datasets are mounted.
    """
    mount_root = os.path.realpath(mount_root)
    volumes = tuple(backend.list_volumes())
    mounts = tuple(filesystems.mounts(mount_root))
    partial = RawState(node_uuid=backend.node_uuid, mount_root=mount_root,
                       volumes=volumes, mounts=mounts)
    here = _attached_here(partial)
    numbers = pmap({v.device_path: filesystems.device_number(v.device_path)
                    for v in here.values()})
    partial = attr.evolve(partial, device_numbers=numbers)
    owner = _owners(partial, here)
    mounted = {owner(m) for m in mounts}
    probes = pmap({v.device_path: filesystems.probe(v.device_path)
                   for dataset_id, v in here.items() if dataset_id not in mounted})
    return attr.evolve(partial, probes=probes,
                       empty_directories=frozenset(filesystems.empty_directories(mount_root)))


def classify(raw: RawState) -> Discovered:
    """Turn a raw snapshot into per-dataset discovered states (pure)."""
    root = raw.mount_root
    volumes = {v.dataset_id: v for v in raw.volumes}
    here = _attached_here(raw)
    mounts = {m.mount_point: m for m in raw.mounts}
    owner = _owners(raw, here)
    owners = {path: owner(m) for path, m in mounts.items()}
    astray: dict[str, list[str]] = {}
    for path, owner in owners.items():
        if owner is not None and path != os.path.join(root, owner):
            astray.setdefault(owner, []).append(path)
    ids = set(volumes)
    ids.update(name for name in (os.path.basename(p) for p in mounts)
               if is_valid_dataset_id(name))
    ids.update(name for name in raw.empty_directories if is_valid_dataset_id(name))
    datasets = {}
    for dataset_id in ids:
        path = os.path.join(root, dataset_id)
        volume = volumes.get(dataset_id)
        found = DiscoveredDataset(
            dataset_id=dataset_id, state=DiscoveredState.NON_EXISTENT, mount_point=path,
            size=None if volume is None else volume.size,
            mount_point_left=dataset_id in raw.empty_directories and path not in mounts)
        datasets[dataset_id] = _classify_one(raw, found, volume, mounts.get(path),
                                             owners.get(path), astray.get(dataset_id))
    return Discovered(node_uuid=raw.node_uuid, mount_root=root, datasets=pmap(datasets))


def _classify_one(raw: RawState, found: DiscoveredDataset, volume: Optional[BlockVolume],
                  mount: Optional[Mount], owner: Optional[str],
                  astray: Optional[list]) -> DiscoveredDataset:
    state = DiscoveredState
    if astray:
        return attr.evolve(found, state=state.MOUNTED_ASTRAY, device=volume.device_path,
                           stray_mounts=tuple(sorted(astray)))
    if mount is not None and owner is None:
        return attr.evolve(found, state=state.STRAY_MOUNT)
    if mount is not None and owner != found.dataset_id:
        return attr.evolve(found, state=state.MOUNT_POINT_TAKEN)
    if volume is None:
        return found
    if volume.device_path is None:
        return attr.evolve(found, state=state.UNATTACHED)
    if volume.attached_to != raw.node_uuid:
        return attr.evolve(found, state=state.ATTACHED_ELSEWHERE, holder=volume.attached_to)
    found = attr.evolve(found, device=volume.device_path)
    if mount is not None:
        return attr.evolve(found, state=state.MOUNTED)
    probe = raw.probes.get(volume.device_path)
    # Discovery probes every unmounted device attached here; without a probe, mounting
    # is the safe guess (it fails cleanly on a blank device, where mkfs would not).
    condition = (FilesystemCondition.READY if probe is None
                 else filesystem_condition(probe))
    return attr.evolve(found, state={
        FilesystemCondition.NONE: state.ATTACHED_NO_FILESYSTEM,
        FilesystemCondition.UNFINISHED: state.ATTACHED_UNFINISHED_FILESYSTEM,
        FilesystemCondition.READY: state.ATTACHED,
    }[condition])


def discover(backend, filesystems, mount_root: str) -> Discovered:
    """``classify(discover_raw(...))``: what this node finds now (blocking)."""
    return classify(discover_raw(backend, filesystems, mount_root))
