"""
Applying ``cluster.crl`` in a running service: the watcher, the handshake check and the
closing of open connections (issue 8, point 5), with a fake clock and fake transports.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.internet.interfaces import IProtocolNegotiationFactory

from pyflock.common._ca import CertificateFileError, load_certificate
from pyflock.common._crl import CRL_FILE, CRL_LIFETIME, NOTHING_REVOKED, read_crl, revoke
from pyflock.common._logging import events_of
from pyflock.common._revocation import CRLWatcher, OpenConnections, Revocations
from pyflock.common._tls import AGENT_CHANNEL, REST_API, PeerCheck
from tests.harness.certificates import make_cluster_certificates


@pytest.fixture
def certs(tmp_path):
    """A test cluster: two nodes, users alice and bob."""
    return make_cluster_certificates(tmp_path, nodes=2, users=("alice", "bob"))


def _watcher(certs, clock, now=lambda: datetime.now(timezone.utc)):
    """A watcher of the cluster's ``cluster.crl`` on ``clock`` and its revocations."""
    revocations = Revocations()
    watcher = CRLWatcher(clock, certs.path / CRL_FILE,
                         load_certificate(certs.path / "cluster.crt"), revocations,
                         now=now)
    return watcher, revocations


def _serial(certs, name):
    """The serial of ``name``.crt in the cluster's folder."""
    return load_certificate(certs.path / f"{name}.crt").serial_number


def test_watcher_follows_the_file(certs):
    """No file: nothing revoked; a new list is applied at the next look; a bad one is
    logged and leaves the list in force; a removed file revokes nothing."""
    clock = Clock()
    watcher, revocations = _watcher(certs, clock)
    heard = []
    revocations.subscribe(heard.append)
    watcher.start()
    assert revocations.current == NOTHING_REVOKED
    revoke(certs.path, certs.path, user="bob")
    clock.advance(1)
    assert revocations.current.serials == {_serial(certs, "bob")}
    assert len(heard) == 2
    (certs.path / CRL_FILE).write_bytes(b"garbage")
    with capturedLogs() as events:
        clock.advance(1)
    [unusable] = events_of(events, "pyflock:crl:unusable")
    assert "not a PEM certificate revocation list" in unusable["reason"]
    assert revocations.current.serials == {_serial(certs, "bob")}
    clock.advance(1)
    assert len(heard) == 2  # an unchanged bad file is not read again
    (certs.path / CRL_FILE).unlink()
    clock.advance(1)
    assert revocations.current == NOTHING_REVOKED
    watcher.stop()
    assert not clock.getDelayedCalls()


def test_expired_list_applies_with_a_warning(certs):
    """A list past its next update is applied and a warning logged."""
    revoke(certs.path, certs.path, user="bob")
    later = datetime.now(timezone.utc) + CRL_LIFETIME + timedelta(days=1)
    watcher, revocations = _watcher(certs, Clock(), now=lambda: later)
    with capturedLogs() as events:
        watcher.start()
    assert revocations.current.serials == {_serial(certs, "bob")}
    [warning] = events_of(events, "pyflock:crl:expired")
    assert "pyflock-ca crl" in warning["reason"]
    watcher.stop()


def test_list_running_out_is_warned_once(certs):
    """A list in force that passes its next update is warned about once, still applied."""
    revoke(certs.path, certs.path, user="bob")
    now = [datetime.now(timezone.utc)]
    clock = Clock()
    watcher, revocations = _watcher(certs, clock, now=lambda: now[0])
    watcher.start()
    with capturedLogs() as events:
        clock.advance(1)
        now[0] += CRL_LIFETIME + timedelta(seconds=1)
        for _ in range(3):
            clock.advance(1)
    assert len(events_of(events, "pyflock:crl:expired")) == 1
    assert revocations.current.serials == {_serial(certs, "bob")}
    watcher.stop()


def test_bad_list_at_start_is_an_error(certs):
    """A list that is not the CA's stops the start, naming the file."""
    (certs.path / CRL_FILE).write_bytes(b"garbage")
    watcher, _ = _watcher(certs, Clock())
    with pytest.raises(CertificateFileError, match=CRL_FILE):
        watcher.start()


class _Reactor:
    """Records what is called from a thread (a signal handler)."""

    def __init__(self):
        self.called = []

    def callFromThread(self, f, *args):
        self.called.append(f)


def test_sighup_reloads(certs):
    """SIGHUP asks the reactor to reload; ``stop`` gives the signal back."""
    watcher, _ = _watcher(certs, Clock())
    reactor = _Reactor()
    before = signal.getsignal(signal.SIGHUP)
    watcher.watch_sighup(reactor)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        watcher.stop()
    assert reactor.called == [watcher.reload]
    assert signal.getsignal(signal.SIGHUP) == before


class _Transport:
    """A TLS transport as far as the connection sweep needs one."""

    def __init__(self, certificate):
        self.certificate = certificate
        self.aborted = False

    def getPeerCertificate(self):
        return self.certificate

    def getPeer(self):
        return "127.0.0.1:1"

    def abortConnection(self):
        self.aborted = True


def test_open_connections_of_revoked_peers_are_aborted(certs):
    """A new list aborts the connections whose certificate it names, and only those."""
    revocations = Revocations()
    check = PeerCheck(certs.cluster_uuid, revocations.is_revoked)
    connections = OpenConnections(check, revocations)
    factory = connections.track(Factory.forProtocol(Protocol), REST_API)
    channel = connections.track(Factory.forProtocol(Protocol), AGENT_CHANNEL)
    made = {}
    for name, tracked in (("alice", factory), ("bob", factory),
                          (certs.node_uuids[0], channel), ("handshaking", factory)):
        protocol = tracked.buildProtocol(None)
        certificate = (None if name == "handshaking"
                       else load_certificate(certs.path / f"{name}.crt"))
        protocol.makeConnection(_Transport(certificate))
        made[name] = protocol
    revoke(certs.path, certs.path, user="bob")
    revoke(certs.path, certs.path, node=certs.node_uuids[0])
    with capturedLogs() as events:
        revocations.replace(read_crl(certs.path / CRL_FILE,
                                     load_certificate(certs.path / "cluster.crt")))
    aborted = {name for name, p in made.items() if p.transport.aborted}
    assert aborted == {"bob", certs.node_uuids[0]}
    assert sorted(e["listener"] for e in events_of(
        events, "pyflock:crl:connection-closed")) == ["REST API", "agent channel"]


def test_tracking_keeps_the_factory_what_it_was():
    """A tracked Site still offers ALPN and logs under its own name."""
    site = Site(Resource())
    revocations = Revocations()
    tracked = OpenConnections(PeerCheck("00000000-0000-0000-0000-000000000000"),
                              revocations).track(site, REST_API)
    assert IProtocolNegotiationFactory.providedBy(tracked)
    assert tracked.acceptableProtocols() == site.acceptableProtocols()
    assert tracked.logPrefix() == site.logPrefix()


def test_handshake_refuses_revoked_client_certificates(certs):
    """The server's verify callback refuses a revoked leaf and passes OpenSSL's verdict on."""
    alice = load_certificate(certs.path / "alice.crt")
    check = PeerCheck(certs.cluster_uuid,
                      lambda c: c.serial_number == alice.serial_number)
    bob = load_certificate(certs.path / "bob.crt")
    assert check.verify_client(None, bob, 0, 0, True) is True
    with capturedLogs() as events:
        assert check.verify_client(None, alice, 0, 0, True) is False
    [refused] = events_of(events, "pyflock:tls:revoked-refused")
    assert "user-alice" in refused["reason"]
    assert check.verify_client(None, bob, 20, 0, False) is False
    assert check.verify_client(None, alice, 0, 1, True) is True
