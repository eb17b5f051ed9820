"""
The agent channel's part in the shared cluster state (issue 9, point 3), in memory on a
Clock: which reports it hands on to be published (a hello claims, a changed report
publishes, a heartbeat nothing, a silent node is withdrawn and waits for the leader's mark,
a forgotten node's mark goes), and how another replica's reports and the leader's marks
merge into this one's state; a node another replica forgot (its mark deleted, no report in
the batch) is forgotten here; and ``GET /v1/state/control``.
"""

from __future__ import annotations

import attr
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._wire import DatasetReport, Diff, Heartbeat, StateReport
from pyflock.control._clusterstate import NodeState
from pyflock.control._etcd_model import Keys
from pyflock.control._etcd_state import SharedReports
from pyflock.control._etcd_state_model import ReplicaInfo, ReportEvent, encode_report
from pyflock.control.testing import ALICE, NODE_A, NODE_B
from tests.control import test_agentchannel as base

A, B, DS = base.A, base.B, base.DS


class RecordedReports:
    """Records what the channel asks to publish, as ``SharedReports`` would receive it."""

    replica = ReplicaInfo("c1", "c1.example:4523", 0.0)

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []

    def claim(self, node: NodeState) -> None:
        """A hello."""
        self.calls.append(("claim", node.uuid, tuple(sorted(node.datasets))))

    def publish(self, node: NodeState) -> None:
        """A changed report."""
        self.calls.append(("publish", node.uuid, tuple(sorted(node.datasets))))

    def withdraw(self, node: NodeState) -> None:
        """A node gone silent."""
        self.calls.append(("withdraw", node.uuid, tuple(sorted(node.datasets))))

    def forget(self, uuid: str) -> None:
        """A dead node forgotten."""
        self.calls.append(("forget", uuid, ()))


def remote_node(datasets=(DS,), replica="c2") -> NodeState:
    """Node B as replica ``replica`` publishes it, holding ``datasets``."""
    return NodeState(uuid=B, host="127.0.0.9", last_seen=0.0, peer_port=4525,
                     remote=replica, datasets={
                         d: DatasetReport(d, "mounted", "/m", None, B) for d in datasets})


class SharedReportsTests(SynchronousTestCase):
    """The channel's hooks to ``SharedReports``, on the harness of ``ServerTests``."""

    setUp = base.ServerTests.setUp
    tearDown = base.ServerTests.tearDown
    change = base.ServerTests.change
    create = base.ServerTests.create
    connect = base.ServerTests.connect
    get = base.ServerTests.get

    def start_server(self):
        """A started server whose reports are recorded."""
        self.reports = RecordedReports()
        server = base.ServerTests.start_server(self)
        server.shared._reports = self.reports
        return server

    def test_published_on_change_not_on_heartbeat(self):
        """A hello claims, a changed report publishes, heartbeats and repeats publish nothing."""
        self.create()
        agent, _ = self.connect()
        report = StateReport(node_uuid=A, datasets=(DatasetReport(DS, "mounted", "/m"),))
        for _ in range(3):
            agent.send(report)
            agent.send(Heartbeat())
            self.clock.advance(1)
        self.assertEqual(self.reports.calls, [("claim", A, ()), ("publish", A, (DS,))])

    def test_silent_node_withdrawn(self):
        """A node silent for the expiry is withdrawn."""
        self.connect()
        self.clock.advance(self.h.cluster.node_expiry)
        self.assertEqual(self.reports.calls[-1], ("withdraw", A, ()))

    def test_silent_node_waits_for_the_leaders_mark(self):
        """A node silent here is hung up on and withdrawn, but shown as it was, published
        by this replica, as the other replicas show it, until the leader's mark comes
        (``merge(uuid, None)``): only then is it dead, holding nothing, agents told."""
        self.create()
        agent, _ = self.connect()
        agent.send(StateReport(node_uuid=A, datasets=(DatasetReport(DS, "mounted", "/m"),)))
        other, _ = self.connect(NODE_B)
        other.received()
        self.clock.advance(self.h.cluster.node_expiry - 1)
        other.send(Heartbeat())
        self.clock.advance(1)
        self.assertEqual((self.reports.calls[-1], agent.closed), (("withdraw", A, (DS,)), True))
        self.assertEqual({n["uuid"]: n["alive"] for n in self.get("/v1/state/nodes")},
                         {A: True, B: True})
        self.assertEqual([d["primary"] for d in self.get("/v1/state/datasets")], [A])
        self.assertEqual(self.h.cluster.state.nodes[A].remote, "c1")
        self.assertEqual([m for m in other.received() if isinstance(m, Diff)], [])
        self.server.shared.merge(A, None)
        self.assertEqual({n["uuid"]: n["alive"] for n in self.get("/v1/state/nodes")},
                         {A: False, B: True})
        self.assertEqual(self.get("/v1/state/datasets"), [])
        diffs = [m for m in other.received() if isinstance(m, Diff)]
        self.assertEqual(([n.alive for d in diffs for n in d.nodes],
                          [e.holders for d in diffs for e in d.datasets]), ([False], [()]))

    def test_dead_node_never_seen_is_listed_as_marked(self):
        """A mark of a node this replica never saw (it started since the node's report
        vanished) lists the node dead, as the mark describes it."""
        self.server.shared.merge(B, None, remote_node().set(datasets={}))
        [node] = self.get("/v1/state/nodes")
        self.assertEqual((node["uuid"], node["host"], node["alive"]), (B, "127.0.0.9", False))
        self.assertEqual(self.server.snapshot().nodes[0].alive, False)

    def test_forgotten_node_forgets_its_mark(self):
        """Forgetting a dead node asks for its death mark to be deleted."""
        self.server.shared.merge(B, None, remote_node().set(datasets={}))
        self.clock.advance(self.h.cluster.node_expiry)
        self.h.cluster.forget(B, self.configuration.committed)
        self.assertEqual(self.reports.calls, [("forget", B, ())])

    def test_node_forgotten_elsewhere_is_forgotten_here(self):
        """A dead node another replica forgot leaves this replica's state and snapshots
        too, with no mark deleted again; a live remote node stays."""
        self.server.shared.merge(B, None, remote_node().set(datasets={}))
        self.server.shared.merge(A, remote_node(datasets=()).set(uuid=A))
        self.server.shared.forgotten(B)
        self.server.shared.forgotten(A)
        self.assertEqual(([n["uuid"] for n in self.get("/v1/state/nodes")],
                          [n.uuid for n in self.server.snapshot().nodes], self.reports.calls),
                         ([A], [A], []))

    def test_remote_report_shown_and_pushed(self):
        """Another replica's report shows in the state API and reaches agents as holders."""
        self.create(primary=B)
        agent, _ = self.connect()
        self.server.shared.merge(B, remote_node())
        self.assertEqual(sorted(n["uuid"] for n in self.get("/v1/state/nodes") if n["alive"]),
                         sorted([A, B]))
        self.assertEqual([d["primary"] for d in self.get("/v1/state/datasets")], [B])
        diffs = [m for m in agent.received() if isinstance(m, Diff)]
        self.assertEqual(diffs[-1].datasets[0].holders, (B,))

    def test_vanished_report_is_a_dead_node(self):
        """A remote report that vanishes leaves the node dead, holding nothing."""
        self.create(primary=B)
        self.server.shared.merge(B, remote_node())
        self.server.shared.merge(B, None)
        [node] = [n for n in self.get("/v1/state/nodes") if n["uuid"] == B]
        self.assertFalse(node["alive"])
        self.assertEqual(self.get("/v1/state/datasets"), [])

    def test_agent_moved_away_is_not_expired_here(self):
        """Once another replica publishes a node connected here, its connection here is
        closed and its expiry here neither kills nor withdraws it."""
        agent, _ = self.connect()
        self.server.shared.merge(A, remote_node(replica="c2").set(uuid=A, datasets={}))
        self.assertTrue(agent.closed)
        self.clock.advance(self.h.cluster.node_expiry * 2)
        self.assertNotIn(("withdraw", A, ()), self.reports.calls)
        [node] = self.get("/v1/state/nodes")
        self.assertTrue(node["alive"])

    def test_agent_coming_back_is_claimed_with_what_it_held(self):
        """An agent that says hello here after another replica published it is claimed
        at once, with the datasets that replica published."""
        self.create()
        self.server.shared.merge(A, remote_node().set(uuid=A))
        self.connect()
        self.assertEqual(self.reports.calls, [("claim", A, (DS,))])


class MarkDeletedTests(SynchronousTestCase):
    """``SharedReports`` judges a deleted death mark once its whole batch is applied."""

    def setUp(self):
        self.reports = SharedReports(Clock(), None, Keys.under("/t"),
                                     ReplicaInfo("c1", "c1.example:4523", 0.0))
        self.merged, self.forgotten = [], []
        self.reports._merge = lambda uuid, node, last=None: self.merged.append(uuid)
        self.reports.on_forgotten = self.forgotten.append

    def test_mark_deleted_alone_forgets(self):
        """A mark deleted with no report in its batch: the node is forgotten here."""
        self.reports._apply_all([ReportEvent(B, 5, death=True)])
        self.assertEqual((self.forgotten, self.reports.deaths.unmarked), ([B], set()))

    def test_claim_is_not_forgotten(self):
        """A claim's batch (the mark deleted, the report put), in either order, forgets
        nothing: the node is remote."""
        put = ReportEvent(B, 5, lease=7, value=encode_report("c2", remote_node()))
        self.reports._apply_all([ReportEvent(B, 5, death=True), put])
        self.assertEqual((self.forgotten, self.merged), ([], [B]))
        self.reports._apply_all([attr.evolve(put, revision=6), ReportEvent(B, 6, death=True)])
        self.assertEqual(self.forgotten, [])

    def test_full_read_without_a_seen_mark_forgets(self):
        """A full read (after a compacted watch) that no longer finds a mark seen before
        forgets the node, as the missed delete would have."""
        class Gateway:
            """etcd holding no report and no mark."""

            async def call(self, path, body):
                """Any read finds nothing."""
                return {"header": {"revision": "9"}, "kvs": []}
        self.reports._gateway = Gateway()
        mark = ReportEvent(B, 5, value=encode_report("c2", remote_node()), death=True)
        self.reports._apply_all([mark])
        self.successResultOf(Deferred.fromCoroutine(self.reports._resync()))
        self.assertEqual((self.merged, self.forgotten, self.reports.deaths.marks),
                         ([B], [B], set()))


class ControlStatusTests(SynchronousTestCase):
    """``GET /v1/state/control`` on the in-memory harness."""

    def setUp(self):
        from pyflock.control.testing import APIHarness
        self.h = APIHarness()

    def test_single_replica(self):
        """Without replicas, one replica answers and leads, on SQLite, for users and nodes."""
        for identity in (ALICE, NODE_A):
            body = self.h.request(self, "GET", "/v1/state/control", identity=identity).json
            self.assertEqual((body["store"], body["leader"], len(body["replicas"]),
                              body["etcd_members"]), ("sqlite", "control", 1, []))

    def test_etcd_not_answering(self):
        """A status that etcd does not answer is a 503 saying so."""
        self.h.status = lambda: fail(RuntimeError("no member answered"))
        response = self.h.request(self, "GET", "/v1/state/control")
        self.assertEqual(response.code, 503)
        self.assertIn("no member answered", response.json["description"])
