"""
Tests for ``pyflock.common._client``: each call's request (method, URL, headers, body) and
how each answer, refusal and connection failure comes back.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from pyrsistent import pmap
from treq.client import HTTPClient
from treq.testing import HasHeaders, RequestSequence, StringStubbingResource, StubTreq
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from zope.interface.verify import verifyObject

from pyflock.common._client import (
    AccessDenied, ConfigurationChanged, Conflict, ControlClient, ControlError,
    ControlUnreachable, DatasetListing, IControlClient, InvalidRequest, NotAllowed,
    NotFound, UnexpectedResponse, VersionInfo,
)
from pyflock.common._records import (
    Dataset, DatasetReport, Lease, Node, node_from_api_json, node_to_api_json,
)

BASE = "https://control.example:4523"
DATASET = "6b1d2b8e-6e52-4c31-9c59-2e4dbe0c2a4f"
NODE = "0f6b1f0c-5a43-4e0e-8d0d-4e5b4d9b0a11"
OTHER_NODE = "9a3c1c44-8f6b-4d3a-b5a6-1f2e3d4c5b6a"

DATASET_JSON = {"dataset_id": DATASET, "primary": NODE, "maximum_size": 10737418240,
                "metadata": {"name": "pgdata"}, "deleted": False}
DATASET_RECORD = Dataset(dataset_id=DATASET, primary=NODE, maximum_size=10737418240,
                         metadata={"name": "pgdata"})

#: The client's clock in ``RequestTests``: leases it reads expire this long after 0.
NOW = 1000.0


class JSONBody:
    """Equal to request bytes that decode to ``value`` (key order does not matter)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        try:
            return json.loads(other) == self.value
        except (TypeError, ValueError):
            return False

    def __repr__(self):
        return f"JSONBody({self.value!r})"


ACCEPT = {"Accept": ["application/json"]}
SENDS_JSON = {"Accept": ["application/json"], "Content-Type": ["application/json"]}


def expect(method, path, response, body=b"", headers=ACCEPT, code=200,
           response_headers=None):
    """One (request, response) pair of a ``RequestSequence`` for ``/v1<path>``."""
    if not isinstance(body, (bytes, JSONBody)):
        body = JSONBody(body)
    return ((method, BASE + "/v1" + path, {}, HasHeaders(headers), body),
            (code, dict({"Content-Type": "application/json"}, **(response_headers or {})),
             response if isinstance(response, bytes) else json.dumps(response).encode()))


class RequestTests(SynchronousTestCase):
    """Every call sends the request API.md describes and decodes its answer."""

    def call(self, pairs, function):
        """Run ``function(client)`` against a server answering ``pairs`` in order."""
        sequence = RequestSequence(pairs)
        clock = Clock()
        clock.advance(NOW)
        client = ControlClient(StubTreq(StringStubbingResource(sequence)), BASE,
                               reactor=clock)
        with sequence.consume(self.fail):
            result = self.successResultOf(function(client))
        return result

    def test_provides_interface(self):
        """``ControlClient`` provides every method of ``IControlClient``."""
        self.assertTrue(verifyObject(IControlClient, ControlClient(object(), BASE)))

    def test_version(self):
        """``version`` GETs /v1/version and returns both versions."""
        result = self.call([expect(b"get", "/version", {"flocker": "0.1.0",
                                                        "pyflock": "0.2.0"})],
                           lambda c: c.version())
        self.assertEqual(VersionInfo(flocker="0.1.0", pyflock="0.2.0"), result)

    def test_version_flocker(self):
        """A Flocker server's version answer (no ``pyflock`` field) is accepted."""
        result = self.call([expect(b"get", "/version", {"flocker": "1.15.0"})],
                           lambda c: c.version())
        self.assertEqual(VersionInfo(flocker="1.15.0", pyflock=None), result)

    def test_base_url_trailing_slash(self):
        """A trailing slash on the base URL does not double the path's slash."""
        sequence = RequestSequence([expect(b"get", "/version", {"flocker": "1"})])
        client = ControlClient(StubTreq(StringStubbingResource(sequence)), BASE + "/")
        with sequence.consume(self.fail):
            self.successResultOf(client.version())

    def test_list_datasets(self):
        """``list_datasets`` returns the datasets and the X-Configuration-Tag."""
        deleted = dict(DATASET_JSON, dataset_id=OTHER_NODE, maximum_size=None, metadata={},
                       deleted=True)
        result = self.call(
            [expect(b"get", "/configuration/datasets", [DATASET_JSON, deleted],
                    response_headers={"X-Configuration-Tag": "42"})],
            lambda c: c.list_datasets())
        self.assertEqual(DatasetListing(datasets=(DATASET_RECORD, Dataset(
            dataset_id=OTHER_NODE, primary=NODE, deleted=True)), tag="42"), result)
        self.assertEqual("pgdata", result.datasets[0].name)
        self.assertEqual(pmap({"name": "pgdata"}), result.datasets[0].metadata)

    def test_list_datasets_without_tag(self):
        """A listing without the tag header has tag None."""
        result = self.call([expect(b"get", "/configuration/datasets", [])],
                           lambda c: c.list_datasets())
        self.assertEqual(DatasetListing(datasets=(), tag=None), result)

    def test_create_minimal(self):
        """``create_dataset`` with only a primary sends only the primary."""
        answer = dict(DATASET_JSON, maximum_size=None, metadata={})
        result = self.call(
            [expect(b"post", "/configuration/datasets", answer, body={"primary": NODE},
                    headers=SENDS_JSON, code=201)],
            lambda c: c.create_dataset(NODE))
        self.assertEqual(Dataset(dataset_id=DATASET, primary=NODE), result)

    def test_create_everything(self):
        """``create_dataset`` sends id, size, metadata and the If-Matches tag given."""
        result = self.call(
            [expect(b"post", "/configuration/datasets", DATASET_JSON,
                    body={"primary": NODE, "dataset_id": DATASET,
                          "maximum_size": 10737418240, "metadata": {"name": "pgdata"}},
                    headers=dict(SENDS_JSON, **{"X-If-Configuration-Matches": ["7"]}),
                    code=201)],
            lambda c: c.create_dataset(NODE, maximum_size=10737418240,
                                       metadata={"name": "pgdata"}, dataset_id=DATASET,
                                       if_matches="7"))
        self.assertEqual(DATASET_RECORD, result)

    def test_move(self):
        """``move_dataset`` POSTs the new primary to the dataset's URL."""
        result = self.call(
            [expect(b"post", f"/configuration/datasets/{DATASET}",
                    dict(DATASET_JSON, primary=OTHER_NODE), body={"primary": OTHER_NODE},
                    headers=dict(SENDS_JSON, **{"X-If-Configuration-Matches": ["8"]}))],
            lambda c: c.move_dataset(DATASET, OTHER_NODE, if_matches="8"))
        self.assertEqual(DATASET_RECORD.__class__(
            dataset_id=DATASET, primary=OTHER_NODE, maximum_size=10737418240,
            metadata={"name": "pgdata"}), result)

    def test_update_metadata(self):
        """``update_metadata`` POSTs the whole new metadata to the dataset's URL."""
        result = self.call(
            [expect(b"post", f"/configuration/datasets/{DATASET}",
                    dict(DATASET_JSON, metadata={"name": "web"}),
                    body={"metadata": {"name": "web"}}, headers=SENDS_JSON)],
            lambda c: c.update_metadata(DATASET, {"name": "web"}))
        self.assertEqual("web", result.name)

    def test_delete(self):
        """``delete_dataset`` DELETEs the dataset's URL and returns it marked deleted."""
        result = self.call(
            [expect(b"delete", f"/configuration/datasets/{DATASET}",
                    dict(DATASET_JSON, deleted=True),
                    headers=dict(ACCEPT, **{"X-If-Configuration-Matches": ["9"]}))],
            lambda c: c.delete_dataset(DATASET, if_matches="9"))
        self.assertTrue(result.deleted)

    def test_state_datasets(self):
        """``state_datasets`` returns each reported dataset, path and state when given."""
        result = self.call(
            [expect(b"get", "/state/datasets", [
                {"dataset_id": DATASET, "primary": NODE, "maximum_size": None,
                 "path": "/var/lib/pyflock/mounts/x", "state": "mounted"},
                {"dataset_id": OTHER_NODE, "primary": NODE, "maximum_size": 67108864}])],
            lambda c: c.state_datasets())
        self.assertEqual((DatasetReport(dataset_id=DATASET, node_uuid=NODE,
                                        path="/var/lib/pyflock/mounts/x", state="mounted"),
                          DatasetReport(dataset_id=OTHER_NODE, node_uuid=NODE,
                                        maximum_size=67108864)), result)

    def test_list_nodes(self):
        """``list_nodes`` returns each node with liveness when reported."""
        result = self.call(
            [expect(b"get", "/state/nodes", [
                {"uuid": NODE, "host": "10.0.0.5", "alive": True, "last_seen": 1.5},
                {"uuid": OTHER_NODE, "host": "10.0.0.6"}])],
            lambda c: c.list_nodes())
        self.assertEqual((Node(uuid=NODE, host="10.0.0.5", alive=True, last_seen=1.5),
                          Node(uuid=OTHER_NODE, host="10.0.0.6", alive=None)), result)

    def test_node_by_era(self):
        """``node_by_era`` GETs the era's URL and returns the node uuid."""
        result = self.call([expect(b"get", "/state/nodes/by_era/abc-123",
                                   {"uuid": NODE})],
                           lambda c: c.node_by_era("abc-123"))
        self.assertEqual(NODE, result)

    def test_list_leases(self):
        """``list_leases`` returns each lease expiring its seconds left after the client's
        clock's now, or never."""
        result = self.call(
            [expect(b"get", "/configuration/leases", [
                {"dataset_id": DATASET, "node_uuid": NODE, "expires": 12.5},
                {"dataset_id": OTHER_NODE, "node_uuid": NODE, "expires": None}])],
            lambda c: c.list_leases())
        self.assertEqual((Lease(dataset_id=DATASET, node_uuid=NODE, expiration=NOW + 12.5),
                          Lease(dataset_id=OTHER_NODE, node_uuid=NODE, expiration=None)),
                         result)

    def test_acquire_lease(self):
        """``acquire_lease`` POSTs dataset, node and expiry; 201 (new) and 200 (renewed)
        both succeed."""
        lease = {"dataset_id": DATASET, "node_uuid": NODE, "expires": 60}
        body = {"dataset_id": DATASET, "node_uuid": NODE, "expires": 60}
        result = self.call(
            [expect(b"post", "/configuration/leases", lease, body=body, headers=SENDS_JSON,
                    code=201),
             expect(b"post", "/configuration/leases", lease, body=body, headers=SENDS_JSON,
                    code=200)],
            lambda c: c.acquire_lease(DATASET, NODE, 60).addCallback(
                lambda first: c.acquire_lease(DATASET, NODE, 60).addCallback(
                    lambda second: (first, second))))
        self.assertEqual((Lease(DATASET, NODE, NOW + 60),) * 2, result)

    def test_acquire_lease_forever(self):
        """A lease without expiry is sent with ``"expires": null``."""
        lease = {"dataset_id": DATASET, "node_uuid": NODE, "expires": None}
        result = self.call(
            [expect(b"post", "/configuration/leases", lease, body=lease, headers=SENDS_JSON,
                    code=201)],
            lambda c: c.acquire_lease(DATASET, NODE, None))
        self.assertIsNone(result.expiration)

    def test_release_lease(self):
        """``release_lease`` DELETEs the lease's URL and returns the released lease."""
        result = self.call(
            [expect(b"delete", f"/configuration/leases/{DATASET}",
                    {"dataset_id": DATASET, "node_uuid": NODE, "expires": 3.0})],
            lambda c: c.release_lease(DATASET))
        self.assertEqual(Lease(DATASET, NODE, NOW + 3.0), result)

    def test_records_round_trip(self):
        """The API codecs of a node and a version give back what they read."""
        node = {"uuid": NODE, "host": "h", "alive": False, "last_seen": 3, "zone": "z-1a"}
        self.assertEqual(node, node_to_api_json(node_from_api_json(node)))
        version = {"flocker": "1", "pyflock": "2"}
        self.assertEqual(version, VersionInfo.from_json(version).to_json())

    def test_clock_defaults_to_reactor(self):
        """Without a reactor the client's clock is the global reactor's."""
        from twisted.internet import reactor
        before = reactor.seconds()
        self.assertTrue(before <= ControlClient(object(), BASE).seconds() <= reactor.seconds())


class ErrorTests(SynchronousTestCase):
    """Refusals become typed ``ControlError``s carrying the service's description."""

    def failure_of(self, code, body, call=lambda c: c.move_dataset(DATASET, NODE)):
        """The exception ``call`` fails with when the server answers ``code``/``body``."""
        resource = StringStubbingResource(
            lambda *request: (code, {"Content-Type": "application/json"},
                              body if isinstance(body, bytes) else json.dumps(body).encode()))
        client = ControlClient(StubTreq(resource), BASE)
        return self.failureResultOf(call(client), ControlError).value

    def test_codes(self):
        """Each documented status code becomes its own ``ControlError`` subclass."""
        for code, kind, description in [
                (403, AccessDenied, "Node x may not move a dataset."),
                (404, NotFound, "Dataset not found."),
                (405, NotAllowed, "The dataset has been deleted."),
                (409, Conflict, f"Lease already held by node {OTHER_NODE}."),
                (412, ConfigurationChanged, "The configuration tag does not match."),
                (500, ControlError, "Internal error.")]:
            error = self.failure_of(code, {"description": description})
            self.assertEqual((kind, code, description, ()),
                             (type(error), error.code, error.description, error.errors))
            self.assertEqual(description, str(error))

    def test_conflict_holder(self):
        """A 409 for a held lease names the holder in ``Conflict.holder`` (the answer's
        ``holder`` field, lower case); a 409 without one has None."""
        held = self.failure_of(409, {"description": "Lease already held.",
                                     "holder": OTHER_NODE.upper()})
        taken = self.failure_of(409, {"description": "The name is taken."})
        self.assertEqual((type(held), held.holder, taken.holder),
                         (Conflict, OTHER_NODE.lower(), None))

    def test_bad_request_errors(self):
        """A 400 keeps the schema errors and shows them after the description."""
        error = self.failure_of(400, {"description": "The provided JSON doesn't match the "
                                                     "required schema.",
                                      "errors": ["'primary' is a required property"]})
        self.assertIsInstance(error, InvalidRequest)
        self.assertEqual(("'primary' is a required property",), error.errors)
        self.assertEqual("The provided JSON doesn't match the required schema. "
                         "('primary' is a required property)", str(error))

    def test_error_without_json(self):
        """An error answer that is not JSON (a proxy's page) still gives code and text."""
        error = self.failure_of(502, b"<html>Bad Gateway</html>")
        self.assertEqual(502, error.code)
        self.assertEqual(f"POST {BASE}/v1/configuration/datasets/{DATASET} failed with "
                         "HTTP 502: <html>Bad Gateway</html>", error.description)

    def test_success_not_json(self):
        """A success answer that is not JSON fails with ``UnexpectedResponse``."""
        error = self.failure_of(200, b"not json", lambda c: c.version())
        self.assertIsInstance(error, UnexpectedResponse)
        self.assertIn("not JSON", str(error))

    def test_success_missing_field(self):
        """A dataset answer without ``primary`` fails naming the missing field."""
        error = self.failure_of(200, {"dataset_id": DATASET})
        self.assertIsInstance(error, UnexpectedResponse)
        self.assertIn("dataset lacks 'primary'", str(error))

    def test_success_wrong_type(self):
        """A list answer that is an object fails with ``UnexpectedResponse``."""
        error = self.failure_of(200, {"oops": 1}, lambda c: c.list_leases())
        self.assertIsInstance(error, UnexpectedResponse)
        self.assertIn("expected a JSON array", str(error))

    def test_boolean_is_not_a_size(self):
        """``maximum_size: true`` is refused although Python's bool is an int."""
        error = self.failure_of(200, dict(DATASET_JSON, maximum_size=True))
        self.assertIsInstance(error, UnexpectedResponse)


class _Endpoints:
    """Endpoint factory connecting every URI through a memory reactor."""

    def __init__(self, reactor):
        self._reactor = reactor

    def endpointForURI(self, uri):
        """A TCP endpoint to the URI's host and port on the memory reactor."""
        return TCP4ClientEndpoint(self._reactor, uri.host.decode(), uri.port)


class UnreachableTests(SynchronousTestCase):
    """Without an answer, calls fail with ``ControlUnreachable`` naming host and port."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.http = HTTPClient(Agent.usingEndpointFactory(self.reactor,
                                                          _Endpoints(self.reactor)))

    def test_refused(self):
        """A refused connection names the host, the port and the refusal."""
        d = ControlClient(self.http, BASE).list_datasets()
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        self.assertEqual(("control.example", 4523), (host, port))
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(ConnectionRefusedError()))
        error = self.failureResultOf(d, ControlUnreachable).value
        self.assertEqual(("control.example", 4523, None), (error.host, error.port, error.code))
        self.assertEqual("cannot reach the control service at control.example:4523: "
                         "connection refused (is pyflock-control running and listening "
                         "there?)", str(error))

    def test_timeout(self):
        """A request unanswered for ``timeout`` seconds fails saying so."""
        client = ControlClient(self.http, BASE, reactor=self.reactor, timeout=30)
        d = client.version()
        self.reactor.advance(29)
        self.assertNoResult(d)
        self.reactor.advance(1)
        error = self.failureResultOf(d, ControlUnreachable).value
        self.assertEqual("cannot reach the control service at control.example:4523: "
                         "no answer within 30 seconds", str(error))

    def test_timeout_needs_reactor(self):
        """A timeout without a reactor to measure it is refused at once."""
        self.assertRaises(ValueError, ControlClient, self.http, BASE, timeout=5)

    def test_url_needs_host(self):
        """A base URL without a host is refused at once."""
        self.assertRaises(ValueError, ControlClient, self.http, "/v1")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_refused_over_real_socket():
    """A real connection to a closed local port fails with ``ControlUnreachable``."""
    from twisted.internet import reactor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = HTTPClient(Agent(reactor))
    client = ControlClient(http, f"http://127.0.0.1:{port}", reactor=reactor, timeout=10)
    with pytest.raises(ControlUnreachable) as info:
        await client.version()
    assert str(info.value).startswith(f"cannot reach the control service at "
                                      f"127.0.0.1:{port}: connection refused")


async def _serve_version(reactor, options):
    """Listen with TLS ``options`` on a free 127.0.0.1 port answering /v1/version."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from pyflock.common._tls import tls_server_endpoint

    class Version(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            return b'{"flocker": "0.1.0", "pyflock": "0.1.0"}'

    root, v1 = Resource(), Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"version", Version())
    endpoint = tls_server_endpoint(reactor, "tcp:0:interface=127.0.0.1", options)
    return await endpoint.listen(Site(root))


def _server_options(server, trusted=None):
    """TLS options of ``server``'s control service, trusting ``trusted``'s CA (default
    its own)."""
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates

    from pyflock.common._ca import load_certificate, load_private_key
    from pyflock.common._tls import server_tls_options

    if trusted is None:
        return server_tls_options(server, "control-service")
    authority = load_certificate(trusted / "cluster.crt")
    return CertificateOptions(
        privateKey=load_private_key(server / "control-service.key"),
        certificate=load_certificate(server / "control-service.crt"),
        trustRoot=trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(
            authority))]))


async def _version_over_tls(tmp_path, client_certificates, host, server_trusts=None):
    """``version()`` from a real TLS server, asked with ``client_certificates``."""
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    from pyflock.common._tls import treq_client
    from tests.harness.certificates import make_cluster_certificates

    server = tmp_path / "server"
    server.mkdir()
    make_cluster_certificates(server, nodes=0)
    port = await _serve_version(reactor, _server_options(server, server_trusts))
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        http = treq_client(reactor, client_certificates or server, "alice", pool=pool)
        client = ControlClient(http, f"https://{host}:{port.getHost().port}",
                               reactor=reactor, timeout=10)
        return await client.version(), port.getHost().port
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_version_over_tls(tmp_path):
    """Over real mutual TLS with the cluster's certificates, ``version`` answers."""
    version, _ = await _version_over_tls(tmp_path, None, "127.0.0.1")
    assert VersionInfo(flocker="0.1.0", pyflock="0.1.0") == version


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_other_cluster_over_tls(tmp_path):
    """Certificates of another cluster fail the handshake with a readable reason."""
    from tests.harness.certificates import make_cluster_certificates

    other = tmp_path / "other"
    other.mkdir()
    make_cluster_certificates(other, nodes=0)
    with pytest.raises(ControlUnreachable) as info:
        await _version_over_tls(tmp_path, other, "127.0.0.1")
    assert "TLS handshake failed" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert "is that folder for this cluster?" in str(info.value)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_wrong_host_over_tls(tmp_path):
    """A control certificate that does not name the host dialled fails readably."""
    with pytest.raises(ControlUnreachable) as info:
        await _version_over_tls(tmp_path, None, "localhost")
    assert "TLS handshake failed" in str(info.value), str(info.value)
    assert "not issued for 'localhost'" in str(info.value)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_client_refused_over_tls(tmp_path):
    """A server that does not trust the client's certificate fails the call readably."""
    from tests.harness.certificates import make_cluster_certificates

    other = tmp_path / "other"
    other.mkdir()
    make_cluster_certificates(other, nodes=0)
    with pytest.raises(ControlUnreachable) as info:
        await _version_over_tls(tmp_path, None, "127.0.0.1", server_trusts=other)
    assert "refused this client's certificate" in str(info.value), str(info.value)
