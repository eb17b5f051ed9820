"""
The revocation list on a node (issue 8, point 5): an agent checks each list the control
service sends against ``cluster.crt``, refuses one the CA did not sign or older than its
own, stores it in its state folder, reads it back after a restart, and its ``ClusterTLS``
refuses the certificates it lists; over the agent channel (in memory) the lists reach
``on_crl``.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from pyflock.agent._revocations import CRLRefused, NodeRevocations, judge_crl
from pyflock.common._ca import load_certificate
from pyflock.common._crl import CRL_FILE, CRL_LIFETIME, NOTHING_REVOKED, revoke
from pyflock.common._logging import events_of
from pyflock.common._tls import PEER_TRANSFER, ClusterTLS
from pyflock.common._wire import CRLUpdate, Snapshot, Welcome
from tests.agent.test_channel import ChannelHarness
from tests.harness.certificates import make_cluster_certificates

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def certs(tmp_path):
    """A test cluster of two nodes."""
    (tmp_path / "certs").mkdir()
    return make_cluster_certificates(tmp_path / "certs", nodes=2)


def authority(certs):
    """The cluster's CA certificate."""
    return load_certificate(certs.path / "cluster.crt")


def node_certificate(certs, index: int):
    """The certificate of the cluster's node ``index``."""
    return load_certificate(certs.path / f"{certs.node_uuids[index]}.crt")


def revoked_list(certs, tmp_path, index: int, now: datetime = NOW) -> str:
    """The PEM list ``pyflock-ca revoke --node`` signs at ``now`` revoking node ``index``
    (and whatever was revoked before)."""
    out = tempfile.mkdtemp(prefix="out-", dir=tmp_path)
    return revoke(certs.path, out, node=certs.node_uuids[index], now=now
                  ).crl_path.read_text()


def node_revocations(certs, tmp_path, **kwargs) -> NodeRevocations:
    """The revocations of an agent whose state folder is ``tmp_path/state``."""
    (tmp_path / "state").mkdir(exist_ok=True)
    kwargs.setdefault("now", lambda: NOW)
    return NodeRevocations(tmp_path / "state", authority(certs), **kwargs)


# -- judging a list (pure) -------------------------------------------------------------


def test_judge_accepts_the_cluster_cas_list(certs, tmp_path):
    """A list the cluster CA signed is put in force; the same list again changes nothing."""
    pem = revoked_list(certs, tmp_path, 0)
    revocations = judge_crl(pem, authority(certs), NOTHING_REVOKED)
    assert revocations.serials == {node_certificate(certs, 0).serial_number}
    assert judge_crl(pem, authority(certs), revocations) is None


def test_judge_refuses_another_cas_list(certs, tmp_path):
    """A list signed by another cluster's CA is refused, naming why."""
    (tmp_path / "other").mkdir()
    other = make_cluster_certificates(tmp_path / "other", nodes=1)
    pem = revoked_list(other, tmp_path, 0)
    with pytest.raises(CRLRefused, match="not this cluster CA's"):
        judge_crl(pem, authority(certs), NOTHING_REVOKED)


@pytest.mark.parametrize("pem", ["garbage", "-----BEGIN X509 CRL-----\nMIIB\n"
                                            "-----END X509 CRL-----\n"])
def test_judge_refuses_what_is_no_list(certs, pem):
    """Text that is no PEM revocation list is refused."""
    with pytest.raises(CRLRefused, match="not a PEM certificate revocation list"):
        judge_crl(pem, authority(certs), NOTHING_REVOKED)


def test_judge_refuses_a_forged_signature(certs, tmp_path):
    """The CA's list with its signature altered is refused."""
    pem = revoked_list(certs, tmp_path, 0)
    der = bytearray(x509.load_pem_x509_crl(pem.encode()).public_bytes(Encoding.DER))
    der[-3] ^= 0xFF
    forged = ("-----BEGIN X509 CRL-----\n" + base64.encodebytes(bytes(der)).decode()
              + "-----END X509 CRL-----\n")
    with pytest.raises(CRLRefused, match="signature is not the cluster CA's"):
        judge_crl(forged, authority(certs), NOTHING_REVOKED)


def test_judge_never_rolls_a_list_back(certs, tmp_path):
    """A list signed before the one in force is refused; a later one replaces it."""
    older = revoked_list(certs, tmp_path, 0)
    newer = revoked_list(certs, tmp_path, 1, NOW + timedelta(hours=1))
    in_force = judge_crl(newer, authority(certs), NOTHING_REVOKED)
    with pytest.raises(CRLRefused, match="never rolled back"):
        judge_crl(older, authority(certs), in_force)
    assert judge_crl(newer, authority(certs),
                     judge_crl(older, authority(certs), NOTHING_REVOKED)) == in_force


# -- applying and storing it -----------------------------------------------------------


def test_received_list_applies_and_is_stored(certs, tmp_path):
    """A list sent is in force at once and stored in the state folder."""
    node = node_revocations(certs, tmp_path)
    pem = revoked_list(certs, tmp_path, 0)
    with capturedLogs() as events:
        node.received(pem)
    assert node.revocations.is_revoked(node_certificate(certs, 0))
    assert not node.revocations.is_revoked(node_certificate(certs, 1))
    assert (tmp_path / "state" / CRL_FILE).read_text() == pem
    [received] = events_of(events, "pyflock:agent:crl-received")
    [stored] = events_of(events, "pyflock:agent:crl-stored")
    assert received["revoked"] == stored["revoked"] == 1


def test_restarted_agent_refuses_with_the_stored_list(certs, tmp_path):
    """An agent started again reads the stored list: its TLS check refuses the revoked
    node at once, before it hears from the control service."""
    node_revocations(certs, tmp_path).received(revoked_list(certs, tmp_path, 0))
    restarted = node_revocations(certs, tmp_path)
    with capturedLogs() as events:
        restarted.load()
    assert events_of(events, "pyflock:agent:crl-loaded")[0]["revoked"] == 1
    tls = ClusterTLS.load(certs.node_directory(certs.node_uuids[1]), "node",
                          is_revoked=restarted.revocations.is_revoked)
    refused = tls.check.admit_certificate(node_certificate(certs, 0), PEER_TRANSFER)
    assert not refused.admitted and "is revoked" in refused.refusal
    assert tls.check.admit_certificate(node_certificate(certs, 1), PEER_TRANSFER).admitted


def test_new_list_replaces_the_old(certs, tmp_path):
    """A later list replaces the one in force and the stored one; subscribers hear it."""
    node = node_revocations(certs, tmp_path)
    heard = []
    node.revocations.subscribe(heard.append)
    node.received(revoked_list(certs, tmp_path, 0))
    newer = revoked_list(certs, tmp_path, 1, NOW + timedelta(hours=1))
    node.received(newer)
    assert all(node.revocations.is_revoked(node_certificate(certs, i)) for i in (0, 1))
    assert (tmp_path / "state" / CRL_FILE).read_text() == newer
    assert [len(r.serials) for r in heard] == [1, 2]


def test_refused_list_changes_nothing(certs, tmp_path):
    """A list another CA signed, or an older one, is logged and changes nothing."""
    node = node_revocations(certs, tmp_path)
    older = revoked_list(certs, tmp_path, 0)
    newer = revoked_list(certs, tmp_path, 1, NOW + timedelta(hours=1))
    node.received(newer)
    (tmp_path / "other").mkdir()
    other = make_cluster_certificates(tmp_path / "other", nodes=1)
    with capturedLogs() as events:
        node.received(revoked_list(other, tmp_path, 0))
        node.received(older)
    refused = events_of(events, "pyflock:agent:crl-refused")
    assert ["not this cluster CA's" in refused[0]["reason"],
            "never rolled back" in refused[1]["reason"]] == [True, True]
    assert len(node.revocations.current.serials) == 2
    assert (tmp_path / "state" / CRL_FILE).read_text() == newer


def test_unusable_stored_list_is_logged(certs, tmp_path):
    """A stored file that is no list (or not the CA's) is logged; nothing is revoked
    until the control service sends one."""
    node = node_revocations(certs, tmp_path)
    (tmp_path / "state" / CRL_FILE).write_text("garbage")
    with capturedLogs() as events:
        node.load()
    [unusable] = events_of(events, "pyflock:agent:crl-unusable")
    assert "not a PEM certificate revocation list" in unusable["reason"]
    assert node.revocations.current == NOTHING_REVOKED
    node.received(revoked_list(certs, tmp_path, 0))
    assert node.revocations.is_revoked(node_certificate(certs, 0))


def test_no_stored_list_revokes_nothing(certs, tmp_path):
    """Without a stored list, loading revokes nothing and logs nothing."""
    node = node_revocations(certs, tmp_path)
    with capturedLogs() as events:
        node.load()
    assert node.revocations.current == NOTHING_REVOKED and not events_of(
        events, "pyflock:agent:crl-loaded")


def test_expired_list_applies_with_a_warning(certs, tmp_path):
    """A list past its next update is applied all the same, with a warning."""
    later = NOW + CRL_LIFETIME + timedelta(days=1)
    node = node_revocations(certs, tmp_path, now=lambda: later)
    with capturedLogs() as events:
        node.received(revoked_list(certs, tmp_path, 0))
    assert events_of(events, "pyflock:agent:crl-expired")
    assert node.revocations.is_revoked(node_certificate(certs, 0))


def test_failed_store_is_logged_and_the_list_kept(certs, tmp_path):
    """A list that cannot be stored is in force all the same; the failure is logged."""
    node = NodeRevocations(tmp_path / "missing", authority(certs), now=lambda: NOW)
    with capturedLogs() as events:
        node.received(revoked_list(certs, tmp_path, 0))
    assert events_of(events, "pyflock:agent:crl-store-failed")
    assert node.revocations.is_revoked(node_certificate(certs, 0))


def test_writes_are_serial_and_the_newest_is_stored_last(certs, tmp_path):
    """Lists sent while a write runs wait for it; only the newest of them is written."""
    calls = []

    def run_later(f, *args):
        d = Deferred()
        calls.append((d, f, args))
        return d
    node = node_revocations(certs, tmp_path, run_in_thread=run_later)
    lists = [revoked_list(certs, tmp_path, 0),
             revoked_list(certs, tmp_path, 1, NOW + timedelta(hours=1)),
             revoked_list(certs, tmp_path, 1, NOW + timedelta(hours=2))]
    for pem in lists:
        node.received(pem)
    assert len(calls) == 1
    d, f, args = calls.pop()
    d.callback(f(*args))
    assert len(calls) == 1  # the second list is skipped: the third is in force
    d, f, args = calls.pop()
    assert args[1] == lists[2]
    d.callback(f(*args))
    assert (tmp_path / "state" / CRL_FILE).read_text() == lists[2]


# -- over the agent channel (in memory) ------------------------------------------------


class ChannelCRLTests(ChannelHarness):
    """The lists the control service publishes reach the agent's ``on_crl``."""

    def test_list_follows_the_snapshot(self):
        """A list published before the agent connects comes after its welcome and
        snapshot, to ``on_crl``."""
        self.server.publish_crl("PEM-1")
        heard = []
        channel = self.channel(on_crl=heard.append)
        self.assertEqual([type(m) for m in channel.loopback.received],
                         [Welcome, Snapshot, CRLUpdate])
        self.assertEqual(heard, ["PEM-1"])

    def test_new_list_reaches_a_connected_agent(self):
        """A list published while the agent is connected reaches it at once."""
        heard = []
        self.channel(on_crl=heard.append)
        self.server.publish_crl("PEM-2")
        self.flush()
        self.assertEqual(heard, ["PEM-2"])

    def test_failing_callback_is_logged_and_the_connection_kept(self):
        """``on_crl`` raising is logged; the channel stays connected."""
        def fails(pem):
            raise RuntimeError("boom")
        channel = self.channel(on_crl=fails)
        self.server.publish_crl("PEM-3")
        self.flush()
        self.assertEqual(len(self.events.of("pyflock:agent:crl-callback-failed")), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(channel.connected)

    def test_real_list_from_the_channel_is_applied(self):
        """Through the channel and ``NodeRevocations``, a list the CA signed revokes."""
        tmp_path = Path(tempfile.mkdtemp(prefix="pyflock-revocations-"))
        self.addCleanup(shutil.rmtree, tmp_path)
        (tmp_path / "certs").mkdir(parents=True)
        certs = make_cluster_certificates(tmp_path / "certs", nodes=2)
        node = node_revocations(certs, tmp_path)
        self.channel(on_crl=node.received)
        self.server.publish_crl(revoked_list(certs, tmp_path, 0))
        self.flush()
        self.assertTrue(node.revocations.is_revoked(node_certificate(certs, 0)))
        self.assertTrue((tmp_path / "state" / CRL_FILE).exists())
