"""
Real ``pyflock-agent`` processes on the ebs backend (needs root): one control service and
two agents of a ``LocalCluster``, each agent on its own simulated instance of the fake EC2
(``tests.harness.fake_ec2``, whose volumes really attach as loop devices). A dataset is
created, written, moved to the other agent, read back and deleted, through the CLI; and a
dead node's dataset is taken over: force-detached only once its instance is stopped,
checked with ``e2fsck``, mounted with its data intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import yaml

from pyflock.agent._backends._ebs_model import BY_ID_PREFIX, TAG_FSCK, nvme_serial
from pyflock.agent._fs import unmount
from tests.harness.agents import LocalCluster
from tests.harness.fake_ec2 import FakeEC2
from tests.harness.requirements import ROOT, require_commands

pytestmark = [pytest.mark.integration, ROOT]

#: Bound on any one wait for the cluster to converge.
TIMEOUT = 60.0


#: Seconds a node stays silent before the control service calls it dead, in the takeover.
NODE_EXPIRY = 6

#: Seconds the takeover's agents wait for a detach before calling it stuck.
DETACH_LIMIT = 2


def ebs_cluster_on(tmp_path, control_arguments=(), zones=(None, None), **options):
    """
    A started ``LocalCluster`` of two agents whose agent.yml names the ebs backend (with
    ``options``) on one fake EC2, an instance each (``cluster.instances``, in the order of
    the agents; in ``zones``, by default the region's first), and that fake
    (``cluster.fake``); a generator: it stops and detaches everything once resumed.
    """
    require_commands("losetup", "mkfs.ext4", "e2fsck")
    fake = FakeEC2().start()
    cluster = None
    try:
        cluster = LocalCluster(tmp_path / "cluster", nodes=2,
                               control_arguments=list(control_arguments))
        cluster.fake, cluster.instances = fake, []
        for agent, zone in zip(cluster.agents, zones):
            instance = fake.add_instance(zone)
            cluster.instances.append(instance)
            document = yaml.safe_load(agent.config_path.read_text())
            document["dataset"] = dict(
                backend="ebs", default_size="1G", endpoint_url=fake.url,
                metadata_url=fake.metadata_url(instance),
                device_folder=fake.device_folder, **options)
            agent.config_path.write_text(yaml.safe_dump(document))
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        fake.close()


@pytest.fixture
def ebs_cluster(tmp_path):
    """Two agents on the fake EC2, with the ebs backend's default waits."""
    yield from ebs_cluster_on(tmp_path)


@pytest.fixture
def two_zone_cluster(tmp_path):
    """Two agents on the fake EC2, on instances in us-east-1a and us-east-1b."""
    yield from ebs_cluster_on(tmp_path, zones=("us-east-1a", "us-east-1b"))


@pytest.fixture
def takeover_cluster(tmp_path):
    """Two agents on the fake EC2 whose nodes die after ``NODE_EXPIRY`` s of silence and
    whose detaches count as stuck after ``DETACH_LIMIT`` s."""
    yield from ebs_cluster_on(
        tmp_path, ["--node-expiry", str(NODE_EXPIRY)],
        wait_limits={"detached": DETACH_LIMIT, "interval": 0.2})


def cli_json(cluster: LocalCluster, *arguments: str):
    """Run ``pyflock --json ...`` against the cluster; its parsed output."""
    done = cluster.run_cli(*arguments, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_mounted(cluster: LocalCluster, dataset_id: str, node: int) -> str:
    """Wait until the CLI lists ``dataset_id`` mounted on agent ``node`` and the kernel
    agrees; its mount point."""
    agent = cluster.agents[node]
    mount_point = str(agent.mount_point(dataset_id))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        [entry] = [d for d in cli_json(cluster, "list") if d["dataset_id"] == dataset_id]
        if (entry["primary"], entry["state"], entry["path"]) == \
                (agent.node_uuid, "mounted", mount_point) and os.path.ismount(mount_point):
            return mount_point
        time.sleep(0.2)
    failed = [e for a in cluster.agents for e in a.log_events("pyflock:agent:change-failed")]
    raise TimeoutError(f"{dataset_id} not mounted on node {node + 1} within {TIMEOUT} s: "
                       f"{cli_json(cluster, 'list')}; failed changes: {failed}; volumes: "
                       f"{cluster.fake.volumes}")


def sha256_of(path: str) -> str:
    """The sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_create_write_move_read_delete(ebs_cluster):
    """A dataset made on node 1 is an EBS volume in the fake, mounted there; its data
    moves with it to node 2; deleted, its volume is detached but kept, and restored it
    mounts again with its data; destroyed ``--now``, its volume is gone from the fake."""
    cluster = ebs_cluster
    created = cli_json(cluster, "create", "--node", cluster.node_uuids[0], "--size", "64M",
                       "--name", "ebs-data")
    dataset_id = created["dataset_id"]
    first = wait_mounted(cluster, dataset_id, 0)
    [volume] = cluster.fake.volumes.values()
    assert (volume.size, volume.tags["pyflock-dataset"]) == (1, dataset_id)
    data = os.urandom(4 * 1024 * 1024)
    with open(os.path.join(first, "data"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

    cli_json(cluster, "move", "--to", cluster.node_uuids[1], dataset_id)
    second = wait_mounted(cluster, dataset_id, 1)
    assert sha256_of(os.path.join(second, "data")) == hashlib.sha256(data).hexdigest()
    assert not os.path.ismount(first)

    cli_json(cluster, "destroy", dataset_id)
    deadline = time.monotonic() + TIMEOUT
    while [v.state for v in cluster.fake.volumes.values()] != ["available"] \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(v.state, v.attachment) for v in cluster.fake.volumes.values()] == [
        ("available", None)]
    assert not os.path.ismount(second)
    cli_json(cluster, "restore", dataset_id)
    again = wait_mounted(cluster, dataset_id, 1)
    assert sha256_of(os.path.join(again, "data")) == hashlib.sha256(data).hexdigest()

    cli_json(cluster, "destroy", "--now", dataset_id)
    deadline = time.monotonic() + TIMEOUT
    while cluster.fake.volumes and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.fake.volumes == {}


def test_zones_reported_and_cross_zone_move_refused(two_zone_cluster):
    """Each agent reports its instance's zone, which ``list-nodes`` shows; a move to the
    other zone is refused naming both zones, with how to copy instead, and the dataset
    stays mounted where it was."""
    cluster = two_zone_cluster
    first, second = cluster.node_uuids
    assert {n["uuid"]: n["zone"] for n in cli_json(cluster, "list-nodes")} == \
        {first: "us-east-1a", second: "us-east-1b"}
    dataset_id = cli_json(cluster, "create", "--node", first, "--size", "64M",
                          "--name", "zoned")["dataset_id"]
    wait_mounted(cluster, dataset_id, 0)
    refused = cluster.run_cli("move", "--to", second, dataset_id)
    assert refused.returncode != 0
    assert (f"is on node {first} in zone us-east-1a; node {second} is in zone us-east-1b"
            in refused.stderr), refused.stderr
    assert "docker run" in refused.stderr
    [entry] = cli_json(cluster, "list")
    assert (entry["primary"], entry["state"]) == (first, "mounted")


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    """Poll ``condition()`` until it gives something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout} s")


def forced_detaches(fake: FakeEC2) -> list:
    """The ``DetachVolume`` requests the fake got with ``Force``."""
    return [r for r in fake.requests
            if r.get("Action") == "DetachVolume" and r.get("Force") == "true"]


def tag_actions(fake: FakeEC2, action: str) -> list:
    """How many tags named ``TAG_FSCK`` each ``action`` request of the fake named."""
    return [sum(1 for k, v in r.items() if k.startswith("Tag.") and k.endswith(".Key")
                and v == TAG_FSCK)
            for r in fake.requests if r.get("Action") == action
            and any(v == TAG_FSCK for v in r.values())]


def test_dead_node_takeover(takeover_cluster):
    """
    A node killed (-9) with a dataset mounted and leased: the move waits for the lease to
    expire; the new node then detaches the volume from the dead node's instance but, while
    EC2 says that instance runs, never forces it (the dataset stays put). Once the
    instance is stopped (its mounts gone, its detach still stuck) the new node forces the
    detach, checks the filesystem with ``e2fsck``, and mounts it with the data intact.
    """
    cluster = takeover_cluster
    fake = cluster.fake
    old, new = cluster.node_uuids
    dataset_id = cli_json(cluster, "create", "--node", old, "--size", "64M",
                          "--name", "takeover")["dataset_id"]
    first = wait_mounted(cluster, dataset_id, 0)
    [volume] = fake.volumes.values()
    data = os.urandom(4 * 1024 * 1024)
    with open(os.path.join(first, "data"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    cli_json(cluster, "leases", "acquire", dataset_id, "--node", old, "--expires", "4")
    cluster.agents[0].kill9()

    refused = cluster.run_cli("move", "--to", new, dataset_id)
    assert refused.returncode != 0 and "Lease already held by node" in refused.stderr
    wait_for(lambda: cluster.run_cli("move", "--to", new, dataset_id).returncode == 0,
             "the move, once the dead node's lease expired")

    def refused_takeover():
        return [e for e in cluster.agents[1].log_events("pyflock:agent:change-failed")
                if e.get("change") == "DetachVolume" and e.get("dataset_id") == dataset_id
                and e.get("error_type") == "VolumeBusy"]
    wait_for(refused_takeover, "a takeover refused while the old instance runs",
             NODE_EXPIRY + TIMEOUT)
    assert forced_detaches(fake) == []
    assert (volume.attachment.instance_id, volume.attachment.state) == \
        (cluster.instances[0], "detaching")
    assert os.path.ismount(first)

    # The old instance stops: its kernel (and so its mount) is gone, while EC2 keeps its
    # detach stuck (here: the loop device held open).
    link = os.path.join(fake.device_folder, "disk", "by-id",
                        BY_ID_PREFIX + nvme_serial(volume.volume_id))
    held = os.open(os.path.realpath(link), os.O_RDONLY)
    try:
        unmount(first)
        fake.set_instance_state(cluster.instances[0], "stopped")
        second = wait_mounted(cluster, dataset_id, 1)
        assert sha256_of(os.path.join(second, "data")) == hashlib.sha256(data).hexdigest()
        [forced] = forced_detaches(fake)
        assert (forced["VolumeId"], forced["InstanceId"]) == \
            (volume.volume_id, cluster.instances[0])
        assert volume.attachment.instance_id == cluster.instances[1]
        # Marked for the check when forced; unmarked only once e2fsck passed.
        assert [tag_actions(fake, a) for a in ("CreateTags", "DeleteTags")] == [[1], [1]]
        assert TAG_FSCK not in volume.tags
    finally:
        os.close(held)
