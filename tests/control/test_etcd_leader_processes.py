"""
One leader for timed work among real ``pyflock-control run --store etcd`` replicas (issue 9,
points 4 and 7) on a three-member etcd cluster, with a 2 s leader TTL: of three replicas
exactly one leads; once it is killed with SIGKILL another leads; a leader stopped with
SIGSTOP past its etcd lease is replaced, and when it wakes (SIGCONT) its lease-expiry
write is refused by its fence, and the lease it wanted to expire stays until the new
leader's lease grace is over.

The tests run in order and share the replicas.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from pyflock.control._etcd_model import Keys
from tests.harness.control import APIClient, ControlProcess
from tests.harness.etcd import etcd_cluster_fixture
from tests.harness.replicas import replicas_on_etcd

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"

#: The replicas' etcd lease TTL (etcd's minimum with stock flags is about 2 s).
LEADER_TTL = 2.0

#: The replicas' lease grace: a new leader expires no lease sooner than this after it leads.
LEASE_GRACE = 8.0

#: The seconds a lease taken in the SIGSTOP test lasts.
LEASE_SECONDS = 5

#: How long a test waits for an event before it fails.
WAIT = 20.0

etcd = etcd_cluster_fixture(3)


def _reactor():
    from twisted.internet import reactor
    return reactor


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, etcd):
    """The cluster's certificates and three started replicas on one fresh prefix."""
    cluster, prefix, processes = replicas_on_etcd(
        tmp_path_factory.mktemp("leader"), [",".join(etcd.endpoints)] * 3,
        ["--leader-ttl", str(LEADER_TTL), "--etcd-check-interval", "0.5"],
        lease_grace=LEASE_GRACE)
    try:
        for process in processes:
            process.start()
        yield cluster, prefix, processes
    finally:
        for process in processes:
            if process.running and process.pid is not None:
                os.kill(process.pid, signal.SIGCONT)
            process.close()


def leading(process: ControlProcess) -> bool:
    """Whether the replica's log says it leads now (its latest election event)."""
    events = [e for e in process.log_events()
              if e["event_type"] in ("pyflock:control:leader-elected",
                                     "pyflock:control:leader-stepped-down")]
    return bool(events) and events[-1]["event_type"] == "pyflock:control:leader-elected"


def stored_lease(etcd, prefix: str, dataset_id: str) -> bytes:
    """The stored row of ``dataset_id``'s lease, read from etcd (empty: none)."""
    key = Keys.under(prefix).lease(dataset_id)
    request = urllib.request.Request(
        f"{etcd.endpoints[0]}/v3/kv/range",
        data=json.dumps({"key": base64.b64encode(key).decode()}).encode())
    with urllib.request.urlopen(request, timeout=5) as answer:
        kvs = json.load(answer).get("kvs", [])
    return base64.b64decode(kvs[0].get("value", "")) if kvs else b""


async def until(condition, what: str) -> float:
    """Poll ``condition()`` every 50 ms until it holds (failing after ``WAIT`` seconds);
    the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < WAIT, f"{what}: not within {WAIT} s"
        await deferLater(_reactor(), 0.05, lambda: None)
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_one_leader_and_another_once_it_is_killed(replicas):
    """Exactly one of three replicas leads; after its kill -9 exactly one other leads."""
    _, _, processes = replicas
    await until(lambda: any(leading(p) for p in processes), "a replica leads")
    await deferLater(_reactor(), LEADER_TTL, lambda: None)  # nobody else claims it
    leaders = [p for p in processes if leading(p)]
    assert len(leaders) == 1
    leaders[0].kill9()
    rest = [p for p in processes if p is not leaders[0]]
    took = await until(lambda: any(leading(p) for p in rest), "another replica leads")
    assert sum(leading(p) for p in rest) == 1, f"two leaders after {took:.1f} s"


@pytest_twisted.ensureDeferred
async def test_paused_leader_is_fenced_and_no_lease_expires_early(replicas, etcd):
    """
    A leader paused (SIGSTOP) past its etcd lease is replaced; a lease that runs out during
    the pause is not expired by the old leader when it wakes (its write is fenced), and
    not by the new one before its lease grace is over.
    """
    cluster, prefix, processes = replicas
    alive = [p for p in processes if p.running]
    await until(lambda: sum(leading(p) for p in alive) == 1, "one replica leads")
    old = next(p for p in alive if leading(p))
    new = next(p for p in alive if p is not old)
    # Only a leader that has led for its lease grace expires leases.
    since = old.log_events("pyflock:control:leader-elected")[-1]["time"]
    await until(lambda: time.time() > since + LEASE_GRACE + 0.5, "the leader settles")
    clients = {p: APIClient(_reactor(), p.url, cluster.path, "alice") for p in alive}
    try:
        created = await clients[new].post(DATASETS, {"primary": cluster.node_uuids[0]})
        assert created.code == 201, created
        dataset_id = created.json["dataset_id"]
        leased = await clients[new].post(LEASES, {"dataset_id": dataset_id,
                                                  "node_uuid": cluster.node_uuids[0],
                                                  "expires": LEASE_SECONDS})
        assert leased.code == 201, leased
        lease_ends = time.monotonic() + LEASE_SECONDS
        while not (await clients[old].get(LEASES)).json:
            await deferLater(_reactor(), 0.02, lambda: None)
        os.kill(old.pid, signal.SIGSTOP)
        try:
            await until(lambda: leading(new), "the other replica leads")
            while time.monotonic() < lease_ends + 1:
                await deferLater(_reactor(), 0.1, lambda: None)
        finally:
            os.kill(old.pid, signal.SIGCONT)
        fenced = await old.wait_for_event(_reactor(), "pyflock:control:leader-fenced",
                                          timeout=WAIT)
        assert fenced["fence_revision"] == old.log_events(
            "pyflock:control:leader-elected")[-1]["fence_revision"]
        assert not old.log_events("pyflock:control:lease-expired")
        # The lease ran out seconds ago (the API lists it no more), but its row is still
        # in etcd: the new leader has not led for its grace yet.
        assert stored_lease(etcd, prefix, dataset_id)
        assert not new.log_events("pyflock:control:lease-expired")
        elected = new.log_events("pyflock:control:leader-elected")[-1]
        expired = await new.wait_for_event(_reactor(), "pyflock:control:lease-expired",
                                           timeout=WAIT)
        assert expired["dataset_id"] == dataset_id
        assert expired["time"] - elected["time"] >= LEASE_GRACE
        await until(lambda: not leading(old) or old.log_events(
            "pyflock:control:leader-stepped-down"), "the old leader stepped down")
        assert leading(new) and not leading(old)
    finally:
        for client in clients.values():
            await client.close()
