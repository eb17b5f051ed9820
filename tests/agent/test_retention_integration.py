"""
The recycle bin for real: a real ``pyflock-control`` and two ``pyflock-agent`` processes on
loop devices (needs root). A deleted dataset is unmounted and detached but its image is
kept, its name is free at once, a control-service restart loses nothing, and a restore
(under a new name once the old one is taken) brings the data back intact; a node
certificate can never purge; once the retention ends, or a user purges, the data goes.
"""

import os
import time

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from tests.agent.test_agents_integration import (
    DATASETS, TIMEOUT, checksum, create, gone, poll, reactor, wait_mounted, write_random,
)
from tests.harness.agents import LocalCluster
from tests.harness.requirements import ROOT

pytestmark = [pytest.mark.integration, ROOT]

__all__ = ["reactor"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One control service (default retention: an hour) and two agents for the module."""
    local = LocalCluster(tmp_path_factory.mktemp("retention"), nodes=2,
                         control_arguments=["--node-expiry", "10"])
    try:
        local.start()
        yield local
    finally:
        local.close()


@pytest_twisted.async_yield_fixture
async def api(reactor, cluster):
    """Alice's REST API client; the control service runs with the module's arguments."""
    if not cluster.control.running:
        cluster.control.start()
    client = cluster.api_client(reactor)
    client.created = []
    yield client
    await client.close()
    cluster.control.extra_arguments = ("--node-expiry", "10")


async def let_go(reactor, cluster, dataset_id: str) -> None:
    """Wait until ``dataset_id`` is mounted nowhere and attached to no loop device."""
    def check():
        holders = cluster.holders(dataset_id)
        return (holders.devices == () and holders.mounted_on == frozenset()
                and holders.recorded_node is None)
    await poll(reactor, check, f"{dataset_id} unmounted and detached")


async def restart_control(reactor, cluster, api, extra=()) -> None:
    """Kill the control service (-9) and start it again, with ``extra`` arguments; wait
    until every agent has reconnected."""
    connected = [len(a.log_events("pyflock:agent:channel-connected")) for a in cluster.agents]
    cluster.control.kill9()
    await api.close()
    cluster.control.extra_arguments = ("--node-expiry", "10") + tuple(extra)
    cluster.control.start()
    for agent, count in zip(cluster.agents, connected):
        await agent.wait_for_event(reactor, "pyflock:agent:channel-connected", after=count,
                                   timeout=TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_delete_restart_restore(reactor, cluster, api):
    """
    Deleted, a dataset's image stays (unmounted, detached) and its name is free; after a
    kill -9 of the control service and the agents' purge grace, it is still kept, and a
    restore under a new name mounts it with its data; a node certificate cannot purge it.
    """
    n1, n2 = cluster.node_uuids
    dataset_id = await create(api, n1, "binned")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    written = write_random(entry["path"])

    deleted = await api.delete(f"{DATASETS}/{dataset_id}")
    assert deleted.code == 200 and deleted.json["deleted"], deleted
    assert deleted.json["retained_until"] > time.time() + 3500
    await let_go(reactor, cluster, dataset_id)
    assert cluster.image_path(dataset_id).exists()
    listed = [d for d in (await api.get(DATASETS)).json if d["dataset_id"] == dataset_id]
    assert [(d["deleted"], d["retained_until"]) for d in listed] == [
        (True, deleted.json["retained_until"])]
    # The name is free at once: another dataset takes it.
    taker = await create(api, n2, "binned")

    node = cluster.api_client(reactor, n1)
    try:
        refused = await node.delete(f"{DATASETS}/{dataset_id}?purge=true")
        assert refused.code == 403, refused
        assert (await node.post(f"{DATASETS}/{dataset_id}/restore")).code == 403
    finally:
        await node.close()

    await restart_control(reactor, cluster, api)
    # Past the restarted service's node expiry, when it purges what no node holds.
    await deferLater(reactor, 11, lambda: None)
    assert cluster.image_path(dataset_id).exists()
    assert not any(e.get("dataset_id") == dataset_id for e in
                   cluster.agent(n1).log_events("pyflock:agent:change-done")
                   if e.get("change") == "DestroyVolume")

    taken = await api.post(f"{DATASETS}/{dataset_id}/restore")
    assert taken.code == 409, taken
    restored = await api.post(f"{DATASETS}/{dataset_id}/restore",
                              {"metadata": {"name": "binned-old"}})
    assert (restored.code, restored.json["metadata"]["name"]) == (200, "binned-old")
    entry = await wait_mounted(reactor, cluster, api, dataset_id, n1)
    assert checksum(entry["path"]) == written

    # Purged by a user, the data goes at once.
    for gone_id in (dataset_id, taker):
        assert (await api.delete(f"{DATASETS}/{gone_id}?purge=true")).code == 200
    await gone(reactor, cluster, api, dataset_id)


@pytest_twisted.ensureDeferred
async def test_retention_ends(reactor, cluster, api):
    """With ``--deleted-retention 3``, a deleted dataset's data goes after 3 s, and a
    restore then answers 410."""
    n1, _ = cluster.node_uuids
    await restart_control(reactor, cluster, api, ["--deleted-retention", "3"])
    dataset_id = await create(api, n1, "short-lived")
    await wait_mounted(reactor, cluster, api, dataset_id, n1)
    started = time.monotonic()
    deleted = await api.delete(f"{DATASETS}/{dataset_id}")
    assert deleted.code == 200 and "retained_until" in deleted.json, deleted
    await gone(reactor, cluster, api, dataset_id, timeout=TIMEOUT)
    assert time.monotonic() - started >= 2.5
    # Its data went: a restore is refused (410, or 404 once the tombstone is purged).
    restore = await api.post(f"{DATASETS}/{dataset_id}/restore")
    assert restore.code in (404, 410), restore
    assert not os.path.exists(cluster.image_path(dataset_id))
