"""
``DELETE /v1/state/nodes/<uuid>`` (a pyflock addition): a user forgets a dead node that
holds no dataset and no lease; every answer matches the OpenAPI document.
"""

from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._tls import AGENT_CHANNEL
from pyflock.control._agentchannel import AgentChannelServer
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness
from tests.control.test_agentchannel import RawAgent

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"


class ForgetNodeTests(SynchronousTestCase):
    """Who may forget a node, and which nodes may be forgotten."""

    def setUp(self):
        self.h = APIHarness()
        self.h.report_node(A, "10.0.0.1", silent=self.h.cluster.node_expiry + 10)
        self.h.report_node(B, "10.0.0.2")

    def forget(self, uuid, identity=ALICE):
        """DELETE the node as ``identity``."""
        return self.h.request(self, "DELETE", f"/v1/state/nodes/{uuid}", identity=identity)

    def test_forget_dead_node(self):
        """A user forgets a dead node: 200 with the node, which is no longer listed."""
        r = self.forget(A.upper())
        self.assertEqual((200, {"uuid": A, "host": "10.0.0.1", "alive": False,
                                "last_seen": 40.0, "zone": None}), (r.code, r.json))
        listed = self.h.request(self, "GET", "/v1/state/nodes").json
        self.assertEqual([B], [n["uuid"] for n in listed])

    def test_node_certificate_refused(self):
        """A node certificate may not forget any node, even a dead one: 403."""
        r = self.forget(A, identity=NODE_B)
        self.assertEqual(403, r.code)
        self.assertIn("Only a user certificate may forget a node", r.json["description"])
        self.assertIn(A, self.h.cluster.state.nodes)

    def test_live_node_conflict(self):
        """A live node is refused with 409 saying what to do."""
        r = self.forget(B)
        self.assertEqual(409, r.code)
        self.assertIn("only a dead node can be forgotten", r.json["description"])

    def test_primary_conflict(self):
        """A dead node that is a live dataset's primary is refused with 409."""
        self.h.request(self, "POST", "/v1/configuration/datasets",
                       {"dataset_id": DS, "primary": A})
        r = self.forget(A)
        self.assertEqual(409, r.code)
        self.assertIn(DS, r.json["description"])

    def test_unknown_node(self):
        """A node never heard of answers 404."""
        r = self.forget("99999999-0000-4000-8000-000000000009")
        self.assertEqual(404, r.code)
        self.assertIn("is known", r.json["description"])

    def test_bad_uuid(self):
        """Something that is not a uuid answers 400."""
        r = self.forget("not-a-uuid")
        self.assertEqual((400, "'not-a-uuid' is not a node uuid."),
                         (r.code, r.json["description"]))


class ChannelTests(SynchronousTestCase):
    """The agent channel forgets a forgotten node too."""

    def test_snapshot_leaves_forgotten_node_out(self):
        """Once a dead node is forgotten, snapshots sent to agents no longer list it."""
        h = APIHarness()
        server = AgentChannelServer(h.configuration, h.cluster, h.clock,
                                    identify=lambda transport: AGENT_CHANNEL.admit(
                                        transport.identity))
        server.start()
        self.addCleanup(server.stop)
        agent = RawAgent(server, NODE_A)
        agent.hello()
        agent.lose()
        h.clock.advance(h.cluster.node_expiry)
        self.assertEqual([A], [n.uuid for n in server.snapshot().nodes])
        self.assertEqual(200, h.request(self, "DELETE", f"/v1/state/nodes/{A}").code)
        self.assertEqual((), server.snapshot().nodes)
