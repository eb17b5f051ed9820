"""
Issue 12 point 3: the agents' view goes on across a restart of the control service. The
stopping server writes its view and recent diffs to a checkpoint; the next run reads it
once, keeps the epoch and version, pushes what changed in the store meanwhile as a diff,
and agents reconnecting with their version get diffs, not a snapshot. Reconnecting agents
are admitted at a bounded rate.
"""

import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._view import AgentView
from pyflock.common._wire import Diff, Snapshot, StateReport, Welcome, encode
from pyflock.common._records import DatasetReport
from pyflock.control._agentchannel import AgentChannelServer
from pyflock.control._clusterstate import ClusterStateService
from pyflock.control._viewlog import (
    Admissions, CheckpointInvalid, TokenBucket, ViewLog, checkpoint_bytes, read_checkpoint,
)
from pyflock.common._tls import AGENT_CHANNEL
from pyflock.control.testing import NODE_A, NODE_B
from tests.control import test_agentchannel as base
from tests.control.test_agentchannel import RawAgent
from tests.control.test_agentchannel_history import IDS, view_of

A, B = NODE_A.node_uuid, NODE_B.node_uuid


def test_checkpoint_reads_back_what_was_written():
    """A view and its diffs come back from their checkpoint as they were."""
    log = ViewLog()
    for version in (2, 3):
        log.record(version, encode(Diff(epoch="e", version=version)))
    view = Snapshot(epoch="e", version=3)
    assert read_checkpoint(checkpoint_bytes(view, log.kept())) == (view, log.kept())


@pytest.mark.parametrize("data", [b"", b"not zlib", zlib.compress(b"\0\0\0\2{}")])
def test_unreadable_checkpoint_says_why(data):
    """Bytes that are no checkpoint raise ``CheckpointInvalid`` (the run starts anew)."""
    with pytest.raises(CheckpointInvalid):
        read_checkpoint(data)


class RestartTests(SynchronousTestCase):
    """Two runs of the server on one configuration, each with its own cluster state (held
    in memory, as after a restart), sharing a checkpoint file."""

    setUp = base.ServerTests.setUp
    change = base.ServerTests.change
    create = base.ServerTests.create

    def start_server(self, cluster=None) -> AgentChannelServer:
        if not hasattr(self, "path"):
            folder = Path(tempfile.mkdtemp())
            self.addCleanup(shutil.rmtree, folder)
            self.path = folder / "agent-view.checkpoint"
        server = AgentChannelServer(self.configuration, cluster or self.h.cluster, self.clock,
                                    identify=lambda transport: AGENT_CHANNEL.admit(
                                        transport.identity), checkpoint=self.path)
        server.start()
        return server

    def tearDown(self):
        self.server.stop()

    def restart(self) -> None:
        """Stop the server (it writes its checkpoint), then start a new run with an empty
        cluster state."""
        self.server.stop()
        self.server = self.start_server(ClusterStateService(
            self.clock, node_expiry=self.h.cluster.node_expiry))

    def synced_agent(self, identity=NODE_A, held=()):
        """An agent with the whole view, reporting ``held``; it and its view."""
        agent = RawAgent(self.server, identity)
        received = agent.hello()
        received += agent.send(StateReport(
            node_uuid=identity.node_uuid, view=view_of(received).current,
            datasets=tuple(DatasetReport(dataset_id=i, state="mounted") for i in held)))
        return agent, view_of(received)

    def test_reconnecting_after_a_restart_gets_diffs(self):
        """After a restart during which a dataset was created, an agent reconnecting with
        its version gets a welcome of the same epoch and the diffs since, no snapshot, and
        ends on the server's view, holders included."""
        for number, dataset_id in enumerate(IDS[:3]):
            self.create(dataset_id, name=f"d{number}")
        agent, view = self.synced_agent(held=IDS[:1])
        epoch = self.server.epoch
        self.restart()
        self.assertFalse(self.path.exists())  # read once
        self.create(IDS[4], name="while-restarted")
        received = RawAgent(self.server, NODE_A).hello(known=view.current)
        self.assertEqual(self.server.epoch, epoch)
        self.assertNotIn(Snapshot, [type(m) for m in received])
        self.assertEqual(type(received[0]), Welcome)
        for message in received[1:]:
            view = view.apply(message)
        self.assertEqual(view.current, self.server.current)
        self.assertEqual(view.datasets, AgentView().apply(self.server.snapshot()).datasets)
        self.assertEqual(view.datasets[IDS[0]].holders, (A,))

    def test_report_matching_the_presumed_holdings_pushes_nothing(self):
        """The restored view presumes a node holds what it held; its first report saying
        so is no change."""
        self.create(IDS[0])
        _, view = self.synced_agent(held=IDS[:1])
        self.restart()
        agent = RawAgent(self.server, NODE_A)
        agent.hello(known=view.current)
        version = self.server.version
        agent.send(StateReport(node_uuid=A, view=self.server.current,
                               datasets=(DatasetReport(dataset_id=IDS[0], state="mounted"),)))
        self.assertEqual(self.server.version, version)

    def test_node_that_does_not_come_back_is_dead(self):
        """A node of the restored view silent for the node expiry is dead in the view, and
        what it was presumed to hold is released."""
        self.create(IDS[0], primary=B)
        self.synced_agent(NODE_B, held=IDS[:1])
        self.restart()
        self.clock.advance(self.h.cluster.node_expiry)
        snapshot = self.server.snapshot()
        self.assertEqual([n.alive for n in snapshot.nodes if n.uuid == B], [False])
        self.assertEqual([d.holders for d in snapshot.datasets], [()])

    def test_run_without_checkpoint_starts_a_new_epoch(self):
        """A run that ended without writing a checkpoint (a crash) leaves the next run
        none: it starts a new epoch, and agents get a snapshot."""
        self.create(IDS[0])
        _, view = self.synced_agent()
        self.restart()
        epoch = self.server.epoch
        self.server = self.start_server()  # the previous run "crashed": no stop
        self.assertNotEqual(self.server.epoch, epoch)
        received = RawAgent(self.server, NODE_A).hello(known=view.current)
        self.assertIn(Snapshot, [type(m) for m in received])



# -- admission at a bounded rate (issue 12 point 3) ------------------------------------------


def test_token_bucket_admits_a_burst_then_at_its_rate():
    """A burst is admitted at once; then one per 1/rate seconds, saying how long to wait."""
    bucket = TokenBucket(rate=2.0, burst=2)
    assert [bucket.take(0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(0.0) == 0.5
    assert bucket.take(0.25) == 0.25
    assert bucket.take(0.5) == 0.0


class AdmissionTests(SynchronousTestCase):
    """Hellos past the rate wait their turn, in order, welcomed once it comes."""

    setUp = base.ServerTests.setUp
    tearDown = base.ServerTests.tearDown
    start_server = base.ServerTests.start_server

    def test_hello_past_the_rate_waits_its_turn(self):
        """With one hello a second, a second agent saying hello at once is welcomed a
        second later, not before."""
        self.server.admission = Admissions(self.clock, rate=1.0, burst=1)
        first = RawAgent(self.server, NODE_A).hello()
        self.assertEqual(type(first[0]), Welcome)
        waiting = RawAgent(self.server, NODE_B)
        self.assertEqual(waiting.hello(), [])
        self.assertEqual(self.server.admission.waiting, 1)
        self.clock.advance(1.0)
        self.assertEqual(type(waiting.received()[0]), Welcome)

    def test_agent_gone_while_waiting_is_never_welcomed(self):
        """A connection lost while it waits leaves the line; the next is admitted."""
        self.server.admission = Admissions(self.clock, rate=1.0, burst=1)
        RawAgent(self.server, NODE_A).hello()
        gone = RawAgent(self.server, NODE_B)
        gone.hello()
        gone.lose()
        self.assertEqual(self.server.admission.waiting, 0)
        self.clock.advance(1.0)
        self.assertNotIn(B, self.server.connected_nodes)

    def test_no_rate_admits_everyone_at_once(self):
        """A rate of 0 (``--agent-admission-rate 0``) admits every hello at once."""
        self.server.admission = Admissions(self.clock, rate=0)
        for identity in (NODE_A, NODE_B):
            self.assertEqual(type(RawAgent(self.server, identity).hello()[0]), Welcome)
