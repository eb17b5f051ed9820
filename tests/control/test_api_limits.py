"""
The REST API's limits in memory (issue 8): bounded node leases, body size and JSON that
cannot be parsed safely, the per-node dataset quota and write rate, and the audit trail.
"""

from twisted.trial.unittest import SynchronousTestCase

from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


class NodeLeaseTests(SynchronousTestCase):
    """A node certificate takes only its own leases, of 1 to 300 seconds."""

    def setUp(self):
        self.h = APIHarness()
        self.assertEqual(self.req("POST", DATASETS, {"primary": A, "dataset_id": DS}).code,
                         201)

    def req(self, *args, **kwargs):
        """One request through the harness."""
        return self.h.request(self, *args, **kwargs)

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
