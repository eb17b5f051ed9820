"""
The guards of every TLS listener (issue 8), in memory: the AEAD-only cipher list, the
connection cap, the handshake deadline, and the periodic re-check of peer certificates;
and its large writes handed to TCP in one piece (issue 12), which a real loopback
connection sends in one system call.
"""

import socket
import ssl
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from pyflock.common._ca import CERTIFICATE_LIFETIME, create_node_certificate, load_certificate
from pyflock.common._connections import SEND_PER_CALL, ConnectionLimits, guarded_tls_factory
from pyflock.common._tls import ClusterTLS, Identity, PeerCheck, tls_options
from tests.harness.certificates import make_cluster_certificates

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


@pytest.fixture
def certificates(tmp_path):
    """A test cluster's certificates."""
    return make_cluster_certificates(tmp_path, nodes=1)


def test_cipher_list_is_aead_only():
    """The TLS 1.2 suites pyflock offers are ECDHE with AES-GCM or ChaCha20-Poly1305 only."""
    connection = SSL.Connection(tls_options().getContext(), None)
    names = connection.get_cipher_list()
    tls12 = [n for n in names if not n.startswith("TLS_")]
    assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n)
                         for n in tls12), names
    assert "ECDHE-ECDSA-AES128-SHA" not in names


def test_still_acceptable(certificates, tmp_path):
    """A certificate is acceptable until it expires; a revoked one never is."""
    issued = datetime.now(timezone.utc)
    node = create_node_certificate(certificates.path, tmp_path, now=issued)
    certificate = load_certificate(tmp_path / f"{node}.crt")
    check = PeerCheck(certificates.cluster_uuid)
    end = (issued + CERTIFICATE_LIFETIME).timestamp()
    assert check.still_acceptable(certificate, issued.timestamp()) is None
    reason = check.still_acceptable(certificate, end + 1)
    assert f"node-{node}" in reason and "expired" in reason
    assert "not valid yet" in check.still_acceptable(
        certificate, (issued - timedelta(days=1)).timestamp())
    revoked = PeerCheck(certificates.cluster_uuid, is_revoked=lambda c: True)
    assert "revoked" in revoked.still_acceptable(certificate, issued.timestamp())


def guarded(certificates, clock, limits, judge=None):
    """A guarded TLS factory of the control service's server options, on ``clock``."""
    options = ClusterTLS.load(certificates.path, "control-service").server_options()
    return guarded_tls_factory(options, Factory.forProtocol(Protocol), clock, limits, judge)


def connect(factory):
    """A new connection to ``factory`` over a string transport; (protocol, transport)."""
    protocol = factory.buildProtocol(ADDRESS)
    if protocol is None:
        return None, None
    transport = StringTransport(peerAddress=ADDRESS)
    protocol.makeConnection(transport)
    return protocol, transport


def test_handshake_deadline(certificates):
    """A client that sends nothing is aborted when the handshake deadline passes."""
    clock = Clock()
    factory = guarded(certificates, clock, ConnectionLimits(handshake_timeout=10))
    factory.doStart()
    _, transport = connect(factory)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    factory.doStop()


def test_connection_cap(certificates):
    """At the cap, new connections are refused until one closes."""
    clock = Clock()
    factory = guarded(certificates, clock, ConnectionLimits(max_connections=2))
    factory.doStart()
    first, _ = connect(factory)
    connect(factory)
    assert connect(factory) == (None, None)
    first.connectionLost(None)
    assert connect(factory)[0] is not None
    factory.doStop()


class _Connection:
    """A connection whose handshake is done, as the re-check sees it."""

    handshake_done = True
    aborted = False
    transport = StringTransport(peerAddress=ADDRESS)

    def getPeerCertificate(self):
        """The peer's certificate (a stand-in)."""
        return "certificate"

    def abortConnection(self):
        """Record the abort."""
        self.aborted = True


def test_recheck_closes_refused_peers(certificates):
    """Every ``recheck`` seconds while listening, the judge is asked about each connection
    whose handshake is done, and those it refuses are aborted; not after the listener
    stopped."""
    clock = Clock()
    asked = []

    def judge(certificate, now):
        asked.append((certificate, now))
        return "expired" if now >= 10 else None
    factory = guarded(certificates, clock, ConnectionLimits(recheck=5), judge=judge)
    factory.doStart()
    connect(factory)  # handshake not done: never judged
    connection = _Connection()
    factory.wrappedFactory.protocols[connection] = 1
    clock.advance(5)
    assert (asked, connection.aborted) == ([("certificate", 5.0)], False)
    clock.advance(5)
    assert (asked[-1], connection.aborted) == (("certificate", 10.0), True)
    factory.doStop()
    clock.advance(20)
    assert len(asked) == 2


class _Received(Protocol):
    """Keeps what arrives."""

    def connectionMade(self):
        """Start with nothing."""
        self.received = []

    def dataReceived(self, data):
        """Keep ``data``."""
        self.received.append(data)


def tls_pair(certificates):
    """A guarded server and an alice client connected over TLS in memory, handshake done;
    (server's application protocol, client's, ``flush()`` moving every byte written so
    far, sizes of the server's TCP writes)."""
    clock = Clock()
    server_factory = guarded(certificates, clock, ConnectionLimits())
    server_factory.wrappedFactory.wrappedFactory = Factory.forProtocol(_Received)
    creator = ClusterTLS.load(certificates.path, "alice").client_options(
        Identity.control(), "127.0.0.1")
    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(_Received))
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(ADDRESS),
        lambda: client_factory.buildProtocol(ADDRESS))
    sizes = []
    write = server.transport.write
    server.transport.write = lambda data: (sizes.append(len(data)), write(data))
    pump.flush()

    def flush():
        clock.advance(0)
        pump.flush()
    return server.wrappedProtocol.wrappedProtocol, client.wrappedProtocol, flush, sizes


def test_large_write_in_one_piece(certificates):
    """A large write reaches the peer intact, handed to TCP as one piece of records rather
    than one per 16 KiB record; small writes, before and after, arrive in order."""
    server, client, flush, sizes = tls_pair(certificates)
    large = bytes(range(256)) * 1000
    server.transport.write(b"first")
    server.transport.write(large)
    server.transport.write(b"last")
    flush()
    assert b"".join(client.received) == b"first" + large + b"last"
    assert len(sizes) == 2 and len(large) < sizes[0] < len(large) + 1024


class _Failing:
    """A TLS connection whose ``send`` encrypts at most ``piece`` bytes at a time, and
    fails with ``error`` once ``calls`` sends passed."""

    def __init__(self, connection, calls, error, piece=2 ** 14):
        self._connection = connection
        self._calls = calls
        self._error = error
        self._piece = piece
        self.sends = []

    def send(self, data):
        """Encrypt up to a piece, or fail."""
        self._calls -= 1
        if self._calls < 0:
            raise self._error
        self.sends.append(len(data))
        return self._connection.send(data[:self._piece])

    def __getattr__(self, name):
        return getattr(self._connection, name)


def test_send_failing_midway_left_to_twisted(certificates):
    """When encrypting a large write stops midway (here: wanting to read), the records
    made go out first and Twisted's own write takes the rest: the peer gets it all, in
    order."""
    server, client, flush, sizes = tls_pair(certificates)
    tls = server.transport
    handle = tls.getHandle()
    tls.getHandle = lambda: _Failing(handle, 2, SSL.WantReadError())
    large = bytes(range(256)) * 1000
    server.transport.write(large)
    flush()
    assert b"".join(client.received) == large
    assert sizes[0] > 2 * 2 ** 14 and len(sizes) > 2


def test_large_write_encrypted_in_one_call(certificates):
    """pyflock's TLS contexts do not stop a write after each record: one ``send``
    encrypts a whole large write into the memory BIO (pyOpenSSL's default would take a
    call per 16 KiB record)."""
    server, client, flush, sizes = tls_pair(certificates)
    tls = server.transport
    counting = _Failing(tls.getHandle(), 100, SSL.WantReadError(), piece=None)
    tls.getHandle = lambda: counting
    large = bytes(range(256)) * 1000
    server.transport.write(large)
    flush()
    assert b"".join(client.received) == large
    assert counting.sends == [len(large)]


def test_write_after_loss_dropped(certificates):
    """A large write after the TLS connection is lost is dropped, as Twisted's is."""
    server, client, flush, sizes = tls_pair(certificates)
    server.transport._lostTLSConnection = True
    server.transport.write(b"x" * 100_000)
    flush()
    assert (client.received, sizes) == ([], [])


class _Recording:
    """A socket that records the size of each ``send`` it is given."""

    def __init__(self, wrapped):
        self._wrapped = wrapped
        self.sends = []

    def send(self, data):
        """Record, then send."""
        self.sends.append(len(data))
        return self._wrapped.send(data)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


class _Writes(Protocol):
    """Records its TCP socket's sends, writes its factory's ``pieces`` once TLS is up,
    then closes."""

    def connectionMade(self):
        """Record the sends of the TCP connection under TLS and its connection cap."""
        tcp = self.transport.transport.transport
        self.factory.socket = tcp.socket = _Recording(tcp.socket)

    def dataReceived(self, data):
        """The client spoke, so the handshake is done: answer, then close."""
        for piece in self.factory.pieces:
            self.transport.write(piece)
        self.transport.loseConnection()


def _read_all(port, certificates):
    """Connect to ``port`` as alice with Python's ``ssl``, say hello, read until closed."""
    context = ssl.create_default_context(cafile=str(certificates.path / "cluster.crt"))
    context.load_cert_chain(str(certificates.path / "alice.crt"),
                            str(certificates.path / "alice.key"))
    received = bytearray()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                             server_hostname="127.0.0.1") as connection:
        connection.sendall(b"hello")
        while chunk := connection.recv(1 << 20):
            received += chunk
    return bytes(received)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_large_pieces_sent_in_one_call(certificates):
    """On a real loopback connection, each 256 KiB piece a list writes goes to the kernel
    in one ``send`` (Twisted's own limit, 128 KiB, makes two, a reactor trip apart)."""
    from twisted.internet import reactor
    pieces = [bytes([n]) * (256 * 1024) for n in range(4)]
    application = Factory.forProtocol(_Writes)
    application.pieces = pieces
    options = ClusterTLS.load(certificates.path, "control-service").server_options()
    port = reactor.listenTCP(0, guarded_tls_factory(options, application, reactor),
                             interface="127.0.0.1")
    try:
        received = await deferToThread(_read_all, port.getHost().port, certificates)
    finally:
        await port.stopListening()
    assert received == b"".join(pieces)
    assert max(application.socket.sends) > 256 * 1024
    assert max(application.socket.sends) <= SEND_PER_CALL
