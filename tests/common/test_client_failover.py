"""
The REST client follows control service replicas (issue 9): which calls move on to the
next replica, which fail saying they may have been carried out, and a replica that accepts
connections but never answers, over real sockets.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import HasHeaders, RequestSequence, StringStubbingResource, StubTreq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ResponseNeverReceived

from pyflock.common._client import (
    AnswerLost, ControlClient, ControlError, NoReplicaAnswered, never_sent,
)
from tests.common.test_client import DATASET, DATASET_JSON, DATASET_RECORD, NODE, JSONBody

C1, C2 = "https://c1.example:4523", "https://c2.example:4523"


def pair(base, method, path, response, code=200, body=b""):
    """One (request, response) of a ``RequestSequence`` sent to replica ``base``."""
    if not isinstance(body, bytes):
        body = JSONBody(body)
    return ((method, base + "/v1" + path, {}, HasHeaders({"Accept": ["application/json"]}),
             body),
            (code, {"Content-Type": "application/json"}, json.dumps(response).encode()))


class Network:
    """A treq-like object in front of a ``StubTreq``: requests to a host in ``refusing``
    are refused, to one in ``losing`` sent and their answer lost; ``sent`` lists the
    hosts that requests went to, in order."""

    def __init__(self, pairs):
        self.sequence = RequestSequence(pairs)
        self.stub = StubTreq(StringStubbingResource(self.sequence))
        self.refusing, self.losing, self.sent = set(), set(), []

    def request(self, method, url, **kwargs):
        host = url.split("//")[1].split(":")[0]
        self.sent.append(host)
        if host in self.refusing:
            return fail(ConnectionRefusedError())
        if host in self.losing:
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        kwargs.pop("reactor", None), kwargs.pop("timeout", None)
        return self.stub.request(method, url, **kwargs)


class FailoverTests(SynchronousTestCase):
    """A client of two replicas, c1 then c2."""

    def run_calls(self, pairs, *calls, refusing=(), losing=()):
        """Run each ``call(client)`` in turn; the results, or the failures' values."""
        network = Network(pairs)
        network.refusing.update(refusing)
        network.losing.update(losing)
        client = ControlClient(network, [C1, C2], reactor=Clock(), timeout=5)
        results = []
        with network.sequence.consume(self.fail):
            for call in calls:
                d = call(client)
                results.append(self.successResultOf(d) if d.called and not isinstance(
                    d.result, Failure) else self.failureResultOf(d).value)
        self.network, self.client = network, client
        return results

    def test_refused_replica_left_and_the_next_kept(self):
        """A GET refused by c1 is answered by c2, which the following calls go to first."""
        [first, second] = self.run_calls(
            [pair(C2, b"get", "/version", {"flocker": "1"}),
             pair(C2, b"get", "/version", {"flocker": "2"})],
            lambda c: c.version(), lambda c: c.version(), refusing={"c1.example"})
        self.assertEqual((first.flocker, second.flocker), ("1", "2"))
        self.assertEqual(self.network.sent, ["c1.example", "c2.example", "c2.example"])
        self.assertEqual(self.client.host, "c2.example")

    def test_first_replica_chosen(self):
        """``first`` picks the replica tried first; the others follow in order."""
        network = Network([pair(C2, b"get", "/version", {"flocker": "1"})])
        client = ControlClient(network, [C1, C2], reactor=Clock(), timeout=5, first=1)
        with network.sequence.consume(self.fail):
            self.successResultOf(client.version())
        self.assertEqual(network.sent, ["c2.example"])

    def test_503_read_goes_to_the_next(self):
        """A replica answering 503 to a read is left for the next."""
        [listing] = self.run_calls(
            [pair(C1, b"get", "/configuration/datasets", {"description": "no"}, 503),
             pair(C2, b"get", "/configuration/datasets", [DATASET_JSON])],
            lambda c: c.list_datasets())
        self.assertEqual(listing.datasets, (DATASET_RECORD,))

    def test_create_never_sent_is_retried(self):
        """A create whose connection was refused cannot have been done: c2 does it."""
        [created] = self.run_calls(
            [pair(C2, b"post", "/configuration/datasets", DATASET_JSON, 201,
                  body={"primary": NODE})],
            lambda c: c.create_dataset(NODE), refusing={"c1.example"})
        self.assertEqual(created, DATASET_RECORD)

    def test_create_with_lost_answer_may_have_been_done(self):
        """A create sent whose answer was lost is not repeated: it fails saying it may
        have been carried out and how to check."""
        [error] = self.run_calls([], lambda c: c.create_dataset(NODE), losing={"c1.example"})
        self.assertIsInstance(error, AnswerLost)
        self.assertIn("POST /v1/configuration/datasets was sent to the control service at "
                      "c1.example:4523", str(error))
        self.assertIn("it may have been carried out: read the configuration (pyflock list",
                      str(error))
        self.assertEqual(self.network.sent, ["c1.example"])

    def test_delete_with_lost_answer_may_have_been_done(self):
        """A delete whose answer was lost is not repeated either."""
        [error] = self.run_calls([], lambda c: c.delete_dataset(DATASET),
                                 losing={"c1.example"})
        self.assertIsInstance(error, AnswerLost)

    def test_move_with_lost_answer_is_repeated(self):
        """A move is the same done twice: with its answer lost, c2 is asked."""
        [moved] = self.run_calls(
            [pair(C2, b"post", f"/configuration/datasets/{DATASET}", DATASET_JSON,
                  body={"primary": NODE})],
            lambda c: c.move_dataset(DATASET, NODE), losing={"c1.example"})
        self.assertEqual(moved, DATASET_RECORD)

    def test_conditional_move_with_lost_answer_is_not_repeated(self):
        """A move under ``if_matches`` would fail its own condition if repeated."""
        [error] = self.run_calls([], lambda c: c.move_dataset(DATASET, NODE, if_matches="7"),
                                 losing={"c1.example"})
        self.assertIsInstance(error, AnswerLost)

    def test_503_change_not_repeated(self):
        """A change answered 503 may or may not have been made: its answer is returned."""
        [error] = self.run_calls(
            [pair(C1, b"post", "/configuration/datasets",
                  {"description": "store unavailable; may or may not"}, 503,
                  body={"primary": NODE})],
            lambda c: c.create_dataset(NODE))
        self.assertEqual((type(error), error.code), (ControlError, 503))

    def test_every_replica_down(self):
        """When no replica answers the error names each and why."""
        [error] = self.run_calls([], lambda c: c.version(),
                                 refusing={"c1.example", "c2.example"})
        self.assertIsInstance(error, NoReplicaAnswered)
        self.assertIn("cannot reach any control service replica: c1.example:4523: "
                      "connection refused", str(error))
        self.assertIn("; c2.example:4523: connection refused", str(error))

    def test_several_replicas_need_a_timeout(self):
        """Several replicas without a per-attempt timeout are refused at once."""
        with self.assertRaises(ValueError) as caught:
            ControlClient(object(), [C1, C2], reactor=Clock())
        self.assertIn("needs a timeout for each attempt", str(caught.exception))

    def test_never_sent(self):
        """Refusals are never sent; a lost answer may have been acted on."""
        self.assertTrue(never_sent(ConnectionRefusedError()))
        self.assertFalse(never_sent(ResponseNeverReceived([Failure(ConnectionDone())])))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_silent_and_closed_replicas_over_real_sockets():
    """Over real sockets, a replica that accepts but never answers is left after the
    per-attempt timeout, and a closed port at once, for one that answers; a create sent
    to the silent one fails saying it may have been carried out."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    silent = await _listen_silent(reactor, Factory.forProtocol(Protocol))
    answering = await _serve_plain_version(reactor)
    closed = _free_port()
    try:
        client = ControlClient(HTTPClient(Agent(reactor)), [
            f"http://127.0.0.1:{silent.getHost().port}", f"http://127.0.0.1:{closed}",
            f"http://127.0.0.1:{answering.getHost().port}"], reactor=reactor, timeout=0.5)
        version = await client.version()
        assert version.flocker == "0.1.0"
        assert client.port == answering.getHost().port
        creating = ControlClient(HTTPClient(Agent(reactor)), [
            f"http://127.0.0.1:{silent.getHost().port}",
            f"http://127.0.0.1:{answering.getHost().port}"], reactor=reactor, timeout=0.5)
        with pytest.raises(AnswerLost, match="no answer within 0.5 seconds.*may have been "
                                             "carried out"):
            await creating.create_dataset(NODE)
    finally:
        await silent.stopListening()
        await answering.stopListening()


async def _listen_silent(reactor, factory):
    """A port on 127.0.0.1 that accepts connections and never answers."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


async def _serve_plain_version(reactor):
    """A plain HTTP port on 127.0.0.1 answering /v1/version."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Version(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            return b'{"flocker": "0.1.0"}'

    root, v1 = Resource(), Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"version", Version())
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))


class ConcurrentFailoverTests(SynchronousTestCase):
    """Calls that fail together each try every replica once."""

    def test_two_calls_failing_together(self):
        """Two reads in flight on a replica that fails both go to the other replica."""
        from twisted.internet.defer import Deferred
        pending = []

        class Held(Network):
            def request(self, method, url, **kwargs):
                if url.startswith(C1):
                    self.sent.append("c1.example")
                    d = Deferred()
                    pending.append(d)
                    return d
                return super().request(method, url, **kwargs)
        network = Held([pair(C2, b"get", "/version", {"flocker": "1"}),
                        pair(C2, b"get", "/version", {"flocker": "2"})])
        client = ControlClient(network, [C1, C2], reactor=Clock(), timeout=5)
        with network.sequence.consume(self.fail):
            first, second = client.version(), client.version()
            for d in pending:
                d.errback(ConnectionRefusedError())
            self.assertEqual(sorted([self.successResultOf(first).flocker,
                                     self.successResultOf(second).flocker]), ["1", "2"])
        self.assertEqual(network.sent, ["c1.example", "c1.example", "c2.example",
                                        "c2.example"])
        self.assertEqual(client.host, "c2.example")
