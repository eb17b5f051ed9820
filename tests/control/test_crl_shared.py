"""
The revocation list shared through etcd (issue 9, point 5), with two replicas' list
keepers in one process on a real etcd member: a list loaded from the file of replica 1 is
written to etcd and put in force on replica 2; an older file on replica 2 does not undo
it; a list in etcd that the cluster CA did not sign is ignored; and with two real
replicas, a user revoked in one replica's folder is refused by the other.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import pytest
import pytest_twisted

from pyflock.common._ca import load_certificate
from pyflock.common._crl import read_crl, revoke
from pyflock.common._revocation import Revocations
from pyflock.control._crl_sync import read_shared_crl, share_revocations, write_shared_crl
from pyflock.control._etcd_store import open_etcd_store
from tests.control.test_revocation_integration import _wait
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, read_events, script_path
from tests.harness.processes import free_address
from tests.harness.etcd import etcd_cluster_fixture

pytestmark = pytest.mark.integration

etcd = etcd_cluster_fixture(1)

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=timezone.utc)


class Replica:
    """What one replica keeps of the revocation list: the file's, and the one in force."""

    def __init__(self):
        self.from_file = Revocations()
        self.in_force = Revocations()
        self.shared = None
        self.store = None

    async def start(self, reactor, etcd, prefix, authority):
        """Open the store and start sharing the list (its watch running)."""
        self.store = await open_etcd_store(reactor, etcd.endpoints, prefix)
        self.shared = await share_revocations(reactor, self.store, authority,
                                              self.from_file, self.in_force)

    async def stop(self):
        """Stop sharing and close the store."""
        if self.shared is not None:
            await self.shared.stop()
        if self.store is not None:
            await self.store.close()


@pytest_twisted.ensureDeferred
async def test_revocation_through_one_replica_reaches_the_other(tmp_path, etcd):
    """
    A list loaded on replica 1 is in etcd and in force on replica 2 after its next look;
    replica 2 loading an older list from its own file keeps the newer one in force.
    """
    from twisted.internet import reactor
    cluster = make_cluster_certificates(tmp_path, nodes=2)
    authority = load_certificate(tmp_path / "cluster.crt")
    (tmp_path / "o1").mkdir()
    old = read_crl(revoke(tmp_path, tmp_path / "o1", node=cluster.node_uuids[1],
                          now=NOW - timedelta(hours=1)).crl_path, authority)
    (tmp_path / "o2").mkdir()
    new = read_crl(revoke(tmp_path, tmp_path / "o2", node=cluster.node_uuids[0],
                          now=NOW).crl_path, authority)
    prefix = f"/crl-{uuid4().hex[:8]}/"
    one, two = Replica(), Replica()
    try:
        await one.start(reactor, etcd, prefix, authority)
        await two.start(reactor, etcd, prefix, authority)
        one.from_file.replace(new)
        await one.shared.sync()
        assert await read_shared_crl(one.store.gateway, one.store.keys) == new.pem.encode()
        await two.shared.sync()
        assert two.in_force.current.serials == new.serials
        two.from_file.replace(old)
        await two.shared.sync()
        assert two.in_force.current.serials == new.serials
        assert await read_shared_crl(one.store.gateway, one.store.keys) == new.pem.encode()
    finally:
        await one.stop()
        await two.stop()


@pytest_twisted.ensureDeferred
async def test_the_watch_puts_a_new_list_in_force(tmp_path, etcd):
    """
    A list written to etcd by replica 1 is put in force on replica 2 by its watch on the
    key, without anyone asking replica 2 to look, and again after its watch was cut.
    """
    from twisted.internet import reactor
    cluster = make_cluster_certificates(tmp_path, nodes=2)
    authority = load_certificate(tmp_path / "cluster.crt")
    lists = []
    for n, node in enumerate(cluster.node_uuids):
        (tmp_path / f"o{n}").mkdir()
        lists.append(read_crl(revoke(tmp_path, tmp_path / f"o{n}", node=node,
                                     now=NOW + timedelta(hours=n)).crl_path, authority))
    prefix = f"/crl-{uuid4().hex[:8]}/"
    one, two = Replica(), Replica()
    try:
        await one.start(reactor, etcd, prefix, authority)
        await two.start(reactor, etcd, prefix, authority)
        one.from_file.replace(lists[0])
        assert await _wait(reactor, lambda: two.in_force.current.serials
                           == lists[0].serials, 10.0)
        assert await _wait(reactor, lambda: two.shared._stream is not None, 10.0)
        two.shared._stream.abort()  # as a lost member would: it reads and watches again
        one.from_file.replace(lists[1])
        assert await _wait(reactor, lambda: two.in_force.current.serials
                           == lists[1].serials, 10.0)
    finally:
        await one.stop()
        await two.stop()


@pytest_twisted.ensureDeferred
async def test_a_list_not_signed_by_the_ca_is_ignored(tmp_path, etcd):
    """A list in etcd signed by another CA is not put in force; the file's stays."""
    from twisted.internet import reactor
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cluster = make_cluster_certificates(tmp_path / "a", nodes=1)
    other = make_cluster_certificates(tmp_path / "b", nodes=1)
    foreign = revoke(other.path, other.path, node=other.node_uuids[0], now=NOW).crl_path
    authority = load_certificate(cluster.path / "cluster.crt")
    prefix = f"/crl-{uuid4().hex[:8]}/"
    store = await open_etcd_store(reactor, etcd.endpoints, prefix)
    try:
        assert await write_shared_crl(store.gateway, store.keys, foreign.read_bytes())
    finally:
        await store.close()
    replica = Replica()
    try:
        await replica.start(reactor, etcd, prefix, authority)
        assert replica.in_force.current.serials == frozenset()
    finally:
        await replica.stop()


@pytest_twisted.ensureDeferred
async def test_real_replicas_share_a_revocation(tmp_path, etcd):
    """
    Two ``pyflock-control`` replicas on one etcd prefix, each with its own certificates
    folder: ``pyflock-ca revoke --user bob`` into replica 1's folder makes replica 2 refuse
    bob too (its folder never changes); alice goes on through both.
    """
    from twisted.internet import reactor
    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    make_cluster_certificates(folder, nodes=1, users=("alice", "bob"), control_host=host)
    second = tmp_path / "certs-2"
    second.mkdir()
    for name in ("cluster.crt", "control-service.crt", "control-service.key"):
        shutil.copy2(folder / name, second / name)
    store = ["--store", "etcd", "--etcd-endpoints", ",".join(etcd.endpoints),
             "--etcd-prefix", f"/crl-{uuid4().hex[:8]}/"]
    replicas = [ControlProcess(tmp_path / f"data-{i}", path, host=host,
                               log_directory=tmp_path / "logs",
                               extra_arguments=store + ["--replica-name", f"r{i}"])
                for i, path in enumerate((folder, second))]
    clients = []
    try:
        for replica in replicas:
            replica.start()
        bob, alice = (APIClient(reactor, replicas[1].url, folder, user)
                      for user in ("bob", "alice"))
        clients = [bob, alice]
        assert (await bob.get("/v1/version")).code == 200
        done = subprocess.run([script_path("pyflock-ca"), "revoke", "-i", str(folder), "-o",
                               str(folder), "--user", "bob"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr

        def from_etcd():
            return [e for e in read_events(replicas[1].log_path, "pyflock:crl:in-force")
                    if e.get("source") == "etcd"]
        assert await _wait(reactor, from_etcd, 20.0)
        with pytest.raises(Exception):
            await bob.get("/v1/version")
        assert (await alice.get("/v1/version")).code == 200
    finally:
        for client in clients:
            await client.close()
        for replica in replicas:
            replica.close()

