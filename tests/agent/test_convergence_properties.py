"""
Property tests of convergence (STYLE.md 14): 2 or 3 simulated nodes share one
``MemoryBlockStore``; from any discovered state (random volumes, attachments, stale
records, half-made filesystems, mounts in the right, wrong and foreign places, leftover
directories, a dead node), repeated discover -> calculate -> run on each live node reaches
the desired state within a bounded number of steps, every change succeeds (so no node ever
asks to attach a volume attached elsewhere), and no device is ever mounted on a node it is
not attached to.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrsistent import pmap

from pyflock.agent._backends import MemoryBlockStore, VolumeBusy
from pyflock.agent._convergence import (
    Desired, DesiredDataset, calculate_changes, dataset_states, is_nothing, summarize,
)
from pyflock.agent._discovery import FilesystemCondition, discover
from pyflock.common._records import DatasetReport
from pyflock.agent._runner import Runner, run_now
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from twisted.logger import Logger

NODES = ("node-a", "node-b", "node-c")
DATASETS = ("ds0", "ds1", "ds2", "ds3")
SIZE = 64 * 1024 * 1024

#: Rounds (every live node converging in turn) after which all must be quiet.
MAX_ROUNDS = 3

#: Steps one node may take in one round.
MAX_STEPS = 12


def root(node):
    """The mount root of a simulated node."""
    return f"/mnt/{node}"


@st.composite
def datasets(draw, nodes, live):
    """
    The initial world and configuration of one dataset, biased towards the interesting:
    attached to its primary, with a ready filesystem, mounted in the wrong place.
    """
    deleted = draw(st.booleans())
    primary = draw(st.sampled_from(nodes if deleted else live))
    attachment = draw(st.sampled_from(
        [None, ("attached", primary), ("attached", primary)]
        + [("attached", n) for n in nodes] + [("stale", n) for n in nodes]))
    return {
        "exists": draw(st.sampled_from([True, True, False])),
        "attachment": attachment,
        "condition": draw(st.sampled_from([FilesystemCondition.NONE,
                                           FilesystemCondition.UNFINISHED,
                                           FilesystemCondition.READY,
                                           FilesystemCondition.READY])),
        "mount": draw(st.sampled_from([None, "own", "astray", "astray", "nowhere-valid"])),
        "configured": draw(st.sampled_from([True, True, True, False])),
        "deleted": deleted,
        "primary": primary,
        "leftover_dirs": draw(st.sets(st.sampled_from(live))),
        "foreign_mount": draw(st.sampled_from([None] + list(live))),
    }


@st.composite
def worlds(draw):
    """A random cluster: nodes (maybe one dead) and datasets in random states."""
    count = draw(st.integers(2, 3))
    nodes = NODES[:count]
    dead = draw(st.sampled_from([None] + list(nodes[1:])))
    live = tuple(n for n in nodes if n != dead)
    ids = DATASETS[:draw(st.integers(1, len(DATASETS)))]
    return {"nodes": nodes, "dead": dead, "live": live,
            "datasets": {i: draw(datasets(nodes, live)) for i in ids}}


class Cluster:
    """Simulated nodes over one memory store, each with its own mounts and runner."""

    def __init__(self, world):
        self.world = world
        self.store = MemoryBlockStore()
        self.disks = MemoryDisks(self.store)
        self.backends = {n: self.store.backend(n) for n in world["nodes"]}
        self.fs = {n: MemoryFilesystems(self.disks, self.backends[n]) for n in world["nodes"]}
        log = Logger(observer=lambda event: None)
        self.runners = {n: Runner(self.backends[n], self.fs[n], run_now, logger=log)
                        for n in world["nodes"]}
        alive = {n: n != world["dead"] for n in world["nodes"]}
        configured = {
            i: DesiredDataset(i, primary=d["primary"], maximum_size=SIZE, deleted=d["deleted"])
            for i, d in world["datasets"].items() if d["configured"]}
        self.desired = {n: Desired(node_uuid=n, datasets=pmap(configured), nodes=pmap(alive))
                        for n in world["nodes"]}
        self.build()

    def build(self):
        """Make the initial world the strategy drew."""
        any_backend = self.backends[self.world["nodes"][0]]
        for i, d in sorted(self.world["datasets"].items()):
            for node in d["leftover_dirs"]:
                self.fs[node].make_directory(f"{root(node)}/{i}")
            if not d["exists"]:
                continue
            any_backend.create_volume(i, SIZE)
            self.disks.set_condition(i, d["condition"])
            if d["attachment"] is None:
                continue
            kind, node = d["attachment"]
            device = self.backends[node].attach_volume(i, node).device_path
            if kind == "stale":
                # A detach that went busy, then finished by itself: the record stays.
                release = self.store.hold(i)
                try:
                    self.backends[node].detach_volume(i)
                except VolumeBusy:
                    pass
                release()
                continue
            # pyflock only mounts ready filesystems (a half-made one is finished first).
            if d["mount"] is None or d["condition"] is not FilesystemCondition.READY:
                continue
            path = {"own": f"{root(node)}/{i}",
                    "astray": f"{root(node)}/{DATASETS[(DATASETS.index(i) + 1) % 4]}",
                    "nowhere-valid": f"{root(node)}/-junk-{i}"}[d["mount"]]
            if path not in self.fs[node].table:
                self.fs[node].mount(device, path)
        for i, d in sorted(self.world["datasets"].items()):
            node = d["foreign_mount"]
            path = f"{root(node)}/{i}" if node else None
            if node and d["configured"] and path not in self.fs[node].table:
                self.fs[node].mount_foreign("tmpfs", path)
        if self.world["dead"] is not None:
            self.fs[self.world["dead"]].crash()
        self.initial = {v.dataset_id: v for v in any_backend.list_volumes()}

    def step(self, node):
        """One discover -> calculate -> run on ``node``; returns the change made."""
        discovered = discover(self.backends[node], self.fs[node], root(node))
        change = calculate_changes(self.desired[node], discovered)
        failures = []
        self.runners[node].run(change).addErrback(failures.append)
        assert not failures, (node, summarize(change), failures[0].getErrorMessage())
        self.check_mounts()
        return change

    def check_mounts(self):
        """Every mounted volume device is attached to the node that mounted it."""
        volumes = {v.device_path: v for v in self.store.backend("x").list_volumes()
                   if v.device_path}
        for node, fs in self.fs.items():
            for path, (source, _) in fs.table.items():
                if source != "tmpfs":
                    assert volumes[source].attached_to == node, (node, path, source)

    def check_converged(self):
        """Every node has exactly what the configuration says, and reports it."""
        volumes = {v.dataset_id: v for v in self.store.backend("x").list_volumes()}
        live = self.world["live"]
        expected_mounts = {n: {} for n in live}
        for i, d in self.world["datasets"].items():
            volume = volumes.get(i)
            if not d["configured"]:
                initial = self.initial.get(i)
                assert volume == initial, (i, volume, initial)
                if (initial is not None and initial.attached_to in live
                        and f"{root(initial.attached_to)}/{i}"
                        in self.fs[initial.attached_to].table):
                    expected_mounts[initial.attached_to][f"{root(initial.attached_to)}/{i}"] \
                        = initial.device_path
                continue
            if d["deleted"]:
                assert volume is None, (i, volume)
                continue
            primary = d["primary"]
            assert volume is not None and volume.attached_to == primary, (i, volume)
            assert self.disks.condition(i) is FilesystemCondition.READY
            expected_mounts[primary][f"{root(primary)}/{i}"] = volume.device_path
        for node in live:
            table = {p: source for p, (source, _) in self.fs[node].table.items()}
            assert expected_mounts[node] == table, node
            configured = {i for i, d in self.world["datasets"].items() if d["configured"]}
            leftover = {p for p in self.fs[node].directories
                        if p.rsplit("/", 1)[1] in configured} - set(table)
            assert set() == leftover, (node, leftover)
            discovered = discover(self.backends[node], self.fs[node], root(node))
            assert pmap({
                i: DatasetReport(i, "mounted", f"{root(node)}/{i}", SIZE)
                for i, d in self.world["datasets"].items()
                if d["configured"] and not d["deleted"] and d["primary"] == node
            }) == dataset_states(self.desired[node], discovered)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_converges_from_any_state(world, data):
    """
    From any state, live nodes taking turns in any order converge within ``MAX_ROUNDS``
    rounds of at most ``MAX_STEPS`` steps each, with every change succeeding and no
    device mounted on a node it is not attached to.
    """
    cluster = Cluster(world)
    for _ in range(MAX_ROUNDS):
        quiet = True
        for node in data.draw(st.permutations(world["live"]), label="order"):
            for _ in range(MAX_STEPS):
                if is_nothing(cluster.step(node)):
                    break
                quiet = False
            else:
                raise AssertionError(f"{node} still changing after {MAX_STEPS} steps")
        if quiet:
            break
    else:
        raise AssertionError(f"not quiet after {MAX_ROUNDS} rounds")
    cluster.check_converged()


@settings(max_examples=100, deadline=None)
@given(world=worlds(), data=st.data())
def test_reboot_remounts(world, data):
    """
    After converging, a reboot of the whole host (every device and mount gone, records
    stale) converges back to the same mounts.
    """
    cluster = Cluster(world)

    def converge():
        for _ in range(MAX_ROUNDS):
            changed = False
            for node in data.draw(st.permutations(world["live"]), label="order"):
                for _ in range(MAX_STEPS):
                    if is_nothing(cluster.step(node)):
                        break
                    changed = True
            if not changed:
                return
        raise AssertionError(f"not quiet after {MAX_ROUNDS} rounds")

    converge()
    for fs in cluster.fs.values():
        fs.table.clear()
    cluster.store.lose_devices()
    cluster.initial = {v.dataset_id: v for v in cluster.store.backend("x").list_volumes()}
    converge()
    cluster.check_converged()
