"""
The leader election's etcd shell (``control/_etcd_leader.py``) on a real one-member etcd:
of three candidates exactly one leads and all name it; a leader that stops hands over; a
write carrying the fence of a leader whose lease is gone is refused with ``Fenced`` and
writes nothing; the leader compacts etcd's history.
"""

from __future__ import annotations

import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from pyflock.common._model import Dataset, Lease
from pyflock.control._etcd_client import EtcdError, EtcdGateway
from pyflock.control._etcd_leader import EtcdLeadership
from pyflock.control._etcd_model import Keys, put, raise_oldest_request, range_request, txn
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._script import _parser
from pyflock.control._store import Fenced, StoreWrite
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

#: The etcd lease TTL of the candidates (etcd's minimum with its stock flags is 2 s).
TTL = 2.0

#: How long a test waits for the election to settle before it fails.
WAIT = 15.0

NODE = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "00000000-0000-4000-8000-000000000001"

etcd = etcd_cluster_fixture(1)


def _reactor():
    from twisted.internet import reactor
    return reactor


async def until(condition, what: str) -> None:
    """Poll ``condition()`` every 50 ms until it holds; fail after ``WAIT`` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < WAIT, f"{what}: not within {WAIT} s"
        await deferLater(_reactor(), 0.05, lambda: None)


def candidates(etcd, prefix: str, count: int, **options) -> list[EtcdLeadership]:
    """``count`` started candidates under ``prefix``, each with a gateway of its own."""
    made = []
    for n in range(count):
        gateway = EtcdGateway(_reactor(), etcd.endpoints)
        leadership = EtcdLeadership(_reactor(), gateway, Keys.under(prefix), f"r{n}",
                                    ttl=TTL, **options)
        leadership.start()
        made.append(leadership)
    return made


async def close(made: list[EtcdLeadership]) -> None:
    """Stop every candidate and drop its connections."""
    for leadership in made:
        await leadership.stop()
        await leadership._gateway.close()


@pytest_twisted.ensureDeferred
async def test_exactly_one_of_three_leads_and_hands_over(etcd):
    """Three candidates: one leads, all name it; once it stops, another leads."""
    made = candidates(etcd, f"/leader-{uuid4().hex[:8]}/", 3)
    try:
        await until(lambda: all(m.leader for m in made), "every candidate knows a leader")
        leaders = [m for m in made if m.leading]
        assert len(leaders) == 1
        assert {m.leader for m in made} == {leaders[0].name}
        assert leaders[0].fence is not None
        first = leaders[0]
        await first.stop()
        rest = [m for m in made if m is not first]
        await until(lambda: any(m.leading for m in rest), "another candidate leads")
        assert sum(m.leading for m in rest) == 1
        await until(lambda: {m.leader for m in rest} == {next(
            m.name for m in rest if m.leading)}, "both name the new leader")
    finally:
        await close(made)


@pytest_twisted.ensureDeferred
async def test_write_with_a_broken_fence_is_refused(etcd):
    """A leader-only write whose fence's lease is gone is refused and writes nothing."""
    prefix = f"/fence-{uuid4().hex[:8]}/"
    store = await open_etcd_store(_reactor(), etcd.endpoints, prefix)
    (leader,) = candidates(etcd, prefix, 1)
    try:
        await until(lambda: leader.leading, "the only candidate leads")
        fence = leader.fence
        dataset = Dataset(dataset_id=DS, primary=NODE)
        lease = Lease(dataset_id=DS, node_uuid=NODE, expiration=1.0)
        await store.write(StoreWrite(datasets=((DS, dataset),), leases=((DS, lease),),
                                     generation=1))
        # The lease behind the fence ends (as when its replica was paused past its TTL).
        await leader._gateway.call("lease/revoke", {"ID": str(leader.election.lease)})
        with pytest.raises(Fenced):
            await store.write(StoreWrite(leases=((DS, None),), generation=1, fence=fence))
        assert DS in (await store.load()).configuration.leases
        answer = await store.gateway.call("kv/txn", raise_oldest_request(
            Keys.under(prefix), 0, 1, fence))
        assert not answer.get("succeeded")
        # The candidate learns that its lease is gone and leads again with a new fence.
        await until(lambda: leader.leading and leader.fence != fence, "it leads again")
        await store.write(StoreWrite(leases=((DS, None),), generation=1,
                                     fence=leader.fence))
        assert DS not in (await store.load()).configuration.leases
    finally:
        await close([leader])
        await store.close()


@pytest_twisted.ensureDeferred
async def test_fenced_transactions_of_other_parts(etcd):
    """``write_fenced`` writes while leading; refuses, writing nothing, once the lease is
    gone, and at once on a replica that does not lead."""
    prefix = f"/fenced-txn-{uuid4().hex[:8]}/"
    keys = Keys.under(prefix)
    made = candidates(etcd, prefix, 2)
    try:
        await until(lambda: all(m.leader for m in made), "both know the leader")
        leader = next(m for m in made if m.leading)
        follower = next(m for m in made if not m.leading)

        def putting(value: bytes) -> dict:
            return txn(success=[put(keys.prefix + b"dead/n1", value)])
        answer = await leader.write_fenced(leader._gateway, putting(b"1"))
        assert answer.get("succeeded")
        with pytest.raises(Fenced):
            await follower.write_fenced(follower._gateway, putting(b"2"))
        await leader._gateway.call("lease/revoke", {"ID": str(leader.election.lease)})
        with pytest.raises(Fenced):
            await leader.write_fenced(leader._gateway, putting(b"3"))
        assert not leader.leading
        stored = await leader._gateway.call("kv/range", range_request(
            keys.prefix + b"dead/n1"))
        assert [kv["value"] for kv in stored["kvs"]] == ["MQ=="]
    finally:
        await close(made)


@pytest_twisted.ensureDeferred
async def test_leader_compacts_history(etcd):
    """The leader compacts etcd's history to what it held a retention ago."""
    prefix = f"/compact-{uuid4().hex[:8]}/"
    gateway = EtcdGateway(_reactor(), etcd.endpoints)
    key = Keys.under(prefix).prefix + b"x"
    first = int((await gateway.call("kv/put", {"key": "eA==", "value": "eA=="}))
                ["header"]["revision"])
    (leader,) = candidates(etcd, prefix, 1, compaction_retention=0.6)

    async def compacted() -> bool:
        try:
            await gateway.call("kv/range", range_request(key, revision=first))
        except EtcdError as e:
            return e.code == 11
        return False
    try:
        started = time.monotonic()
        while not await compacted():
            assert time.monotonic() - started < WAIT, "etcd was not compacted"
            await gateway.call("kv/put", {"key": "eA==", "value": "eQ=="})
            await deferLater(_reactor(), 0.1, lambda: None)
    finally:
        await close([leader])
        await Deferred.fromCoroutine(gateway.close())


@pytest.mark.parametrize("option", ["--leader-ttl", "--etcd-compaction-retention"])
def test_option_refuses_a_non_positive_number(option, capsys):
    """``--leader-ttl`` and ``--etcd-compaction-retention`` refuse 0, saying why."""
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", option, "0"])
    assert "0 is not a positive number of seconds" in capsys.readouterr().err
    assert getattr(_parser().parse_args(["run", option, "2.5"]),
                   option[2:].replace("-", "_")) == 2.5
