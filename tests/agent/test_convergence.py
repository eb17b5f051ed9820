"""
Tests for pure convergence: the transition table, ``calculate_changes``, takeover and
deletion rules, the desired-state builder, reported states, and discovery's pure
classification of raw snapshots.
"""

import os

import pytest
from pyrsistent import pmap

from pyflock.agent._backends import BlockVolume, MemoryBlockStore
from pyflock.agent._convergence import (
    NOTHING, PEER_LEAF_CHANGES, PEER_TRANSITIONS, TRANSITIONS, TRANSITIONS_BY_KIND,
    BackendKind, CreateDataset, DemoteDataset, DestroyDataset, PeerState, ReceiveDataset,
    ThawDataset,
    calculate_peer_changes, copy_source, peer_dataset_states, peer_desired_state,
    peer_found, AttachVolume, CreateFilesystem, CreateVolume,
    Desired, DesiredDataset, DesiredState, DestroyVolume, DetachVolume, Discovered,
    DiscoveredDataset, DiscoveredState, FinishFilesystem, InParallel, MountFilesystem,
    RemoveMountPoint, Sequentially, UnmountFilesystem, calculate_changes, dataset_states,
    desired_from_configuration, desired_from_view, in_parallel, is_nothing, is_waiting,
    leaves, sequentially, summarize, view_desire, without,
)
from pyflock.agent._discovery import (
    FilesystemCondition, FilesystemProbe, Mount, RawState, classify, discover_raw,
    filesystem_condition,
)
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from pyflock.agent._view import AgentView
from pyflock.common import Dataset, Lease
from pyflock.common._records import DatasetEntry, DatasetReport, Node

NODE = "node-a"
OTHER = "node-b"
DEAD = "node-c"
ROOT = "/var/lib/pyflock/mounts"
DS = "ds-1"
PATH = f"{ROOT}/{DS}"
DEVICE = "/dev/loop7"
SIZE = 64 * 1024 * 1024
S = DiscoveredState


def desired(*datasets, nodes=None, node=NODE):
    """A ``Desired`` for ``node`` with ``datasets``; every node alive unless told."""
    if nodes is None:
        nodes = {NODE: True, OTHER: True, DEAD: False}
    return Desired(node_uuid=node, datasets=pmap({d.dataset_id: d for d in datasets}),
                   nodes=pmap(nodes))


def discovered(*found, node=NODE):
    """A ``Discovered`` of ``node`` holding the ``found`` datasets."""
    return Discovered(node_uuid=node, mount_root=ROOT,
                      datasets=pmap({f.dataset_id: f for f in found}))


def found(state, dataset_id=DS, **fields):
    """A discovered dataset in ``state`` with its mount point under ``ROOT``."""
    return DiscoveredDataset(dataset_id=dataset_id, state=state,
                             mount_point=f"{ROOT}/{dataset_id}", **fields)


#: A discovered record typical of each state.
TYPICAL = {
    S.NON_EXISTENT: found(S.NON_EXISTENT, mount_point_left=True),
    S.UNATTACHED: found(S.UNATTACHED, size=SIZE, mount_point_left=True),
    S.ATTACHED_ELSEWHERE: found(S.ATTACHED_ELSEWHERE, size=SIZE, holder=OTHER,
                                mount_point_left=True),
    # Discovery says "elsewhere"; the node list (DEAD is dead) makes it a dead node's.
    S.ATTACHED_TO_DEAD_NODE: found(S.ATTACHED_ELSEWHERE, size=SIZE, holder=DEAD,
                                   mount_point_left=True),
    S.ATTACHED_NO_FILESYSTEM: found(S.ATTACHED_NO_FILESYSTEM, size=SIZE, device=DEVICE),
    S.ATTACHED_UNFINISHED_FILESYSTEM: found(S.ATTACHED_UNFINISHED_FILESYSTEM, size=SIZE,
                                            device=DEVICE),
    S.ATTACHED: found(S.ATTACHED, size=SIZE, device=DEVICE),
    S.MOUNTED: found(S.MOUNTED, size=SIZE, device=DEVICE),
    S.MOUNTED_ASTRAY: found(S.MOUNTED_ASTRAY, size=SIZE, device=DEVICE,
                            stray_mounts=(f"{ROOT}/other", f"{ROOT}/x")),
    S.STRAY_MOUNT: found(S.STRAY_MOUNT),
    S.MOUNT_POINT_TAKEN: found(S.MOUNT_POINT_TAKEN, size=SIZE),
}

#: A configured dataset giving this node each desired state (None: unknown dataset).
WANTED = {
    DesiredState.MOUNTED: DesiredDataset(DS, primary=NODE, maximum_size=SIZE),
    DesiredState.NOT_HERE: DesiredDataset(DS, primary=OTHER, maximum_size=SIZE),
    DesiredState.DESTROYED: DesiredDataset(DS, primary=NODE, maximum_size=SIZE,
                                           deleted=True),
    DesiredState.RETAINED: DesiredDataset(DS, primary=NODE, maximum_size=SIZE,
                                          deleted=True, retained=True),
    DesiredState.IGNORED: None,
}

CREATE = CreateVolume(DS, SIZE)
ATTACH = AttachVolume(DS, NODE, PATH)
TAKE_OVER = DetachVolume(DS, DEAD)
MKFS = CreateFilesystem(DS, DEVICE)
FINISH = FinishFilesystem(DS, DEVICE)
MOUNT = MountFilesystem(DS, DEVICE, PATH)
UNMOUNT = UnmountFilesystem(DS, PATH)
UNMOUNT_STRAYS = in_parallel([UnmountFilesystem(DS, f"{ROOT}/other"),
                              UnmountFilesystem(DS, f"{ROOT}/x")])
DETACH = DetachVolume(DS, NODE)
DESTROY = DestroyVolume(DS)
TIDY = RemoveMountPoint(DS, PATH)
CREATE_AND_ATTACH = sequentially([CREATE, ATTACH])
MKFS_AND_MOUNT = sequentially([MKFS, MOUNT])
FINISH_AND_MOUNT = sequentially([FINISH, MOUNT])
LET_GO = sequentially([UNMOUNT, DETACH, TIDY])
# A deleted dataset's volume goes in one step, and its data is not synced on the way out.
DISCARD = DetachVolume(DS, NODE, discard=True)
DETACH_AND_DESTROY = sequentially([DISCARD, in_parallel([DESTROY, NOTHING])])
UNMOUNT_DETACH_AND_DESTROY = sequentially([UNMOUNT, DISCARD, in_parallel([DESTROY, TIDY])])

#: What each (desired, discovered) pair leads to for the records above.
EXPECTED = {
    DesiredState.MOUNTED: {
        S.NON_EXISTENT: CREATE_AND_ATTACH, S.UNATTACHED: ATTACH,
        S.ATTACHED_ELSEWHERE: NOTHING, S.ATTACHED_TO_DEAD_NODE: TAKE_OVER,
        S.ATTACHED_NO_FILESYSTEM: MKFS_AND_MOUNT,
        S.ATTACHED_UNFINISHED_FILESYSTEM: FINISH_AND_MOUNT, S.ATTACHED: MOUNT,
        S.MOUNTED: NOTHING,
        S.MOUNTED_ASTRAY: UNMOUNT_STRAYS, S.STRAY_MOUNT: UNMOUNT,
        S.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.NOT_HERE: {
        S.NON_EXISTENT: TIDY, S.UNATTACHED: TIDY, S.ATTACHED_ELSEWHERE: TIDY,
        S.ATTACHED_TO_DEAD_NODE: TIDY, S.ATTACHED_NO_FILESYSTEM: DETACH,
        S.ATTACHED_UNFINISHED_FILESYSTEM: DETACH, S.ATTACHED: DETACH, S.MOUNTED: LET_GO,
        S.MOUNTED_ASTRAY: UNMOUNT_STRAYS, S.STRAY_MOUNT: UNMOUNT,
        S.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.DESTROYED: {
        S.NON_EXISTENT: TIDY, S.UNATTACHED: in_parallel([DESTROY, TIDY]),
        S.ATTACHED_ELSEWHERE: TIDY, S.ATTACHED_TO_DEAD_NODE: in_parallel([TAKE_OVER, TIDY]),
        S.ATTACHED_NO_FILESYSTEM: DETACH_AND_DESTROY,
        S.ATTACHED_UNFINISHED_FILESYSTEM: DETACH_AND_DESTROY, S.ATTACHED: DETACH_AND_DESTROY,
        S.MOUNTED: UNMOUNT_DETACH_AND_DESTROY, S.MOUNTED_ASTRAY: UNMOUNT_STRAYS,
        S.STRAY_MOUNT: UNMOUNT, S.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.IGNORED: {
        S.NON_EXISTENT: TIDY, S.UNATTACHED: TIDY, S.ATTACHED_ELSEWHERE: TIDY,
        S.ATTACHED_TO_DEAD_NODE: TIDY, S.ATTACHED_NO_FILESYSTEM: NOTHING,
        S.ATTACHED_UNFINISHED_FILESYSTEM: NOTHING, S.ATTACHED: NOTHING, S.MOUNTED: NOTHING,
        S.MOUNTED_ASTRAY: UNMOUNT_STRAYS, S.STRAY_MOUNT: NOTHING,
        S.MOUNT_POINT_TAKEN: NOTHING,
    },
}


# Kept: let go of like a dataset whose primary is elsewhere, and never destroyed.
EXPECTED[DesiredState.RETAINED] = EXPECTED[DesiredState.NOT_HERE]


def test_table_covers_every_pair():
    """The table has an entry for every desired state and every discovered state."""
    assert set(TRANSITIONS) == set(DesiredState)
    for row in TRANSITIONS.values():
        assert set(row) == set(DiscoveredState)
    assert set(EXPECTED) == set(DesiredState)
    assert all(set(row) == set(DiscoveredState) for row in EXPECTED.values())


@pytest.mark.parametrize("want,state", [(w, s) for w in DesiredState for s in DiscoveredState],
                         ids=lambda v: v.value)
def test_transition(want, state):
    """Each (desired, discovered) pair leads to its one expected next step."""
    datasets = () if WANTED[want] is None else (WANTED[want],)
    change = calculate_changes(desired(*datasets), discovered(TYPICAL[state]))
    assert in_parallel([EXPECTED[want][state]]) == change


def test_new_dataset_has_nothing_discovered():
    """A configured dataset nothing was found of is created, with its size, and attached."""
    assert in_parallel([CREATE_AND_ATTACH]) == calculate_changes(
        desired(WANTED[DesiredState.MOUNTED]), discovered())


def test_new_dataset_keeps_its_profile():
    """A dataset's storage profile (metadata ``profile``) goes with the creation of its
    volume, from the configuration to the change the backend runs."""
    wanted = desired_from_configuration(
        NODE, datasets=[Dataset(dataset_id=DS, primary=NODE, maximum_size=SIZE,
                                metadata={"profile": "gold"})],
        leases=[], nodes={NODE: True}, now=0.0)
    assert wanted.datasets[DS].profile == "gold"
    assert in_parallel([sequentially([CreateVolume(DS, SIZE, "gold"), ATTACH])]) == \
        calculate_changes(wanted, discovered())


def test_converged():
    """A dataset mounted where it should be, and nothing else, gives ``NOTHING``."""
    change = calculate_changes(desired(WANTED[DesiredState.MOUNTED]),
                               discovered(TYPICAL[S.MOUNTED]))
    assert NOTHING == change
    assert is_nothing(change)


def test_several_datasets_in_parallel():
    """Steps for several datasets are run in parallel, in dataset id order."""
    change = calculate_changes(
        desired(DesiredDataset("b", primary=NODE), DesiredDataset("a", primary=OTHER),
                DesiredDataset("c", primary=NODE)),
        discovered(found(S.MOUNTED, "a", device="/dev/loop1"),
                   found(S.MOUNTED, "c", device="/dev/loop3")))
    assert InParallel((
        sequentially([UnmountFilesystem("a", f"{ROOT}/a"), DetachVolume("a", NODE),
                      RemoveMountPoint("a", f"{ROOT}/a")]),
        sequentially([CreateVolume("b"), AttachVolume("b", NODE, f"{ROOT}/b")]))) == change


def test_other_node_discovery_refused():
    """Comparing one node's desired state with another node's discovery is an error."""
    with pytest.raises(ValueError):
        calculate_changes(desired(node=NODE), discovered(node=OTHER))


@pytest.mark.parametrize("nodes,lease_holder,expected", [
    ({DEAD: False}, None, TAKE_OVER),
    ({DEAD: False}, NODE, TAKE_OVER),
    ({DEAD: False}, DEAD, NOTHING),
    ({DEAD: False}, OTHER, NOTHING),
    ({DEAD: True}, None, NOTHING),
    ({}, None, NOTHING),
], ids=["dead", "dead-leased-here", "dead-lease-live", "lease-elsewhere", "alive", "unknown"])
def test_take_over(nodes, lease_holder, expected):
    """
    A volume is taken from its holder only when the node list says the holder is dead
    and no other node holds a live lease; an unknown node counts as possibly alive.
    """
    wanted = DesiredDataset(DS, primary=NODE, maximum_size=SIZE, lease_holder=lease_holder)
    change = calculate_changes(desired(wanted, nodes=nodes),
                               discovered(found(S.ATTACHED_ELSEWHERE, holder=DEAD)))
    assert in_parallel([expected]) == change


def test_unowned_device_never_taken():
    """A volume held by a device no node owns is waited for (an operator detaches it)."""
    change = calculate_changes(desired(WANTED[DesiredState.MOUNTED]),
                               discovered(found(S.ATTACHED_ELSEWHERE, holder=None)))
    assert NOTHING == change


@pytest.mark.parametrize("nodes,state", [
    ({NODE: True, OTHER: True}, DesiredState.NOT_HERE),
    ({OTHER: True}, DesiredState.NOT_HERE),
    ({NODE: True, OTHER: False}, DesiredState.DESTROYED),
    ({NODE: True, OTHER: False, "node-0": True}, DesiredState.NOT_HERE),
    ({NODE: False, OTHER: False}, DesiredState.NOT_HERE),
], ids=["primary-alive", "primary-alive-self-unknown", "primary-dead", "smaller-alive",
        "nobody-alive"])
def test_destroyer(nodes, state):
    """
    A deleted dataset is destroyed by its primary, or, when the primary is dead, by the
    alive node with the smallest uuid; every other node only lets go of it.
    """
    wanted = DesiredDataset(DS, primary=OTHER, deleted=True)
    assert state == desired(wanted, nodes=nodes).state_of(DS)


def test_deleted_dataset_of_dead_primary():
    """The destroyer takes a deleted dataset from its dead primary, then destroys it."""
    wanted = DesiredDataset(DS, primary=DEAD, deleted=True)
    want = desired(wanted, nodes={NODE: True, OTHER: True, DEAD: False})
    assert in_parallel([TAKE_OVER]) == calculate_changes(
        want, discovered(found(S.ATTACHED_ELSEWHERE, holder=DEAD)))
    assert in_parallel([DESTROY]) == calculate_changes(want, discovered(found(S.UNATTACHED)))


def test_combinators_flatten():
    """Nested groups of the same kind are flattened and empty groups dropped."""
    a, b, c = CreateVolume("a"), CreateVolume("b"), CreateVolume("c")
    assert InParallel((a, b, c)) == in_parallel([a, in_parallel([b, NOTHING]), c])
    assert Sequentially((a, b, c)) == sequentially([sequentially([a, b]), in_parallel([]), c])
    assert Sequentially((a, InParallel((b, c)))) == sequentially([a, in_parallel([b, c])])
    assert is_nothing(sequentially([in_parallel([]), NOTHING]))
    assert not is_nothing(sequentially([a]))


def test_without():
    """Skipped leaves are left out; a sequence stops before the part holding one."""
    a, b, c = CreateVolume("a"), CreateVolume("b"), CreateVolume("c")
    assert in_parallel([a, c]) == without(in_parallel([a, b, c]), {b})
    assert sequentially([a]) == without(sequentially([a, in_parallel([b, c]), a]), {b})
    assert NOTHING == without(b, {b})
    assert c == without(c, {b})


def test_changes_are_values():
    """Changes with the same fields are equal and hashable."""
    assert {MountFilesystem(DS, DEVICE, PATH), MOUNT} == {MOUNT}
    assert MOUNT != MountFilesystem(DS, "/dev/loop8", PATH)


def test_leaves_and_summary():
    """``leaves`` walks a change tree in order; ``summarize`` names each leaf."""
    change = sequentially([CREATE, in_parallel([ATTACH, DestroyVolume("x")])])
    assert [CREATE, ATTACH, DestroyVolume("x")] == list(leaves(change))
    assert "CreateVolume(ds-1); AttachVolume(ds-1); DestroyVolume(x)" == summarize(change)


def test_desired_from_configuration():
    """Configuration records become ``Desired``: live leases only, deleted ones unleased."""
    result = desired_from_configuration(
        NODE,
        datasets=[Dataset(dataset_id="a", primary=NODE, maximum_size=SIZE),
                  Dataset(dataset_id="b", primary=OTHER),
                  Dataset(dataset_id="c", primary=OTHER, deleted=True),
                  Dataset(dataset_id="d", primary=NODE)],
        leases=[Lease(dataset_id="a", node_uuid=NODE, expiration=None),
                Lease(dataset_id="b", node_uuid=OTHER, expiration=100.0),
                Lease(dataset_id="c", node_uuid=OTHER, expiration=None),
                Lease(dataset_id="d", node_uuid=OTHER, expiration=50.0)],
        nodes={NODE: True, OTHER: False}, now=50.0)
    assert desired(
        DesiredDataset("a", primary=NODE, maximum_size=SIZE, lease_holder=NODE),
        DesiredDataset("b", primary=OTHER, lease_holder=OTHER),
        DesiredDataset("c", primary=OTHER, deleted=True),
        DesiredDataset("d", primary=NODE),
        nodes={NODE: True, OTHER: False}) == result


def test_desired_from_view():
    """An ``AgentView`` becomes ``Desired``: sizes, deleted flags, live leases, alive flags."""
    view = AgentView(
        epoch="e1", version=3,
        datasets={
            "a": DatasetEntry("a", NODE, SIZE, {"name": "pg"},
                              lease=Lease("a", OTHER, expiration=20.0)),
            "b": DatasetEntry("b", OTHER, lease=Lease("b", OTHER, expiration=5.0)),
            "c": DatasetEntry("c", OTHER, deleted=True)},
        nodes={NODE: Node(NODE, "10.0.0.1"), OTHER: Node(OTHER, "10.0.0.2",
                                                                    alive=False)})
    expected = desired(DesiredDataset("a", NODE, SIZE, lease_holder=OTHER),
                       DesiredDataset("b", OTHER), DesiredDataset("c", OTHER, deleted=True),
                       nodes={NODE: True, OTHER: False})
    assert expected == desired_from_view(NODE, view, now=10.0)
    assert expected == view_desire(NODE)(view, 10.0)


def test_no_view_no_desire():
    """Before any view was loaded or received there is nothing to desire."""
    assert desired_from_view(NODE, AgentView(), now=0.0) is None


@pytest.mark.parametrize("wanted,state,expected", [
    (WANTED[DesiredState.MOUNTED], S.MOUNTED, DatasetReport(DS, "mounted", PATH, SIZE)),
    (WANTED[DesiredState.MOUNTED], S.NON_EXISTENT, DatasetReport(DS, "creating", None, SIZE)),
    (WANTED[DesiredState.MOUNTED], S.ATTACHED_NO_FILESYSTEM,
     DatasetReport(DS, "attaching", None, SIZE)),
    (WANTED[DesiredState.MOUNTED], S.UNATTACHED, DatasetReport(DS, "attaching", None, SIZE)),
    (WANTED[DesiredState.MOUNTED], S.ATTACHED, DatasetReport(DS, "attaching", None, SIZE)),
    (WANTED[DesiredState.MOUNTED], S.ATTACHED_ELSEWHERE,
     DatasetReport(DS, "moving", None, SIZE)),
    (WANTED[DesiredState.NOT_HERE], S.MOUNTED, DatasetReport(DS, "moving", None, SIZE)),
    (WANTED[DesiredState.NOT_HERE], S.ATTACHED, DatasetReport(DS, "moving", None, SIZE)),
    (WANTED[DesiredState.NOT_HERE], S.UNATTACHED, None),
    (WANTED[DesiredState.NOT_HERE], S.ATTACHED_ELSEWHERE, None),
    (WANTED[DesiredState.DESTROYED], S.MOUNTED, DatasetReport(DS, "deleting", None, SIZE)),
    (WANTED[DesiredState.DESTROYED], S.UNATTACHED, DatasetReport(DS, "deleting", None, SIZE)),
    (WANTED[DesiredState.DESTROYED], S.NON_EXISTENT, None),
    (DesiredDataset(DS, primary=OTHER, deleted=True), S.ATTACHED,
     DatasetReport(DS, "deleting", None, SIZE)),
    (WANTED[DesiredState.RETAINED], S.MOUNTED, DatasetReport(DS, "deleting", None, SIZE)),
    (WANTED[DesiredState.RETAINED], S.UNATTACHED, None),
    (None, S.MOUNTED, None),
])
def test_dataset_states(wanted, state, expected):
    """Each dataset this node has business with is reported with its state, path and size."""
    datasets = () if wanted is None else (wanted,)
    states = dataset_states(desired(*datasets), discovered(TYPICAL[state]))
    assert (pmap() if expected is None else pmap({DS: expected})) == states


def test_retained_from_configuration():
    """A deleted dataset whose data is kept (``retained_until``) is RETAINED on its
    primary too; once its data may go, its primary destroys it."""
    kept = Dataset(dataset_id=DS, primary=NODE, maximum_size=SIZE, deleted=True,
                   retained_until=100.0)
    wanted = desired_from_configuration(NODE, [kept], [], {NODE: True}, now=200.0)
    assert wanted.state_of(DS) is DesiredState.RETAINED
    assert peer_desired_state(wanted, DS) is DesiredState.RETAINED
    going = Dataset(dataset_id=DS, primary=NODE, maximum_size=SIZE, deleted=True)
    wanted = desired_from_configuration(NODE, [going], [], {NODE: True}, now=0.0)
    assert wanted.state_of(DS) is DesiredState.DESTROYED


def test_waiting():
    """A node waits when a volume it needs is held by another (known) node."""
    want = desired(WANTED[DesiredState.MOUNTED])
    assert is_waiting(want, discovered(TYPICAL[S.ATTACHED_ELSEWHERE]))
    assert not is_waiting(want, discovered(found(S.ATTACHED_ELSEWHERE, holder=None)))
    assert not is_waiting(want, discovered(TYPICAL[S.MOUNTED]))
    assert not is_waiting(desired(WANTED[DesiredState.NOT_HERE]),
                          discovered(TYPICAL[S.ATTACHED_ELSEWHERE]))


# ---------------------------------------------------------------------------------------
# Discovery's classification

def raw(volumes=(), mounts=(), numbers=None, probes=None, empty=()):
    """A raw snapshot of ``NODE`` under ``ROOT``."""
    return RawState(node_uuid=NODE, mount_root=ROOT, volumes=tuple(volumes),
                    mounts=tuple(mounts), device_numbers=pmap(numbers or {}),
                    probes=pmap(probes or {}), empty_directories=frozenset(empty))


READY = FilesystemProbe(fstype="ext4", root=((".", 0o40777), ("..", 0o40777)))
BLANK = FilesystemProbe(fstype=None)
HALF = FilesystemProbe(fstype="ext4", root=((".", 0o40755), ("..", 0o40755),
                                            ("lost+found", 0o40700)))


def volume(dataset_id=DS, node=None, device=None):
    """A volume of ``SIZE`` bytes, attached to ``node`` as ``device`` if given."""
    return BlockVolume(dataset_id=dataset_id, size=SIZE, attached_to=node, device_path=device)


@pytest.mark.parametrize("snapshot,expected", [
    (raw(empty=[DS]), found(S.NON_EXISTENT, mount_point_left=True)),
    (raw([volume()]), found(S.UNATTACHED, size=SIZE)),
    (raw([volume(node=OTHER, device=DEVICE)]),
     found(S.ATTACHED_ELSEWHERE, size=SIZE, holder=OTHER)),
    (raw([volume(node=None, device=DEVICE)]),
     found(S.ATTACHED_ELSEWHERE, size=SIZE, holder=None)),
    (raw([volume(node=NODE, device=DEVICE)], probes={DEVICE: BLANK}),
     found(S.ATTACHED_NO_FILESYSTEM, size=SIZE, device=DEVICE)),
    (raw([volume(node=NODE, device=DEVICE)], probes={DEVICE: HALF}),
     found(S.ATTACHED_UNFINISHED_FILESYSTEM, size=SIZE, device=DEVICE)),
    (raw([volume(node=NODE, device=DEVICE)], probes={DEVICE: READY}, empty=[DS]),
     found(S.ATTACHED, size=SIZE, device=DEVICE, mount_point_left=True)),
    (raw([volume(node=NODE, device=DEVICE)], mounts=[Mount(PATH, DEVICE)], empty=[DS]),
     found(S.MOUNTED, size=SIZE, device=DEVICE)),
    (raw([volume(node=NODE, device=DEVICE)], mounts=[Mount(PATH, "/dev/other", (7, 7))],
         numbers={DEVICE: (7, 7)}),
     found(S.MOUNTED, size=SIZE, device=DEVICE)),
    (raw([volume(node=NODE, device=DEVICE)], mounts=[Mount(PATH, DEVICE, (7, 8))],
         numbers={DEVICE: (7, 7)}, probes={DEVICE: READY}),
     found(S.STRAY_MOUNT, size=SIZE)),
    (raw([volume(node=NODE, device=DEVICE)],
         mounts=[Mount(PATH, DEVICE), Mount(f"{ROOT}/zz", DEVICE)]),
     found(S.MOUNTED_ASTRAY, size=SIZE, device=DEVICE, stray_mounts=(f"{ROOT}/zz",))),
    (raw([volume(node=OTHER, device=DEVICE)], mounts=[Mount(PATH, "tmpfs")]),
     found(S.STRAY_MOUNT, size=SIZE)),
    (raw(mounts=[Mount(PATH, "tmpfs")]), found(S.STRAY_MOUNT)),
    (raw([volume(node=NODE, device=DEVICE), volume("ds-2", NODE, "/dev/loop9")],
         mounts=[Mount(PATH, "/dev/loop9")], probes={DEVICE: READY}),
     found(S.MOUNT_POINT_TAKEN, size=SIZE)),
], ids=["leftover-dir", "unattached", "elsewhere", "unowned-device", "blank", "half-made",
        "attached", "mounted", "mounted-by-number", "wrong-number", "astray", "stray",
        "stray-no-volume", "taken"])
def test_classify(snapshot, expected):
    """Each kind of raw snapshot is classified into its discovered state."""
    assert expected == classify(snapshot).get(DS)


def test_classify_ignores_other_names():
    """Mounts and directories under the mount root not named like dataset ids are left out."""
    result = classify(raw(mounts=[Mount(f"{ROOT}/.hidden", "tmpfs")], empty=["a b"]))
    assert pmap() == result.datasets


@pytest.mark.parametrize("probe,condition", [
    (BLANK, FilesystemCondition.NONE),
    (HALF, FilesystemCondition.UNFINISHED),
    (READY, FilesystemCondition.READY),
    (FilesystemProbe(fstype="xfs"), FilesystemCondition.READY),
    (FilesystemProbe(fstype="ext4", root=((".", 0o40755), ("..", 0o40755),
                                          ("lost+found", 0o40700), ("data", 0o40755))),
     FilesystemCondition.READY),
    (FilesystemProbe(fstype="ext4", root=((".", 0o40777), ("..", 0o40777),
                                          ("lost+found", 0o40700))),
     FilesystemCondition.READY),
], ids=["blank", "half-made", "ready", "other-type", "has-data", "chmodded"])
def test_filesystem_condition(probe, condition):
    """Only an ext4 whose root is exactly as mkfs left it counts as half-made."""
    assert condition == filesystem_condition(probe)


def test_discover_raw_reads_once():
    """
    The raw snapshot holds the volumes, the mounts under the root, and probes of the
    unmounted devices attached to this node only.
    """
    store = MemoryBlockStore()
    disks = MemoryDisks(store)
    here, there = store.backend(NODE), store.backend(OTHER)
    fs = MemoryFilesystems(disks, here)
    for dataset_id in ["a", "b", "c", "d"]:
        here.create_volume(dataset_id, SIZE)
    a = here.attach_volume("a", NODE).device_path
    b = here.attach_volume("b", NODE).device_path
    there.attach_volume("c", OTHER)
    fs.make_filesystem(a)
    fs.mount(a, f"{ROOT}/a")
    fs.make_directory(f"{ROOT}/e")
    snapshot = discover_raw(here, fs, ROOT)
    assert snapshot == RawState(
        node_uuid=NODE, mount_root=os.path.realpath(ROOT),
        volumes=tuple(here.list_volumes()), mounts=(Mount(f"{ROOT}/a", a),),
        device_numbers=pmap({a: None, b: None}), probes=pmap({b: BLANK}),
        empty_directories=frozenset({"a", "e"}))
    states = {i: d.state for i, d in classify(snapshot).datasets.items()}
    assert {"a": S.MOUNTED, "b": S.ATTACHED_NO_FILESYSTEM, "c": S.ATTACHED_ELSEWHERE,
            "d": S.UNATTACHED, "e": S.NON_EXISTENT} == states


# -- backend kinds: the peer-to-peer rows ---------------------------------------------------

P = PeerState
COPY = "/pool/ds-1"
SNAPSHOT = "s1"


#: A peer record typical of each state, as ``peer_found`` completes it.
TYPICAL_PEER = {
    P.NON_EXISTENT: found(P.NON_EXISTENT, mount_point_left=True),
    P.HELD_ELSEWHERE: found(P.HELD_ELSEWHERE, holder=OTHER, mount_point_left=True),
    P.PARTIAL: found(P.PARTIAL, holder=OTHER, snapshot=SNAPSHOT, size=SIZE,
                     mount_point_left=True),
    P.PARTIAL_NO_SOURCE: found(P.PARTIAL_NO_SOURCE, snapshot=SNAPSHOT, size=SIZE,
                               mount_point_left=True),
    P.UNMOUNTED: found(P.UNMOUNTED, device=COPY, size=SIZE, mount_point_left=True),
    P.SUPERSEDED: found(P.SUPERSEDED, device=COPY, size=SIZE, mount_point_left=True),
    P.MOUNTED: found(P.MOUNTED, device=COPY, size=SIZE),
    P.MOUNTED_ASTRAY: found(P.MOUNTED_ASTRAY, device=COPY, size=SIZE,
                            stray_mounts=(f"{ROOT}/other", f"{ROOT}/x")),
    P.STRAY_MOUNT: found(P.STRAY_MOUNT),
    P.MOUNT_POINT_TAKEN: found(P.MOUNT_POINT_TAKEN, device=COPY, size=SIZE),
}

RECEIVE = ReceiveDataset(DS, from_node=OTHER)
RECEIVE_DELTA = ReceiveDataset(DS, from_node=OTHER, base=SNAPSHOT)
MOUNT_COPY = MountFilesystem(DS, COPY, PATH)
DESTROY_COPY = in_parallel([DestroyDataset(DS), TIDY])

#: What each (desired, peer state) row gives for the records above.
PEER_EXPECTED = {
    DesiredState.MOUNTED: {
        P.NON_EXISTENT: CreateDataset(DS, SIZE), P.HELD_ELSEWHERE: RECEIVE,
        P.PARTIAL: RECEIVE_DELTA, P.PARTIAL_NO_SOURCE: NOTHING, P.UNMOUNTED: MOUNT_COPY,
        P.SUPERSEDED: MOUNT_COPY, P.MOUNTED: NOTHING, P.MOUNTED_ASTRAY: UNMOUNT_STRAYS,
        P.STRAY_MOUNT: UNMOUNT, P.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.NOT_HERE: {
        # A partial copy (demoted, or a cancelled receive) is kept: a move back's base.
        P.NON_EXISTENT: TIDY, P.HELD_ELSEWHERE: TIDY, P.PARTIAL: TIDY,
        P.PARTIAL_NO_SOURCE: TIDY, P.UNMOUNTED: TIDY,
        P.SUPERSEDED: in_parallel([DemoteDataset(DS), TIDY]),
        # Kept mounted (frozen by the move's phase 2) until the primary holds it.
        P.MOUNTED: NOTHING, P.MOUNTED_ASTRAY: UNMOUNT_STRAYS,
        P.STRAY_MOUNT: UNMOUNT, P.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.DESTROYED: {
        P.NON_EXISTENT: TIDY, P.HELD_ELSEWHERE: TIDY, P.PARTIAL: DESTROY_COPY,
        P.PARTIAL_NO_SOURCE: DESTROY_COPY, P.UNMOUNTED: DESTROY_COPY,
        P.SUPERSEDED: DESTROY_COPY, P.MOUNTED: sequentially([UNMOUNT, DestroyDataset(DS)]),
        P.MOUNTED_ASTRAY: UNMOUNT_STRAYS, P.STRAY_MOUNT: UNMOUNT,
        P.MOUNT_POINT_TAKEN: NOTHING,
    },
    # Kept: every complete copy stays, unmounted; never destroyed.
    DesiredState.RETAINED: {
        P.NON_EXISTENT: TIDY, P.HELD_ELSEWHERE: TIDY, P.PARTIAL: DESTROY_COPY,
        P.PARTIAL_NO_SOURCE: DESTROY_COPY, P.UNMOUNTED: TIDY, P.SUPERSEDED: TIDY,
        P.MOUNTED: sequentially([UNMOUNT, TIDY]), P.MOUNTED_ASTRAY: UNMOUNT_STRAYS,
        P.STRAY_MOUNT: UNMOUNT, P.MOUNT_POINT_TAKEN: NOTHING,
    },
    DesiredState.IGNORED: {
        P.NON_EXISTENT: TIDY, P.HELD_ELSEWHERE: TIDY, P.PARTIAL: NOTHING,
        P.PARTIAL_NO_SOURCE: NOTHING, P.UNMOUNTED: NOTHING, P.SUPERSEDED: NOTHING,
        P.MOUNTED: NOTHING, P.MOUNTED_ASTRAY: UNMOUNT_STRAYS, P.STRAY_MOUNT: NOTHING,
        P.MOUNT_POINT_TAKEN: NOTHING,
    },
}


def test_peer_table_covers_every_pair():
    """The peer rows have an entry for every desired state and every peer state."""
    assert set(PEER_TRANSITIONS) == set(DesiredState) == set(PEER_EXPECTED)
    for rows in (PEER_TRANSITIONS, PEER_EXPECTED):
        assert all(set(row) == set(PeerState) for row in rows.values())


def test_each_kind_has_its_rows():
    """Block devices keep their table unchanged; the peer kind has its own."""
    assert TRANSITIONS_BY_KIND == {BackendKind.BLOCK_DEVICE: TRANSITIONS,
                                   BackendKind.PEER_TO_PEER: PEER_TRANSITIONS}


@pytest.mark.parametrize("want,state", [(w, s) for w in DesiredState for s in PeerState],
                         ids=lambda v: v.value)
def test_peer_transition(want, state):
    """Each (desired, peer state) row leads to its one expected next step."""
    row = PEER_TRANSITIONS[want][state]
    assert in_parallel([PEER_EXPECTED[want][state]]) == in_parallel(
        [row(NODE, WANTED[want], TYPICAL_PEER[state])])


def test_peer_rows_use_only_peer_and_mount_changes():
    """The peer rows never attach, detach or make filesystems: they copy and mount."""
    for row in PEER_EXPECTED.values():
        for change in row.values():
            assert all(isinstance(leaf, PEER_LEAF_CHANGES) for leaf in leaves(change))


def peer_wanted(primary=NODE, holders=(), deleted=False):
    """A configured dataset of primary ``primary`` that ``holders`` report holding."""
    return DesiredDataset(DS, primary=primary, maximum_size=SIZE, deleted=deleted,
                          holders=tuple(holders))


@pytest.mark.parametrize("wanted,state,fields,expected", [
    # The new primary receives the dataset from a live node holding it, instead of
    # attaching it: whole at first, then the delta from its partial copy's snapshot.
    (peer_wanted(holders=[OTHER]), None, {}, RECEIVE),
    (peer_wanted(holders=[OTHER]), P.PARTIAL, {"snapshot": SNAPSHOT}, RECEIVE_DELTA),
    (peer_wanted(holders=[DEAD, OTHER]), None, {}, RECEIVE),
    (peer_wanted(), None, {}, CreateDataset(DS, SIZE)),
    (peer_wanted(holders=[OTHER]), P.UNMOUNTED, {"device": COPY}, MOUNT_COPY),
    # A dead holder is no source: the partial copy waits for one.
    (peer_wanted(holders=[DEAD]), P.PARTIAL, {"snapshot": SNAPSHOT}, NOTHING),
    # The old primary keeps its copy mounted while the primary has none (its transfer
    # freezes it), unmounts it once the primary reports holding it, then demotes it to
    # its last snapshot.
    (peer_wanted(OTHER), P.MOUNTED, {"device": COPY}, NOTHING),
    (peer_wanted(OTHER, holders=[OTHER]), P.MOUNTED, {"device": COPY, "frozen": True},
     sequentially([UNMOUNT, TIDY])),
    (peer_wanted(OTHER), P.UNMOUNTED, {"device": COPY}, NOTHING),
    (peer_wanted(OTHER, holders=[OTHER]), P.UNMOUNTED,
     {"device": COPY, "snapshot": SNAPSHOT, "frozen": True},
     DemoteDataset(DS, keep=SNAPSHOT)),
    # A copy that was never frozen was never sent whole: it is newer than what the
    # primary holds, and stays (mounted, or as the source).
    (peer_wanted(OTHER, holders=[OTHER]), P.MOUNTED, {"device": COPY}, NOTHING),
    (peer_wanted(OTHER, holders=[OTHER]), P.UNMOUNTED, {"device": COPY}, NOTHING),
    (peer_wanted(DEAD, holders=[DEAD]), P.UNMOUNTED, {"device": COPY}, NOTHING),
    # A partial copy of a dataset whose primary is another node is kept (a move back's
    # base).
    (peer_wanted(OTHER, holders=[OTHER]), P.PARTIAL, {"snapshot": SNAPSHOT}, NOTHING),
    # The primary's frozen copy is thawed when the move away was cancelled, unless
    # another node already took a complete copy.
    (peer_wanted(), P.MOUNTED, {"device": COPY, "frozen": True}, ThawDataset(DS)),
    # ... and if another node took it meanwhile, this copy lets go (unmount, demote to its
    # last snapshot) to receive that one's changes back.
    (peer_wanted(holders=[OTHER]), P.MOUNTED, {"device": COPY, "frozen": True},
     sequentially([UNMOUNT, TIDY])),
    (peer_wanted(holders=[OTHER]), P.UNMOUNTED,
     {"device": COPY, "frozen": True, "snapshot": SNAPSHOT}, DemoteDataset(DS, SNAPSHOT)),
    (peer_wanted(), P.UNMOUNTED, {"device": COPY, "frozen": True}, MOUNT_COPY),
    # Every node destroys its own copy of a deleted dataset, primary or not.
    (peer_wanted(OTHER, holders=[OTHER], deleted=True), P.UNMOUNTED, {"device": COPY},
     DestroyDataset(DS)),
    (peer_wanted(deleted=True), P.MOUNTED, {"device": COPY},
     sequentially([UNMOUNT, DestroyDataset(DS)])),
])
def test_peer_changes_from_the_view(wanted, state, fields, expected):
    """``calculate_peer_changes`` completes discovery with the view's holders and nodes."""
    found_here = () if state is None else (found(state, size=SIZE, **fields),)
    change = calculate_peer_changes(desired(wanted), discovered(*found_here))
    assert in_parallel([expected]) == change


def test_peer_found_completes_discovery():
    """``peer_found`` names the source to receive from, and a superseded copy: a frozen
    one (a move's phase 2 sent all of it) whose primary reports a copy."""
    here = discovered(found(P.UNMOUNTED, device=COPY, frozen=True))
    assert peer_found(desired(peer_wanted(holders=[OTHER])), discovered(), DS).holder == OTHER
    assert peer_found(desired(peer_wanted(OTHER, holders=[OTHER])), here, DS).state \
        is P.SUPERSEDED
    writable = discovered(found(P.UNMOUNTED, device=COPY))
    assert peer_found(desired(peer_wanted(OTHER, holders=[OTHER])), writable, DS).state \
        is P.UNMOUNTED
    assert peer_found(desired(peer_wanted(OTHER)), here, DS).state is P.UNMOUNTED
    assert copy_source(desired(peer_wanted(holders=[OTHER, "node-0", DEAD])), DS) == "node-0"
    assert peer_desired_state(desired(peer_wanted(OTHER, deleted=True)), DS) \
        is DesiredState.DESTROYED


def test_peer_other_node_discovery_refused():
    """Comparing one node's desired state with another's discovery is an error here too."""
    with pytest.raises(ValueError):
        calculate_peer_changes(desired(node=NODE), discovered(node=OTHER))


@pytest.mark.parametrize("wanted,state,expected", [
    (peer_wanted(), None, DatasetReport(DS, "creating", None, SIZE)),
    (peer_wanted(), P.MOUNTED, DatasetReport(DS, "mounted", PATH, SIZE)),
    (peer_wanted(), P.UNMOUNTED, DatasetReport(DS, "attaching", None, SIZE)),
    # Receiving is no holding: the old copy must stay until the new one is complete.
    (peer_wanted(holders=[OTHER]), None, None),
    (peer_wanted(holders=[OTHER]), P.PARTIAL, None),
    (peer_wanted(OTHER), P.MOUNTED, DatasetReport(DS, "moving", None, SIZE)),
    (peer_wanted(OTHER), P.UNMOUNTED, DatasetReport(DS, "moving", None, SIZE)),
    (peer_wanted(OTHER, deleted=True), P.UNMOUNTED, DatasetReport(DS, "deleting", None, SIZE)),
    (peer_wanted(OTHER, deleted=True), None, None),
    (None, P.MOUNTED, None),
])
def test_peer_dataset_states(wanted, state, expected):
    """A peer node reports the complete copies it holds and the datasets it creates."""
    datasets = () if wanted is None else (wanted,)
    found_here = () if state is None else (found(state, size=SIZE, device=COPY),)
    states = peer_dataset_states(desired(*datasets), discovered(*found_here))
    assert (pmap() if expected is None else pmap({DS: expected})) == states


@pytest.mark.parametrize("wanted,expected", [
    # The source of a move still under way, frozen for its phase 2: still the source.
    (peer_wanted(OTHER), DatasetReport(DS, "moving", None, SIZE)),
    # Another node completed a copy from it: this one no longer counts.
    (peer_wanted(OTHER, holders=[OTHER]), None),
    (peer_wanted(holders=[OTHER]), None),
    # ... unless that node is dead.
    (peer_wanted(DEAD, holders=[DEAD]), DatasetReport(DS, "moving", None, SIZE)),
])
def test_frozen_copy_reported_only_as_the_only_copy(wanted, expected):
    """A frozen copy is reported only while no other live node reports a complete one,
    so that no node copies from it once a newer copy exists."""
    here = discovered(found(P.UNMOUNTED, size=SIZE, device=COPY, frozen=True))
    states = peer_dataset_states(desired(wanted), here)
    assert (pmap() if expected is None else pmap({DS: expected})) == states
