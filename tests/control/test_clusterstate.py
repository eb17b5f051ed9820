"""
Forgetting dead nodes (``ClusterStateService.forget``, ``forget_dead`` and the sweep):
only a dead node that is the primary of no live dataset and holds no lease goes, on the
service's clock.
"""

from __future__ import annotations

import contextlib
import io

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._logging import events_of
from pyflock.common._model import Configuration, Dataset
from pyflock.control._clusterstate import (
    ClusterStateService, NodeAlive, NodeHolds, NodeState, NodeUnknown,
)
from pyflock.control._script import _parser

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
DATASET = "dddddddd-0000-4000-8000-000000000001"
EXPIRY = 30.0
FORGET_AFTER = 1000.0


class ClusterTestCase(SynchronousTestCase):
    """A cluster state on a ``Clock`` where ``NODES`` have just been heard from."""

    NODES = (A,)

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(10_000)
        self.cluster = ClusterStateService(self.clock, node_expiry=EXPIRY,
                                           forget_after=FORGET_AFTER)
        for uuid in self.NODES:
            self.cluster.update(self.cluster.state.update_node(
                NodeState(uuid=uuid, host="10.0.0.1", last_seen=self.clock.seconds())))
        self.config = Configuration()


class ForgetTests(ClusterTestCase):
    """A user forgets a node only when it is dead and holds nothing."""

    def test_forget_dead_node(self):
        """A dead node holding nothing is forgotten, the version moves and an event says so."""
        self.clock.advance(EXPIRY + 5)
        version = self.cluster.version
        with capturedLogs() as events:
            node = self.cluster.forget(A, Configuration())
        self.assertEqual((A, "10.0.0.1"), (node.uuid, node.host))
        self.assertNotIn(A, self.cluster.state.nodes)
        self.assertEqual(version + 1, self.cluster.version)
        [event] = events_of(events, "pyflock:control:node-forgotten")
        self.assertEqual((A, "10.0.0.1", "user", 5.0),
                         (event["node_uuid"], event["host"], event["reason"],
                          event["dead_for"]))

    def test_live_node_refused(self):
        """A node heard from within the expiry is alive and is kept, saying what to do."""
        self.clock.advance(EXPIRY - 1)
        error = self.assertRaises(NodeAlive, self.cluster.forget, A, Configuration())
        self.assertIn("Stop its agent", error.description)
        self.assertIn(A, self.cluster.state.nodes)

    def test_primary_refused(self):
        """A dead node that is the primary of a live dataset is kept, naming the dataset."""
        self.clock.advance(EXPIRY)
        config = Configuration().create(Dataset(dataset_id=DATASET, primary=A))
        error = self.assertRaises(NodeHolds, self.cluster.forget, A, config)
        self.assertEqual(("primary", (DATASET,)), (error.holds, error.dataset_ids))
        self.assertIn("move them to another node or delete them", error.description)
        self.assertIn(A, self.cluster.state.nodes)

    def test_deleted_dataset_does_not_hold(self):
        """A deleted dataset does not keep its primary from being forgotten."""
        self.clock.advance(EXPIRY)
        config = Configuration().create(Dataset(dataset_id=DATASET, primary=A)).delete(
            self.clock.seconds(), DATASET)
        self.cluster.forget(A, config)
        self.assertNotIn(A, self.cluster.state.nodes)

    def test_lease_refused(self):
        """A dead node holding a lease on another node's dataset is kept, naming it."""
        self.clock.advance(EXPIRY)
        config = Configuration().create(Dataset(dataset_id=DATASET, primary=B)) \
            .acquire_lease(self.clock.seconds(), DATASET, A, None)
        error = self.assertRaises(NodeHolds, self.cluster.forget, A, config)
        self.assertEqual(("lease", (DATASET,)), (error.holds, error.dataset_ids))
        self.assertIn("release those leases", error.description)

    def test_expired_lease_does_not_hold(self):
        """A lease that has run out does not keep its node."""
        config = Configuration().create(Dataset(dataset_id=DATASET, primary=B)) \
            .acquire_lease(self.clock.seconds(), DATASET, A, 10)
        self.clock.advance(EXPIRY)
        self.cluster.forget(A, config)
        self.assertNotIn(A, self.cluster.state.nodes)

    def test_unknown_node(self):
        """A node never heard of (or forgotten already) is refused as unknown."""
        self.clock.advance(EXPIRY)
        self.cluster.forget(A, Configuration())
        self.assertRaises(NodeUnknown, self.cluster.forget, A, Configuration())


class ForgetDeadTests(ClusterTestCase):
    """Nodes dead longer than ``forget_after`` that hold nothing are forgotten on a timer."""

    NODES = (A, B)

    def test_not_before_deadline(self):
        """A node dead for a little less than ``forget_after`` stays."""
        self.clock.advance(EXPIRY + FORGET_AFTER - 0.5)
        self.assertEqual([], self.cluster.forget_dead(self.config))
        self.assertEqual({A, B}, set(self.cluster.state.nodes))

    def test_after_deadline(self):
        """Once dead for ``forget_after``, nodes holding nothing go; one holding a dataset
        stays."""
        self.config = Configuration().create(Dataset(dataset_id=DATASET, primary=B))
        self.clock.advance(EXPIRY + FORGET_AFTER)
        with capturedLogs() as events:
            forgotten = self.cluster.forget_dead(self.config)
        self.assertEqual([A], [n.uuid for n in forgotten])
        self.assertEqual({B}, set(self.cluster.state.nodes))
        [event] = events_of(events, "pyflock:control:node-forgotten")
        self.assertEqual(("dead", FORGET_AFTER), (event["reason"], event["dead_for"]))

    def test_sweep_on_clock(self):
        """``start_forgetting`` forgets on the service's clock, within one sweep interval
        of the deadline, until ``stop_forgetting``."""
        self.cluster.start_forgetting(lambda: self.config)
        self.clock.advance(EXPIRY + FORGET_AFTER - 1)
        self.assertEqual({A, B}, set(self.cluster.state.nodes))
        self.clock.advance(60)
        self.assertEqual({}, dict(self.cluster.state.nodes))
        self.cluster.stop_forgetting()
        self.assertEqual([], self.clock.getDelayedCalls())

    def test_sweep_survives_errors(self):
        """A sweep that fails is logged, and the next sweep still runs."""
        calls = []

        def configuration():
            calls.append(None)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return self.config
        self.cluster.start_forgetting(configuration)
        self.addCleanup(self.cluster.stop_forgetting)
        with capturedLogs() as events:
            self.clock.advance(60)
        [event] = events_of(events, "pyflock:control:node-forget-failed")
        self.assertIn("boom", event["reason"])
        self.clock.advance(EXPIRY + FORGET_AFTER)
        self.assertEqual({}, dict(self.cluster.state.nodes))


class FlagTests(SynchronousTestCase):
    """``pyflock-control --forget-dead-nodes SECONDS``."""

    def test_default_is_seven_days(self):
        """Without the flag, dead nodes are forgotten after 7 days (604800 s)."""
        self.assertEqual(604800.0, _parser().parse_args(["run"]).forget_dead_nodes)
        self.assertEqual(5.0, _parser().parse_args(
            ["run", "--forget-dead-nodes", "5"]).forget_dead_nodes)

    def test_refuses_non_positive(self):
        """Zero or a negative number of seconds is refused."""
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertRaises(SystemExit, _parser().parse_args,
                              ["--forget-dead-nodes", "0"])
        self.assertIn("'0' is not a positive number of seconds", err.getvalue())
