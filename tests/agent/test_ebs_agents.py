"""
Real ``pyflock-agent`` processes on the ebs backend (needs root): one control service and
two agents of a ``LocalCluster``, each agent on its own simulated instance of the fake EC2
(``tests.harness.fake_ec2``, whose volumes really attach as loop devices). A dataset is
created, written, moved to the other agent, read back and deleted, through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import yaml

from tests.harness.agents import LocalCluster
from tests.harness.fake_ec2 import FakeEC2
from tests.harness.requirements import ROOT, require_commands

pytestmark = [pytest.mark.integration, ROOT]

#: Bound on any one wait for the cluster to converge.
TIMEOUT = 60.0


@pytest.fixture
def ebs_cluster(tmp_path):
    """A started ``LocalCluster`` of two agents whose agent.yml names the ebs backend on
    one fake EC2 (an instance each); everything is stopped and detached afterwards."""
    require_commands("losetup", "mkfs.ext4")
    fake = FakeEC2().start()
    cluster = None
    try:
        cluster = LocalCluster(tmp_path / "cluster", nodes=2)
        for agent in cluster.agents:
            document = yaml.safe_load(agent.config_path.read_text())
            document["dataset"] = {
                "backend": "ebs", "default_size": "1G", "endpoint_url": fake.url,
                "metadata_url": fake.metadata_url(fake.add_instance()),
                "device_folder": fake.device_folder}
            agent.config_path.write_text(yaml.safe_dump(document))
        cluster.start()
        cluster.fake = fake
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        fake.close()


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
