"""
Tests for ``pyflock.common._tls``: identities, endpoints, and mutual TLS over real sockets.
"""

import json
import shutil

import pytest
import pytest_twisted
import treq
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    CertificateOptions, TLSVersion, optionsForClientTLS, trustRootFromCertificates,
)
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pyflock.common._ca import (
    CertificateFileError, create_control_certificate, load_certificate, load_private_key,
)
from pyflock.common._tls import (
    AGENT_CHANNEL, LISTEN_BACKLOG, PEER_TRANSFER, REST_API, Admission, ClusterTLS, Identity, PeerCheck, Role,
    _load_twisted_certificate, client_tls_options, client_tls_policy,
    identity_of_certificate, peer_identity, read_cluster_uuid,
    server_tls_options, tcp_server_endpoint, tls_client_endpoint, tls_server_endpoint,
    treq_client,
)
from tests.harness.certificates import (
    issue_certificate, make_cluster_certificates, unchecked_client_policy,
)

NODE = "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f"

# Identity


@pytest.mark.parametrize("common_name, identity", [
    ("user-alice", Identity("user", "alice")),
    ("user-a.b_c-d", Identity("user", "a.b_c-d")),
    (f"node-{NODE}", Identity("node", NODE)),
    (f"node-{NODE.upper()}", Identity("node", NODE)),
    ("control-service", Identity("control", "service")),
    ("user-", None),
    ("user-../x", None),
    ("user-a b", None),
    ("node-", None),
    ("node-abc", None),
    (f"node-{NODE.replace('-', '')}", None),
    (f"node-{{{NODE}}}", None),
    (f"node-{NODE}x", None),
    ("control-other", None),
    ("control", None),
    ("plugin", None),
    ("alice", None),
    ("", None),
    ("admin-root", None),
])
def test_identity_from_common_name(common_name, identity):
    """Only user-<name>, node-<uuid> and control-service denote identities."""
    assert Identity.from_common_name(common_name) == identity


def test_identity_properties():
    """``node_uuid`` is the uuid of a node and None otherwise; ``common_name`` inverts."""
    node = Identity.node(NODE.upper())
    assert node == Identity("node", NODE)
    assert node.node_uuid == NODE
    assert node.common_name == f"node-{NODE}"
    assert Identity.user("alice").node_uuid is None
    assert Identity.user("alice").common_name == "user-alice"
    assert Identity.control().node_uuid is None
    assert Identity.from_common_name(Identity.control().common_name) == Identity.control()


@pytest.mark.parametrize("kind, name", [
    ("admin", "x"), ("user", "../x"), ("node", "abc"), ("node", NODE.upper()),
    ("control", "other"),
])
def test_identity_refuses_malformed_values(kind, name):
    """An Identity cannot be made with an unknown kind or a malformed name."""
    with pytest.raises(ValueError):
        Identity(kind, name)


def test_identity_is_a_frozen_value():
    """Identities compare and hash by value and cannot be changed."""
    assert {Identity.user("a"), Identity.user("a")} == {Identity.user("a")}
    with pytest.raises(AttributeError):
        Identity.user("a").name = "b"


# endpoints


@pytest.mark.parametrize("port, expected_port, interface", [
    (4523, 4523, ""),
    ("4523", 4523, ""),
    (0, 0, ""),
    ("tcp:4524", 4524, ""),
    ("tcp:4525:interface=127.0.0.1", 4525, "127.0.0.1"),
    ("tcp:port=4525:interface=127.0.0.2", 4525, "127.0.0.2"),
])
def test_server_endpoint_ports(port, expected_port, interface):
    """A number or a tcp: endpoint listens there, every connection wrapped in server TLS."""
    reactor = MemoryReactor()
    options = CertificateOptions()
    factory = Factory.forProtocol(Protocol)
    endpoint = tls_server_endpoint(reactor, port, options)
    assert verifyObject(IStreamServerEndpoint, endpoint)
    endpoint.listen(factory)
    [(number, listening, _, listening_interface)] = reactor.tcpServers
    assert (number, listening_interface) == (expected_port, interface)
    # The connection cap (a ThrottlingFactory) wraps the TLS factory.
    tls = listening.wrappedFactory
    assert isinstance(tls, TLSMemoryBIOFactory)
    assert tls.wrappedFactory is factory


def test_tcp_endpoint_is_plain():
    """``tcp_server_endpoint`` gives the bare TCP endpoint that TLS wraps."""
    assert isinstance(tcp_server_endpoint(MemoryReactor(), "4523"), TCP4ServerEndpoint)


@pytest.mark.parametrize("port, backlog", [
    (4523, LISTEN_BACKLOG), ("4523", LISTEN_BACKLOG),
    ("tcp:4523:interface=127.0.0.1", LISTEN_BACKLOG),
    ("tcp:4523:backlog=7:interface=127.0.0.1", 7),
])
def test_tcp_endpoint_queues_a_thousand_connections(port, backlog):
    """Issue 12: a listener queues ``LISTEN_BACKLOG`` connections (a thousand agents
    connecting at once), not Twisted's 50, unless the endpoint string says otherwise."""
    reactor = MemoryReactor()
    tcp_server_endpoint(reactor, port).listen(Factory())
    assert reactor.tcpServers[0][2] == backlog


@pytest.mark.parametrize("port, message", [
    ("ssl:4523", "TLS is always on"),
    ("unix:/run/x.sock", "give a port number"),
    ("garbage", "give a port number"),
    ("", "give a port number"),
    ("-1", "give a port number"),
    (-1, "0 to 65535"),
    (70000, "0 to 65535"),
    ("70000", "0 to 65535"),
    ("tcp:99999", "0 to 65535"),
    ("tcp:abc", "invalid port 'tcp:abc'"),
    ("tcp:4523:bogus=1", "invalid port"),
    (True, "give a number"),
    (None, "give a number"),
    (4523.0, "give a number"),
])
def test_server_endpoint_refuses_other_ports(port, message):
    """Anything but a port number or a tcp: endpoint is a ValueError saying what to give."""
    with pytest.raises(ValueError, match=message):
        tls_server_endpoint(MemoryReactor(), port, object())


# loading files


@pytest.fixture
def certs(tmp_path):
    """A test cluster's certificates: two nodes, users alice and bob."""
    return make_cluster_certificates(tmp_path, nodes=2, users=("alice", "bob"))


@pytest.fixture
def other(tmp_path_factory):
    """Another cluster's certificates, with the same file names."""
    return make_cluster_certificates(tmp_path_factory.mktemp("other"), nodes=1)


@pytest.mark.parametrize("missing", ["cluster.crt", "alice.crt", "alice.key"])
def test_missing_files_are_named(certs, missing):
    """A missing certificate, key or CA file is reported by path."""
    (certs.path / missing).unlink()
    what = "key" if missing.endswith(".key") else "certificate"
    for load in (server_tls_options, client_tls_policy):
        with pytest.raises(CertificateFileError) as error:
            load(certs.path, "alice")
        assert str(error.value) == f"{certs.path / missing}: no such {what} file"


def test_unreadable_and_garbage_files(certs):
    """A folder where a file should be, or a file that is no PEM, is reported by path."""
    (certs.path / "alice.key").unlink()
    (certs.path / "alice.key").mkdir()
    with pytest.raises(CertificateFileError, match="alice.key: cannot read key file"):
        server_tls_options(certs.path, "alice")
    (certs.path / "bob.crt").write_text("not a certificate")
    with pytest.raises(CertificateFileError, match="bob.crt: not a PEM certificate"):
        server_tls_options(certs.path, "bob")


def test_mismatched_key_and_foreign_certificate(certs, other):
    """A key of another certificate, or a certificate of another CA, is refused."""
    shutil.copyfile(certs.path / "bob.key", certs.path / "alice.key")
    with pytest.raises(CertificateFileError, match="does not belong to"):
        server_tls_options(certs.path, "alice")
    shutil.copyfile(other.path / "alice.crt", certs.path / "bob.crt")
    shutil.copyfile(other.path / "alice.key", certs.path / "bob.key")
    with pytest.raises(CertificateFileError, match="bob.crt: not issued by"):
        client_tls_options(certs.path, "bob", "127.0.0.1")


def test_client_options_need_hostname_or_identity(certs):
    """Client options take exactly one of a host name and an expected identity."""
    with pytest.raises(ValueError):
        client_tls_options(certs.path, "alice")
    with pytest.raises(ValueError):
        client_tls_options(certs.path, "alice", "127.0.0.1",
                           expected_identity=Identity.control())


def test_policy_provides_the_interface(certs):
    """``client_tls_policy`` is an IPolicyForHTTPS; read_cluster_uuid reads our OU."""
    assert verifyObject(IPolicyForHTTPS, client_tls_policy(certs.path, "alice"))
    assert read_cluster_uuid(certs.path) == certs.cluster_uuid


def test_identity_of_certificate(certs):
    """A certificate's identity needs our cluster's OU; a plain transport has none."""
    certificate = load_certificate(certs.path / "alice.crt")
    assert identity_of_certificate(certificate, certs.cluster_uuid) == Identity.user("alice")
    other_cluster = "00000000-0000-4000-8000-000000000000"
    assert identity_of_certificate(certificate, other_cluster) is None
    control = load_certificate(certs.path / "control-service.crt")
    assert identity_of_certificate(control, certs.cluster_uuid) == Identity.control()
    assert peer_identity(StringTransport(), certs.cluster_uuid) is None


# mutual TLS over real sockets


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


class WhoAmI(Resource):
    """Answers each request with the identity peer_identity finds for it."""

    isLeaf = True

    def __init__(self, cluster_uuid):
        super().__init__()
        self.cluster_uuid = cluster_uuid
        self.seen = []

    def render_GET(self, request):
        """Record and return the client's identity."""
        identity = peer_identity(request.transport, self.cluster_uuid)
        self.seen.append(identity)
        assert peer_identity(request.channel.transport, self.cluster_uuid) == identity
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(None if identity is None else
                          {"kind": identity.kind, "name": identity.name}).encode()


async def listen(reactor, options, factory):
    """Listen with TLS ``options`` on a free port of 127.0.0.1."""
    return await tls_server_endpoint(reactor, "tcp:0:interface=127.0.0.1",
                                     options).listen(factory)


async def stop(port):
    """Close the server's remaining connections and stop listening."""
    for protocol in list(port.factory.protocols):
        protocol.abortConnection()
    await port.stopListening()


async def get(reactor, port, policy, host="127.0.0.1"):
    """GET / on ``port`` with HTTPS ``policy``; the decoded JSON body."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        response = await client.get(
            f"https://{host}:{port.getHost().port}/".encode(), timeout=30)
        assert response.code == 200
        return await response.json()
    finally:
        await pool.closeCachedConnections()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_user_certificate_is_seen_as_user(reactor, certs):
    """A client presenting alice's certificate is seen as Identity(user, alice)."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        pool = HTTPConnectionPool(reactor, persistent=True)
        client = treq_client(reactor, certs.path, "alice", pool=pool)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        try:
            for _ in range(2):
                response = await client.get(url, timeout=30)
                assert await response.json() == {"kind": "user", "name": "alice"}
        finally:
            await pool.closeCachedConnections()
    finally:
        await stop(port)
    assert resource.seen == [Identity.user("alice")] * 2


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_node_certificate_is_seen_as_node(reactor, certs):
    """A client presenting a node's certificate (node.crt) is seen as that node."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    node_uuid = certs.node_uuids[1]
    try:
        body = await get(reactor, port,
                         client_tls_policy(certs.node_directory(node_uuid), "node"))
    finally:
        await stop(port)
    assert body == {"kind": "node", "name": node_uuid}
    assert resource.seen[0].node_uuid == node_uuid


@implementer(IPolicyForHTTPS)
class TLS12Policy:
    """Presents alice's certificate, speaking TLS 1.2 at most."""

    def __init__(self, folder):
        self.folder = folder

    def creatorForNetloc(self, hostname, port):
        """Client options limited to TLS 1.2."""
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=trustRootFromCertificates(
                [_load_twisted_certificate(self.folder / "cluster.crt")]),
            extraCertificateOptions={
                "certificate": load_certificate(self.folder / "alice.crt"),
                "privateKey": load_private_key(self.folder / "alice.key"),
                "lowerMaximumSecurityTo": TLSVersion.TLSv1_2})


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_tls_1_2_client(reactor, certs):
    """A client limited to TLS 1.2 still authenticates with its certificate."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        body = await get(reactor, port, TLS12Policy(certs.path))
    finally:
        await stop(port)
    assert body == {"kind": "user", "name": "alice"}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_odd_certificate_of_our_ca_is_nobody(reactor, certs):
    """A certificate of our CA whose common name is no identity is let in as nobody."""
    issue_certificate(certs.path, certs.path, "plugin", "user-plugin!")
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        body = await get(reactor, port, client_tls_policy(certs.path, "plugin"))
    finally:
        await stop(port)
    assert body is None
    assert resource.seen == [None]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_other_cluster_uuid_is_nobody(reactor, certs):
    """peer_identity gives None when the certificate's OU is not our cluster's."""
    resource = WhoAmI("00000000-0000-4000-8000-000000000000")
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        body = await get(reactor, port, client_tls_policy(certs.path, "alice"))
    finally:
        await stop(port)
    assert body is None


async def refused(reactor, port, policy, reason):
    """Assert that GET / on ``port`` with ``policy`` fails in TLS, saying ``reason``."""
    with pytest.raises((ResponseNeverReceived, ResponseFailed)) as error:
        await get(reactor, port, policy)
    assert reason in repr([failure.value for failure in error.value.reasons])


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_without_certificate_is_refused(reactor, certs):
    """A client that presents no certificate never reaches the application."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        await refused(reactor, port, unchecked_client_policy(certs.path / "cluster.crt"),
                      "certificate required")
    finally:
        await stop(port)
    assert resource.seen == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_of_another_cluster_is_refused(reactor, certs, other):
    """A client presenting another cluster's certificate never reaches the application."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        await refused(reactor, port, unchecked_client_policy(
            certs.path / "cluster.crt", other.path / "alice.crt", other.path / "alice.key"),
            "unknown ca")
    finally:
        await stop(port)
    assert resource.seen == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_server_only_certificate_cannot_be_a_client(reactor, certs):
    """The control certificate (serverAuth only) is refused as a client certificate."""
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Site(resource))
    try:
        await refused(reactor, port, client_tls_policy(certs.path, "control-service"),
                      "unsupported certificate")
    finally:
        await stop(port)
    assert resource.seen == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_refuses_server_with_another_hostname(reactor, certs, tmp_path_factory):
    """The client refuses a server of our CA whose certificate names another host."""
    folder = tmp_path_factory.mktemp("wrong-host")
    shutil.copyfile(certs.path / "cluster.crt", folder / "cluster.crt")
    create_control_certificate(certs.path, folder, "control.example")
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(folder, "control-control.example"),
                        Site(resource))
    try:
        await refused(reactor, port, client_tls_policy(certs.path, "alice"),
                      "IPAddressMismatch")
    finally:
        await stop(port)
    assert resource.seen == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_checks_dns_names(reactor, certs, tmp_path_factory):
    """A server whose certificate carries the DNS name the client used is accepted."""
    folder = tmp_path_factory.mktemp("localhost")
    shutil.copyfile(certs.path / "cluster.crt", folder / "cluster.crt")
    create_control_certificate(certs.path, folder, "localhost")
    resource = WhoAmI(certs.cluster_uuid)
    port = await listen(reactor, server_tls_options(folder, "control-localhost"),
                        Site(resource))
    try:
        body = await get(reactor, port, client_tls_policy(certs.path, "bob"),
                         host="localhost")
    finally:
        await stop(port)
    assert body == {"kind": "user", "name": "bob"}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_refuses_server_of_another_ca(reactor, certs, other):
    """The client refuses a server whose certificate another CA issued for its address."""
    resource = WhoAmI(other.cluster_uuid)
    port = await listen(reactor, server_tls_options(other.path, "control-service"),
                        Site(resource))
    try:
        await refused(reactor, port, client_tls_policy(certs.path, "alice"),
                      "certificate verify failed")
    finally:
        await stop(port)
    assert resource.seen == []


# raw protocols, as the agent channel and peer transfer use them


@implementer(IHandshakeListener)
class Greeter(Protocol):
    """Server: once the handshake is done, sends the client's identity and closes."""

    def __init__(self, cluster_uuid):
        self.cluster_uuid = cluster_uuid

    def handshakeCompleted(self):
        """Send the peer's common name (or "nobody")."""
        identity = peer_identity(self.transport, self.cluster_uuid)
        self.transport.write(identity.common_name.encode() if identity else b"nobody")
        self.transport.loseConnection()


class Collector(Protocol):
    """Client: collects what the server sends; ``done`` fires with it or with the error."""

    def __init__(self):
        self.data = b""
        self.done = Deferred()

    def dataReceived(self, data):
        """Keep the bytes."""
        self.data += data

    def connectionLost(self, reason):
        """Fire ``done`` with the bytes, or with the TLS error if none came."""
        if self.data:
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


async def exchange(reactor, port, options):
    """Connect to ``port`` with client TLS ``options``; what the server sent."""
    collector = Collector()
    endpoint = tls_client_endpoint(reactor, "127.0.0.1", port.getHost().port, options)
    await connectProtocol(endpoint, collector)
    return await collector.done


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_peer_nodes_check_each_others_identity(reactor, certs):
    """A node connecting to a peer node by expected identity sees it, and is seen."""
    first, second = certs.node_uuids
    port = await listen(
        reactor, server_tls_options(certs.node_directory(second), "node"),
        Factory.forProtocol(lambda: Greeter(certs.cluster_uuid)))
    try:
        options = client_tls_options(certs.node_directory(first), "node",
                                     expected_identity=Identity.node(second))
        assert await exchange(reactor, port, options) == f"node-{first}".encode()
    finally:
        await stop(port)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_peer_with_another_identity_is_refused(reactor, certs):
    """A node expecting one peer refuses a server that is another node of the cluster."""
    first, second = certs.node_uuids
    port = await listen(
        reactor, server_tls_options(certs.node_directory(second), "node"),
        Factory.forProtocol(lambda: Greeter(certs.cluster_uuid)))
    try:
        options = client_tls_options(certs.node_directory(first), "node",
                                     expected_identity=Identity.node(first))
        with pytest.raises(Exception) as error:
            await exchange(reactor, port, options)
    finally:
        await stop(port)
    assert f"the server is node-{second}, not node-{first}" in str(error.value)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_agent_channel_style_connection(reactor, certs):
    """A node reaching the control service by address sees its identity over raw TLS."""
    node = certs.node_uuids[0]
    port = await listen(reactor, server_tls_options(certs.path, "control-service"),
                        Factory.forProtocol(lambda: Greeter(certs.cluster_uuid)))
    try:
        options = client_tls_options(certs.node_directory(node), "node", "127.0.0.1")
        assert await exchange(reactor, port, options) == f"node-{node}".encode()
    finally:
        await stop(port)


def test_server_options_are_certificate_options(certs):
    """Server options are Twisted CertificateOptions requiring a client certificate."""
    options = server_tls_options(certs.path, "control-service")
    assert isinstance(options, CertificateOptions)
    assert options.verify and options.requireCertificate


# the one TLS context factory: roles, the peer check, listeners and clients

#: A listener that takes users only (no such port yet: it shows a role is data).
USERS_ONLY = Role("user port", ("user",))


@pytest.mark.parametrize("role, identity, admitted", [
    (REST_API, Identity.user("alice"), True),
    (REST_API, Identity.node(NODE), True),
    (REST_API, Identity.control(), False),
    (AGENT_CHANNEL, Identity.node(NODE), True),
    (AGENT_CHANNEL, Identity.user("alice"), False),
    (PEER_TRANSFER, Identity.node(NODE), True),
    (PEER_TRANSFER, Identity.user("alice"), False),
    (USERS_ONLY, Identity.user("alice"), True),
    (USERS_ONLY, Identity.node(NODE), False),
])
def test_role_admits_its_kinds(role, identity, admitted):
    """A role admits exactly the identity kinds it names, keeping the identity."""
    admission = role.admit(identity)
    assert (admission.admitted, admission.identity) == (admitted, identity)


def test_role_refusals_name_role_kinds_and_peer():
    """A refusal names the listener, what it accepts and what was presented."""
    assert USERS_ONLY.admit(Identity.node(NODE)).refusal == (
        f"the user port accepts only user-* certificates; this connection presented "
        f"node-{NODE}")
    assert REST_API.admit(None).refusal == (
        "the REST API accepts only user-* or node-* certificates signed by this "
        "cluster's CA; this certificate names no pyflock identity")


@pytest.mark.parametrize("kinds", [(), ("admin",), ("user", "control-ish")])
def test_role_refuses_unknown_kinds(kinds):
    """A role must accept at least one kind, each an identity kind."""
    with pytest.raises(ValueError):
        Role("port", kinds)


def test_peer_check_judges_certificates(certs, other):
    """The check admits by role, and a certificate of another cluster names no one."""
    check = PeerCheck(certs.cluster_uuid)
    alice = load_certificate(certs.path / "alice.crt")
    assert check.admit_certificate(alice, REST_API) == Admission(Identity.user("alice"))
    assert not check.admit_certificate(alice, AGENT_CHANNEL).admitted
    foreign = load_certificate(other.path / "alice.crt")
    assert check.admit_certificate(foreign, REST_API) == REST_API.admit(None)
    assert check.admit_certificate(None, REST_API) == REST_API.admit(None)
    assert check.admit(StringTransport(), REST_API) == REST_API.admit(None)


def test_peer_check_refuses_revoked_certificates(certs):
    """A certificate the revocation hook names is refused, on listeners and by clients."""
    alice = load_certificate(certs.path / "alice.crt")
    check = PeerCheck(certs.cluster_uuid,
                      is_revoked=lambda c: c.serial_number == alice.serial_number)
    admission = check.admit_certificate(alice, REST_API)
    assert admission.identity == Identity.user("alice") and not admission.admitted
    assert admission.refusal == (f"the certificate user-alice (serial "
                                 f"{alice.serial_number:x}) is revoked")
    bob = load_certificate(certs.path / "bob.crt")
    assert check.admit_certificate(bob, REST_API).admitted
    error = check.check_server(alice, Identity.user("alice"))
    assert "is revoked" in str(error)


def first_node(certs):
    """The first node of the test cluster."""
    return certs.node_uuids[0]


def test_peer_check_checks_servers(certs):
    """A server must be the expected identity and, given a host name, carry it."""
    check = PeerCheck(certs.cluster_uuid)
    control = load_certificate(certs.path / "control-service.crt")
    assert check.check_server(control, Identity.control(), "127.0.0.1") is None
    assert "IPAddressMismatch" in repr(
        check.check_server(control, Identity.control(), "127.0.0.2"))
    node = load_certificate(certs.node_directory(first_node(certs)) / "node.crt")
    assert str(check.check_server(node, Identity.control(), "127.0.0.1")) == (
        f"the server is node-{first_node(certs)}, not control-service")


def test_factory_shares_one_server_context(certs):
    """Every listener of a process shares one server context, renegotiation refused."""
    tls = ClusterTLS.load(certs.path, "control-service")
    reactor = MemoryReactor()
    api = tls.listener(reactor, "tcp:0:interface=127.0.0.1", REST_API)
    agents = tls.listener(reactor, "tcp:0:interface=127.0.0.1", AGENT_CHANNEL)
    assert (api.role, agents.role) == (REST_API, AGENT_CHANNEL)
    assert api.check is agents.check is tls.check
    options = tls.server_options()
    assert api.endpoint._options is agents.endpoint._options is options
    # set_options adds nothing with 0 and answers the options set.
    assert options.getContext().set_options(0) & SSL.OP_NO_RENEGOTIATION
    assert options.verify and options.requireCertificate
    assert tls.cluster_uuid == certs.cluster_uuid


def test_factory_client_needs_hostname_of_control_only(certs):
    """The control service is expected by host name; a node by its identity alone."""
    tls = ClusterTLS.load(certs.node_directory(first_node(certs)), "node")
    with pytest.raises(ValueError):
        tls.client_options(Identity.control())
    with pytest.raises(ValueError):
        tls.client_options(Identity.node(certs.node_uuids[1]), "127.0.0.1")
    assert verifyObject(IPolicyForHTTPS, tls.http_policy())


@implementer(IHandshakeListener)
class Admitter(Protocol):
    """Server: once the handshake is done, sends the listener's verdict and closes."""

    def __init__(self, listener):
        self.listener = listener

    def handshakeCompleted(self):
        """Send "admitted CN" or the refusal."""
        admission = self.listener.admit(self.transport)
        self.transport.write((f"admitted {admission.identity.common_name}"
                              if admission.admitted else admission.refusal).encode())
        self.transport.loseConnection()


async def listen_as(reactor, folder, name, role, factory_of):
    """A ``ClusterTLS`` listener of ``name``'s certificate for ``role``, on a free port."""
    listener = ClusterTLS.load(folder, name).listener(
        reactor, "tcp:0:interface=127.0.0.1", role)
    return await listener.endpoint.listen(factory_of(listener))


def admitters(listener):
    """A factory of ``Admitter`` for ``listener``."""
    return Factory.forProtocol(lambda: Admitter(listener))


@pytest.mark.parametrize("role, client, expected", [
    (USERS_ONLY, "node", "the user port accepts only user-* certificates; this connection "
                         "presented node-{node}"),
    (USERS_ONLY, "alice", "admitted user-alice"),
    (AGENT_CHANNEL, "node", "admitted node-{node}"),
    (AGENT_CHANNEL, "alice", "the agent channel accepts only node-* certificates; this "
                             "connection presented user-alice"),
])
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_listener_admits_by_role(reactor, certs, role, client, expected):
    """Over real TLS a listener admits the kinds its role names (a node refused by users')."""
    port = await listen_as(reactor, certs.path, "control-service", role, admitters)
    node = first_node(certs)
    folder = certs.node_directory(node) if client == "node" else certs.path
    try:
        endpoint = ClusterTLS.load(folder, client).client_endpoint(
            reactor, "127.0.0.1", port.getHost().port, Identity.control())
        collector = Collector()
        await connectProtocol(endpoint, collector)
        assert await collector.done == expected.format(node=node).encode()
    finally:
        await stop(port)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_rest_role_identities_over_https(reactor, certs):
    """A site's ``identities()`` sees a node on the REST API and nobody on a user port."""
    seen = []

    class Who(Resource):
        """Records the identity ``identify`` gives each request."""

        isLeaf = True

        def __init__(self, identify):
            super().__init__()
            self.identify = identify

        def render_GET(self, request):
            """Record and answer."""
            seen.append(self.identify(request))
            return b"{}"

    node = first_node(certs)
    policy = ClusterTLS.load(certs.node_directory(node), "node").http_policy()
    for role, expected in ((REST_API, Identity.node(node)), (USERS_ONLY, None)):
        port = await listen_as(reactor, certs.path, "control-service", role,
                               lambda listener: Site(Who(listener.identities())))
        try:
            await get(reactor, port, policy)
        finally:
            await stop(port)
        assert seen.pop() == expected


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_refuses_a_revoked_server(reactor, certs):
    """A client whose check calls the server's certificate revoked refuses it."""
    first, second = certs.node_uuids
    port = await listen_as(reactor, certs.node_directory(second), "node", PEER_TRANSFER,
                           admitters)
    try:
        client = ClusterTLS.load(certs.node_directory(first), "node",
                                 is_revoked=lambda certificate: True)
        with pytest.raises(Exception) as error:
            await exchange(reactor, port, client.client_options(Identity.node(second)))
        trusting = ClusterTLS.load(certs.node_directory(first), "node")
        assert await exchange(reactor, port, trusting.client_options(
            Identity.node(second))) == f"admitted node-{first}".encode()
    finally:
        await stop(port)
    assert f"the certificate node-{second}" in str(error.value)
    assert "is revoked" in str(error.value)
