"""
The whole agent as a real process: one real ``pyflock-control`` and three ``pyflock-agent``
processes on 127.0.0.x, real TLS, real loop devices and ext4 mounts (needs root). Datasets
are created, moved, deleted; agents and the control service are stopped, killed and
restarted; a reboot is simulated. Measured latencies are printed (``pytest -s``).
"""

import hashlib
import os
import subprocess
import threading
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.harness.agents import AgentProcess, LocalCluster, write_agent_config
from tests.harness.requirements import ROOT
from pyflock.common._model import MINIMUM_SIZE

pytestmark = [pytest.mark.integration, ROOT]

DATASETS = "/v1/configuration/datasets"
STATE = "/v1/state/datasets"

#: Bound on any one wait for the cluster to converge.
TIMEOUT = 30.0

MiB = 1024 * 1024


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """
    One control service and three agents for the whole module (starting them is the
    slow part); a node silent for 10 s is dead, so tombstones are purged soon after a
    start; deleted datasets are not kept (the recycle bin has its own module,
    ``test_retention_integration``). The agents' unmounts and their binding of a loop
    device (``pyflock.common._gates``) can be stopped at gates.
    """
    local = LocalCluster(tmp_path_factory.mktemp("agents"), nodes=3,
                         control_arguments=["--node-expiry", "10",
                                            "--deleted-retention", "0"],
                         gated_commands=())
    try:
        local.start()
        yield local
    finally:
        local.close()


@pytest_twisted.async_yield_fixture
async def api(reactor, cluster):
    """Alice's REST API client; every process of the cluster runs when the test starts."""
    cluster.gates.release_all()
    if not cluster.control.running:
        cluster.control.start()
    for agent in cluster.agents:
        if not agent.running:
            agent.start()
    client = cluster.api_client(reactor)
    created = []
    client.created = created
    yield client
    # Leave nothing behind for the next test, whatever this one did.
    for dataset_id in created:
        try:
            await client.delete(f"{DATASETS}/{dataset_id}")
        except Exception:
            pass
    await client.close()


async def poll(reactor, check, what: str, timeout: float = TIMEOUT):
    """Call ``check()`` (it may be async) until it returns something true; return that."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if reactor.seconds() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)


async def create(api, node_uuid: str, name: str) -> str:
    """Create a 64 MiB dataset named ``name`` on ``node_uuid``; its id."""
    r = await api.post(DATASETS, {"primary": node_uuid, "maximum_size": MINIMUM_SIZE,
                                  "metadata": {"name": name}})
    assert r.code == 201, r
    api.created.append(r.json["dataset_id"])
    return r.json["dataset_id"]


async def move(api, dataset_id: str, node_uuid: str) -> None:
    """Ask for ``dataset_id`` to move to ``node_uuid``."""
    r = await api.post(f"{DATASETS}/{dataset_id}", {"primary": node_uuid})
    assert r.code == 200, r


async def state_of(api, dataset_id: str) -> list:
    """The entries of ``/v1/state/datasets`` about ``dataset_id``."""
    r = await api.get(STATE)
    assert r.code == 200, r
    return [d for d in r.json if d["dataset_id"] == dataset_id]


async def wait_mounted(reactor, cluster, api, dataset_id: str, node_uuid: str,
                       timeout: float = TIMEOUT) -> dict:
    """
    Wait until ``dataset_id`` is in one place only: mounted on ``node_uuid`` (kernel), one
    loop device, recorded as that node's, and the only state entry says so with its path.
    """
    mount_point = str(cluster.agent(node_uuid).mount_point(dataset_id))

    async def check():
        holders = cluster.holders(dataset_id)
        if (holders.mounted_on != {node_uuid} or len(holders.devices) != 1
                or holders.recorded_node != node_uuid):
            return None
        entries = await state_of(api, dataset_id)
        if [(e["primary"], e["state"], e.get("path")) for e in entries] \
                == [(node_uuid, "mounted", mount_point)]:
            return entries[0]
        return None
    return await poll(reactor, check, f"{dataset_id} mounted on {node_uuid} only", timeout)


def write_random(folder, size: int = 4 * MiB) -> str:
    """Write ``size`` random bytes to ``folder/data`` durably; their sha256."""
    data = os.urandom(size)
    with open(os.path.join(folder, "data"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def checksum(folder) -> str:
    """The sha256 of ``folder/data``."""
    with open(os.path.join(folder, "data"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def latency(what: str, seconds: float) -> None:
    """Print one measured latency (not asserted: the machine is shared)."""
    print(f"\n[latency] {what}: {seconds * 1000:.0f} ms")


async def gone(reactor, cluster, api, dataset_id: str, timeout: float = TIMEOUT) -> None:
    """Wait until nothing of ``dataset_id`` is left on the host nor in the cluster state."""
    async def check():
        holders = cluster.holders(dataset_id)
        return (not cluster.image_path(dataset_id).exists()
                and not cluster.record_path(dataset_id).exists()
                and holders.devices == () and holders.mounted_on == frozenset()
                and not any(a.mount_point(dataset_id).exists() for a in cluster.agents)
                and await state_of(api, dataset_id) == [])
    await poll(reactor, check, f"{dataset_id} destroyed", timeout)


def change_events(agent: AgentProcess, dataset_id: str) -> list:
    """The changes ``agent`` made to ``dataset_id`` in its current run, by name."""
    return [e["change"] for e in agent.log_events("pyflock:agent:change-done")
            if e.get("dataset_id") == dataset_id]


# 1 -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_move_move_back_delete(reactor, cluster, api):
    """
    A dataset created on node 1 is mounted there; its data survives a move to node 2 and
    back; once deleted nothing of it is left: state, image, loop device, mount, records.
    """
    n1, n2, _ = cluster.node_uuids
    started = time.monotonic()
    dataset_id = await create(api, n1, "lifecycle")
    acknowledged = time.monotonic()
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    latency("create -> REST 201", acknowledged - started)
    latency("create -> mounted on node 1", time.monotonic() - started)
    assert entry["path"] == str(cluster.agent(n1).mount_point(dataset_id))
    assert os.path.ismount(entry["path"])
    assert sorted(os.listdir(entry["path"])) == []
    written = write_random(entry["path"])

    for target in (n2, n1):
        started = time.monotonic()
        await move(api, dataset_id, target)
        entry = await wait_mounted(reactor, cluster, api, dataset_id, target)
        latency(f"move -> mounted on node {cluster.node_uuids.index(target) + 1}",
                time.monotonic() - started)
        assert checksum(entry["path"]) == written

    started = time.monotonic()
    r = await api.delete(f"{DATASETS}/{dataset_id}")
    assert r.code == 200, r
    await gone(reactor, cluster, api, dataset_id)
    latency("delete -> destroyed", time.monotonic() - started)

    async def purged():
        listing = (await api.get(DATASETS)).json
        return all(d["dataset_id"] != dataset_id for d in listing)
    # Tombstones are purged once every live node has vouched for not holding it (and
    # never during the control service's first node expiry).
    await poll(reactor, purged, "tombstone purged", timeout=TIMEOUT)


# 2 -------------------------------------------------------------------------------------

class HolderSampler:
    """
    Samples who holds a dataset, at consistent moments (under the loopback root's lock),
    in a thread, as fast as it can; records violations of "one node at a time" and the
    sequence of holders seen.
    """

    def __init__(self, cluster: LocalCluster, dataset_id: str):
        self.cluster = cluster
        self.dataset_id = dataset_id
        self.samples = 0
        self.violations: list = []
        self.sequence: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join(TIMEOUT)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                holders = self.cluster.holders(self.dataset_id)
            except Exception as e:
                self.violations.append(f"sampling failed: {e!r}")
                return
            self.samples += 1
            if len(holders.devices) > 1:
                self.violations.append(f"two loop devices at once: {holders}")
            if holders.devices and holders.recorded_node is None:
                self.violations.append(f"a device no record explains: {holders}")
            if len(holders.mounted_on) > 1:
                self.violations.append(f"mounted on two nodes at once: {holders}")
            if holders.mounted_on - {holders.recorded_node}:
                self.violations.append(f"mounted on a node not holding it: {holders}")
            holder = holders.recorded_node if holders.devices else None
            if holder is not None and (not self.sequence or self.sequence[-1] != holder):
                self.sequence.append(holder)
            self._stop.wait(0.002)


@pytest_twisted.ensureDeferred
async def test_never_attached_to_two_nodes(reactor, cluster, api):
    """
    While a dataset moves around all three nodes, it is never attached to, nor mounted
    on, two nodes at the same moment.
    """
    n1, n2, n3 = cluster.node_uuids
    dataset_id = await create(api, n1, "one-at-a-time")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    written = write_random(entry["path"], MiB)
    sampler = HolderSampler(cluster, dataset_id)
    sampler.start()
    try:
        for target in (n2, n3, n1):
            await move(api, dataset_id, target)
            entry = await wait_mounted(reactor, cluster, api, dataset_id, target)
    finally:
        sampler.stop()
    print(f"\n[sampler] {sampler.samples} samples, holders seen: "
          f"{[cluster.node_uuids.index(h) + 1 for h in sampler.sequence]}")
    assert sampler.violations == []
    assert sampler.sequence == [n1, n2, n3, n1]
    assert checksum(entry["path"]) == written


# 3 -------------------------------------------------------------------------------------

def last_changes(agent: AgentProcess, count: int = 2) -> list:
    """The last few converge steps of ``agent``'s current run."""
    return [e["changes"] for e in agent.log_events("pyflock:agent:converge")][-count:]


#: How each crash scenario goes: which agent is killed (the dataset's old primary or its
#: new one), the command or in-process gate it is stopped at (None: killed right after
#: the move request), what becomes of that command after the kill ("release": it runs
#: anyway; "kill": it never does, as an in-process gate dies with its agent), and what
#: the host must then show: (devices, recorded node, mounted on).
KILL_SCENARIOS = {
    "old-right-after-request": ("old", None, None, None),
    "old-after-unmounting": ("old", "unmounted", "kill", (1, "old", ())),
    "new-attaching-before-device": ("new", "loop-attach", "kill", (0, "new", ())),
    "new-attaching-after-device": ("new", "loop-attached", "kill", (1, "new", ())),
}


@pytest.mark.parametrize("scenario", list(KILL_SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_kill_agent_during_move(reactor, cluster, api, scenario):
    """
    An agent killed (-9) in the middle of a move, then restarted, leaves exactly one copy
    of the dataset, mounted on the new primary, its data intact; at no moment is it
    attached to two nodes.
    """
    victim, command, then, expected = KILL_SCENARIOS[scenario]
    old, new = cluster.node_uuids[:2] if victim == "old" else cluster.node_uuids[1:]
    dataset_id = await create(api, old, f"kill-{scenario}")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, old)
    written = write_random(entry["path"])
    agent = cluster.agent(old if victim == "old" else new)

    sampler = HolderSampler(cluster, dataset_id)
    sampler.start()
    if command is not None:
        cluster.gates.close(agent.name, command)
    try:
        await move(api, dataset_id, new)
        if command is not None:
            await deferToThread(cluster.gates.wait_reached, agent.name, command, TIMEOUT)
        agent.kill9()
    finally:
        if command is not None:
            if then == "kill":
                cluster.gates.kill(agent.name, command)
            else:
                cluster.gates.release(agent.name, command)
    if expected is not None:
        devices, recorded, mounted = expected
        want = (devices, {"old": old, "new": new}[recorded], frozenset(mounted))

        def landed():
            holders = cluster.holders(dataset_id)
            return (len(holders.devices), holders.recorded_node, holders.mounted_on) == want
        # The released command finishes by itself, after its agent died.
        await poll(reactor, landed, f"{scenario}: the state the kill should leave")
    print(f"\n[kill] {scenario}: killed after {last_changes(agent)}; "
          f"left {cluster.holders(dataset_id)}")

    agent.start()
    try:
        entry = await wait_mounted(reactor, cluster, api, dataset_id, new)
    finally:
        sampler.stop()
    assert sampler.violations == []
    assert sampler.sequence == [old, new]
    assert checksum(entry["path"]) == written
    assert cluster.image_path(dataset_id).exists()
    assert not cluster.agent(old).mount_point(dataset_id).exists()


# 4 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest_twisted.ensureDeferred
async def test_control_restart(reactor, cluster, api, how):
    """
    After the control service stops (SIGTERM or kill -9) and starts again, every agent
    reconnects, the state comes back, no acknowledged change is lost, mounted datasets
    stay mounted, and new creates converge.
    """
    n1, n2, n3 = cluster.node_uuids
    dataset_id = await create(api, n1, f"survivor-{how}")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    written = write_random(entry["path"], MiB)
    mount_before = cluster.mounted_on(dataset_id)[n1]
    connected = [len(a.log_events("pyflock:agent:channel-connected")) for a in cluster.agents]
    # Acknowledged just before the control service goes: it must not be lost.
    last_minute = await create(api, n2, f"last-minute-{how}")

    if how == "sigterm":
        assert cluster.control.stop() == 0
    else:
        cluster.control.kill9()
    await api.close()
    cluster.control.start()
    restarted = time.monotonic()
    for agent, count in zip(cluster.agents, connected):
        await agent.wait_for_event(reactor, "pyflock:agent:channel-connected", after=count,
                                   timeout=TIMEOUT)
    latency(f"control restart ({how}) -> all agents reconnected",
            time.monotonic() - restarted)

    listing = {d["dataset_id"]: d for d in (await api.get(DATASETS)).json}
    assert listing[dataset_id]["primary"] == n1
    assert listing[last_minute]["primary"] == n2
    nodes = (await api.get("/v1/state/nodes")).json
    assert sorted((n["uuid"], n["alive"]) for n in nodes) == sorted(
        (n, True) for n in cluster.node_uuids)
    await wait_mounted(reactor, cluster, api, dataset_id, n1)
    await wait_mounted(reactor, cluster, api, last_minute, n2)
    assert cluster.mounted_on(dataset_id)[n1] == mount_before
    assert checksum(entry["path"]) == written

    started = time.monotonic()
    after = await create(api, n3, f"after-restart-{how}")
    await wait_mounted(reactor, cluster, api, after, n3)
    latency(f"create after control restart ({how}) -> mounted", time.monotonic() - started)


# 5 -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_agent_stop_leaves_datasets_mounted(reactor, cluster, api):
    """
    A stopped agent leaves its datasets mounted, and once started again it keeps the very
    same mount (no unmount, no remount) while it converges other work.
    """
    n1, _, _ = cluster.node_uuids
    agent = cluster.agent(n1)
    dataset_id = await create(api, n1, "stays")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    written = write_random(entry["path"], MiB)
    mount = cluster.mounted_on(dataset_id)[n1]

    assert agent.stop() == 0
    assert agent.log_events("pyflock:agent:stopped")
    assert cluster.mounted_on(dataset_id) == {n1: mount}
    assert cluster.holders(dataset_id).devices == (mount.source,)
    # Work for the agent when it comes back, in steps that also look at the first one.
    other = await create(api, n1, "while-stopped")

    agent.start()
    await wait_mounted(reactor, cluster, api, other, n1)
    assert cluster.mounted_on(dataset_id) == {n1: mount}
    # Every step decides for every dataset at once: had the first one needed anything,
    # the steps that mounted the second would have said so.
    assert [e for e in agent.log_events("pyflock:agent:converge")
            if dataset_id in e["dataset_ids"]] == []
    assert checksum(entry["path"]) == written


# 6 -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reboot_reattaches_and_remounts(reactor, cluster, api):
    """
    After a simulated reboot (agent stopped, its filesystems unmounted and loop devices
    detached behind its back), the agent reattaches and remounts what its node holds, in
    one step (the attach mounts the ready filesystem).
    """
    _, _, n3 = cluster.node_uuids
    agent = cluster.agent(n3)
    dataset_id = await create(api, n3, "rebooted")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n3)
    written = write_random(entry["path"])
    agent.stop()
    [device] = cluster.holders(dataset_id).devices
    subprocess.run(["umount", entry["path"]], check=True)
    subprocess.run(["losetup", "-d", device], check=True)
    assert cluster.holders(dataset_id).devices == ()
    assert cluster.record_path(dataset_id).exists()   # stale, as a reboot leaves it

    started = time.monotonic()
    agent.start()
    await agent.wait_for_event(
        reactor, "pyflock:agent:change-done",
        lambda e: e.get("change") == "AttachVolume" and e.get("dataset_id") == dataset_id)
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n3)
    latency("agent start after reboot -> remounted", time.monotonic() - started)
    assert change_events(agent, dataset_id) == ["AttachVolume"]
    assert checksum(entry["path"]) == written


# 7 -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_era(reactor, cluster, api):
    """
    ``pyflock-agent era`` prints a UUID-shaped era, the same on every call and the one the
    running agent reported; eras differ between nodes; ``by_era`` answers the node's uuid.
    """
    eras = []
    for agent in cluster.agents:
        first, second = agent.era(), agent.era()
        assert (first.returncode, first.stderr) == (0, "")
        era = first.stdout.strip()
        assert first.stdout == era + "\n" == second.stdout
        assert str(uuid.UUID(era)) == era
        assert agent.log_events("pyflock:agent:started")[0]["era"] == era
        r = await api.get(f"/v1/state/nodes/by_era/{era}")
        assert (r.code, r.json) == (200, {"uuid": agent.node_uuid})
        eras.append(era)
    assert len(set(eras)) == len(eras)


# 8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    (lambda d: d["dataset"].update(backend="zfs"), "dataset.backend"),
    (lambda d: d["control-service"].update(port="many"), "control-service.port"),
    (lambda d: d["dataset"].update(default_size="lots"), "dataset.default_size"),
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d["dataset"].update(root_path="relative"), "dataset.root_path"),
])
def test_bad_configuration(tmp_path, change, key):
    """An agent with a bad ``agent.yml`` exits non-zero with one line naming the key."""
    document = {"version": 1,
                "control-service": {"hostname": "127.0.0.1", "port": 4524},
                "data-path": str(tmp_path / "data"),
                "dataset": {"backend": "loopback", "root_path": str(tmp_path / "loop")}}
    change(document)
    agent = AgentProcess(write_agent_config(tmp_path / "agent.yml", document),
                         log_directory=tmp_path)
    agent.spawn()
    try:
        returncode = agent.wait(TIMEOUT)
    finally:
        agent.close()
    assert returncode != 0
    lines = agent.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pyflock-agent: ") and key in lines[0], lines
    assert not (tmp_path / "data").exists()
