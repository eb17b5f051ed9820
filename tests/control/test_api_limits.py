"""
The REST API's limits in memory (issue 8): bounded node leases, body size and JSON that
cannot be parsed safely, the per-node dataset quota and write rate, and the audit trail.
"""

from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from pyflock.control._api import __version__
from pyflock.control._api_base import MAX_BODY, APISite
from pyflock.control._openapi import build_openapi
from pyflock.control._ratelimit import NodeLimits, TokenBucketPolicy
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


class HarnessTest(SynchronousTestCase):
    """A test of the API in memory (``self.h``)."""

    def setUp(self):
        self.h = APIHarness()

    def req(self, *args, **kwargs):
        """One request through the harness."""
        return self.h.request(self, *args, **kwargs)


class NodeLeaseTests(HarnessTest):
    """A node certificate takes only its own leases, of 1 to 300 seconds."""

    def setUp(self):
        super().setUp()
        self.assertEqual(self.req("POST", DATASETS, {"primary": A, "dataset_id": DS}).code,
                         201)

    def lease(self, expires, identity=NODE_A, node=A):
        """Ask for ``node``'s lease on DS lasting ``expires`` as ``identity``."""
        return self.req("POST", LEASES, {"dataset_id": DS, "node_uuid": node,
                                         "expires": expires}, identity=identity)

    def test_node_lease_forever_refused(self):
        """A node asking for a lease that never expires gets 403 saying why."""
        r = self.lease(None)
        self.assertEqual(r.code, 403)
        self.assertIn("1 to 300 seconds", r.json["description"])
        self.assertIn("null", r.json["description"])
        self.assertEqual(dict(self.h.store.config.leases), {})

    def test_node_lease_out_of_bounds_refused(self):
        """Leases shorter than 1 s or longer than 300 s are refused to a node."""
        for expires in (0, 0.5, 300.5, 3600, 10 * 365 * 24 * 3600):
            with self.subTest(expires=expires):
                self.assertEqual(self.lease(expires).code, 403)

    def test_node_lease_within_bounds(self):
        """A node takes and renews its own lease of 1 to 300 s (the plugin's flow)."""
        self.assertEqual(self.lease(1).code, 201)
        self.assertEqual(self.lease(300).code, 200)
        self.assertEqual(self.lease(60).code, 200)

    def test_node_lease_for_other_node_refused(self):
        """A bounded lease for another node is still refused."""
        r = self.lease(60, node=B)
        self.assertEqual(r.code, 403)
        self.assertIn("another node", r.json["description"])

    def test_user_unbounded(self):
        """A user certificate may take a lease for any node that never expires."""
        self.assertEqual(self.lease(None, identity=ALICE, node=B).code, 201)
        self.assertEqual(self.lease(86400, identity=ALICE, node=B).code, 200)


class CreateWithLeaseTests(HarnessTest):
    """``lease`` in a create (pyflock addition): the primary's lease is taken in the
    dataset's own write, under the same bounds as a lease request."""

    def create(self, lease, identity=NODE_A, primary=A, name="db"):
        """Create DS called ``name`` on ``primary`` with ``lease`` as ``identity``."""
        return self.req("POST", DATASETS, {"primary": primary, "dataset_id": DS,
                                           "metadata": {"name": name}, "lease": lease},
                        identity=identity)

    def test_created_leased(self):
        """The dataset and its primary's lease come in one write; the lease is listed
        with the seconds asked for."""
        self.assertEqual(self.create({"expires": 60}).code, 201)
        lease = self.h.store.config.leases[DS]
        self.assertEqual((lease.node_uuid, lease.expiration - self.h.clock.seconds()),
                         (A, 60))
        self.assertEqual(self.h.store.config.datasets[DS].primary, A)
        [listed] = self.req("GET", LEASES).json
        self.assertEqual((listed["node_uuid"], listed["expires"]), (A, 60))

    def test_node_bounds(self):
        """A node may not create with an unbounded or too long lease: 403, and nothing
        is created."""
        for expires in (None, 0, 301):
            with self.subTest(expires=expires):
                r = self.create({"expires": expires})
                self.assertEqual(r.code, 403)
                self.assertIn("1 to 300 seconds", r.json["description"])
        self.assertEqual((dict(self.h.store.config.datasets),
                          dict(self.h.store.config.leases)), ({}, {}))

    def test_user_unbounded(self):
        """A user certificate may create with a lease that never expires."""
        self.assertEqual(self.create({"expires": None}, identity=ALICE, primary=B).code, 201)
        self.assertEqual(self.h.store.config.leases[DS].node_uuid, B)

    def test_malformed(self):
        """A lease that is not ``{"expires": seconds}`` is refused with 400."""
        for lease in ({}, {"expires": "60"}, {"expires": 60, "node_uuid": B}, 60, None):
            with self.subTest(lease=lease):
                self.assertEqual(self.create(lease).code, 400)
        self.assertEqual(dict(self.h.store.config.datasets), {})

    def test_name_taken(self):
        """A create refused (the name is taken) takes no lease either."""
        self.assertEqual(self.req("POST", DATASETS, {"primary": B,
                                                     "metadata": {"name": "db"}}).code, 201)
        self.assertEqual(self.create({"expires": 60}).code, 409)
        self.assertNotIn(DS, self.h.store.config.leases)


class BodyTests(HarnessTest):
    """Bodies too large, nested too deeply or holding lone surrogates are refused clearly."""

    def test_every_body_route_refuses_large_bodies(self):
        """Every documented operation with a request body answers 413 to a body of 1 MiB
        and one byte, and changes nothing."""
        raw = b" " * (MAX_BODY + 1)
        for template, operations in build_openapi(__version__)["paths"].items():
            path = template.replace("{dataset_id}", DS).replace("{token_id}", "0" * 16)
            for method, operation in operations.items():
                if "requestBody" not in operation:
                    continue
                with self.subTest(method=method, path=template):
                    r = self.req(method.upper(), path, raw=raw)
                    self.assertEqual(r.code, 413)
                    self.assertIn("larger than 1048576 bytes", r.json["description"])
        self.assertEqual(dict(self.h.store.config.datasets), {})

    def test_deep_nesting_is_bad_input(self):
        """``[`` x 200,000 answers 400 (not 500) on every route with a body."""
        for path in (DATASETS, f"{DATASETS}/{DS}", LEASES):
            for raw in (b"[" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
                with self.subTest(path=path, raw=raw[:5]):
                    r = self.req("POST", path, raw=raw)
                    self.assertEqual(r.code, 400)
                    self.assertIn("nested too deeply", r.json["description"])

    def test_lone_surrogates_are_bad_input(self):
        """A string with a lone surrogate escape, as key or value, answers 400 and is not
        kept; a proper surrogate pair is text like any other."""
        for raw in [b'{"primary": "%s", "metadata": {"name": "\\ud800"}}',
                    b'{"primary": "%s", "metadata": {"x\\udfffy": "v"}}',
                    b'{"primary": "%s", "metadata": {"name": "a\\ud83d"}}']:
            with self.subTest(raw=raw):
                r = self.req("POST", DATASETS, raw=raw % A.encode())
                self.assertEqual(r.code, 400)
                self.assertIn("lone surrogate", r.json["description"])
        self.assertEqual(dict(self.h.store.config.datasets), {})
        r = self.req("POST", DATASETS,
                     raw=b'{"primary": "%s", "metadata": {"name": "\\ud83d\\ude00"}}' % A.encode())
        self.assertEqual((r.code, r.json["metadata"]), (201, {"name": "\U0001F600"}))


class _Echo(Resource):
    """A resource that counts the requests it renders."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.rendered = 0

    def render(self, request):
        """Count and answer."""
        self.rendered += 1
        return b"{}"


class LimitedRequestTests(SynchronousTestCase):
    """The API site answers 413 as soon as a body is known to pass its limit."""

    def setUp(self):
        self.resource = _Echo()
        self.site = APISite(self.resource, max_body=100)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_announced_length(self):
        """A Content-Length over the limit is answered 413 before any body is sent, even
        when the client expects "100 Continue"; the request is never processed."""
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n"
                                  b"Expect: 100-continue\r\n\r\n")
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b"larger than 100 bytes", answer)
        self.assertTrue(self.transport.disconnecting)
        self.channel.dataReceived(b"x" * 101)
        self.assertEqual(self.resource.rendered, 0)

    def test_chunked_body_cut_off(self):
        """A chunked body is cut off with 413 when it passes the limit."""
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n")
        self.channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.rendered, 0)

    def test_within_limit(self):
        """A body within the limit is processed as usual."""
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n"
                                  b"\r\n" + b"x" * 100)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.resource.rendered, 1)


class NodeLimitTests(HarnessTest):
    """A node certificate's dataset quota and write rate; users have neither."""

    def setUp(self):
        self.h = APIHarness(node_limits=NodeLimits(
            dataset_quota=3, writes=TokenBucketPolicy(rate=2, burst=5)))

    def create(self, identity=NODE_A, primary=A):
        """Create a dataset on ``primary`` as ``identity``."""
        return self.req("POST", DATASETS, {"primary": primary}, identity=identity)

    def test_quota(self):
        """A node creates datasets until it is primary of its quota of live ones; after
        a delete it may create again; a user may always create there."""
        created = [self.create().json["dataset_id"] for _ in range(3)]
        r = self.create()
        self.assertEqual(r.code, 403)
        self.assertIn("quota", r.json["description"])
        self.assertEqual(self.create(identity=ALICE).code, 201)
        self.clock.advance(10)
        self.assertEqual(self.req("DELETE", f"{DATASETS}/{created[0]}",
                                  identity=NODE_A).code, 200)
        self.assertEqual(self.create(identity=NODE_B, primary=B).code, 201)
        self.assertEqual(self.create().code, 403)  # the user's dataset counts: 3 live

    @property
    def clock(self):
        """The harness's clock."""
        return self.h.clock

    def test_rate_limited_with_retry_after(self):
        """Past its burst, a node's creates, moves and deletes answer 429 with
        Retry-After until the bucket refills; the refusal changes nothing."""
        self.h = APIHarness(node_limits=NodeLimits(writes=TokenBucketPolicy(rate=2,
                                                                            burst=5)))
        ds = [self.create().json["dataset_id"] for _ in range(4)]
        self.assertEqual(self.req("POST", f"{DATASETS}/{ds[0]}", {"primary": A},
                                  identity=NODE_A).code, 200)
        for method, path, body in [("POST", DATASETS, {"primary": A}),
                                   ("POST", f"{DATASETS}/{ds[1]}", {"primary": A}),
                                   ("DELETE", f"{DATASETS}/{ds[2]}", None)]:
            with self.subTest(method=method, path=path):
                r = self.req(method, path, body, identity=NODE_A)
                self.assertEqual(r.code, 429)
                self.assertEqual(r.headers["retry-after"], "1")
                self.assertIn("2 per second", r.json["description"])
        self.assertEqual(len(self.h.store.config.datasets), 4)
        self.clock.advance(0.5)
        self.assertEqual(self.req("DELETE", f"{DATASETS}/{ds[2]}", identity=NODE_A).code,
                         200)

    def test_leases_and_users_unlimited(self):
        """Lease renewals by a node, and every write of a user, are never limited."""
        ds = self.create().json["dataset_id"]
        for _ in range(20):
            r = self.req("POST", LEASES, {"dataset_id": ds, "node_uuid": A, "expires": 60},
                         identity=NODE_A)
            self.assertIn(r.code, (200, 201))
        for _ in range(20):
            self.assertEqual(self.create(identity=ALICE, primary=B).code, 201)

    def test_audit_trail_names_certificate(self):
        """Every change is logged naming the certificate that made it."""
        with capturedLogs() as events:
            ds = self.create().json["dataset_id"]
            self.req("POST", f"{DATASETS}/{ds}", {"primary": B})
            self.req("POST", LEASES, {"dataset_id": ds, "node_uuid": B, "expires": 60},
                     identity=NODE_B)
            self.req("DELETE", f"{LEASES}/{ds}", identity=NODE_B)
            self.req("DELETE", f"{DATASETS}/{ds}")
        audit = [(e["event_type"], e["certificate"], e["dataset_id"]) for e in events
                 if "certificate" in e and "dataset_id" in e]
        self.assertEqual(audit, [
            ("pyflock:control:dataset-created", f"node-{A}", ds),
            ("pyflock:control:dataset-moved", "user-alice", ds),
            ("pyflock:control:lease-acquired", f"node-{B}", ds),
            ("pyflock:control:lease-released", f"node-{B}", ds),
            ("pyflock:control:dataset-deleted", "user-alice", ds),
        ])
