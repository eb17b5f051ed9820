"""
The agent channel's server against a hostile or a very big cluster's node (issue 8), in
memory on a Clock: one snapshot under way per connection, a node that does not read is
dropped, agents' frames are small, snapshots come in pages (protocol 3) or are refused
to a version 2 agent when too big, big diffs go as several, a report names only
configured datasets, and no node holds back a purge past the deadline.
"""

import struct

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import Dataset
from pyflock.common._tls import AGENT_CHANNEL
from pyflock.common._wire import (
    AGENT_MESSAGE_LIMIT, DatasetReport, Diff, Heartbeat, Hello, Snapshot, StateReport,
    SyncRequest, ViewVersion, Welcome, join_pages, snapshot_pages,
)
from pyflock.control._agentchannel import AgentChannelServer
from pyflock.control._clusterstate import Tombstone, purgeable, NodeState
from pyflock.control.testing import NODE_A, NODE_B, APIHarness
from tests.control.test_agentchannel import RawAgent

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"


def dataset_id(number: int) -> str:
    """The uuid of test dataset ``number``."""
    return f"{number:08x}-0000-4000-8000-000000000000"


class LimitTests(SynchronousTestCase):
    """The server with small limits, on a Clock."""

    def setUp(self):
        self.h = APIHarness()
        self.clock = self.h.clock
        self.server = AgentChannelServer(
            self.h.configuration, self.h.cluster, self.clock,
            identify=lambda transport: AGENT_CHANNEL.admit(transport.identity),
            send_limit=20_000, page_size=4096, purge_deadline=600)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.clock.advance(self.h.cluster.node_expiry)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def create(self, *numbers, metadata_size=200):
        """Create datasets ``numbers`` with ``metadata_size`` characters of metadata."""
        def transform(config):
            for number in numbers:
                config = config.create(Dataset(
                    dataset_id=dataset_id(number), primary=A,
                    metadata={"name": f"ds{number}", "blob": "é" * metadata_size}))
            return config
        self.successResultOf(self.h.configuration.change(
            [dataset_id(n) for n in numbers], transform))
        self.h.clock.advance(0)

    def connect(self, identity=NODE_A):
        """A welcomed agent (protocol 3) and what it was sent first."""
        agent = RawAgent(self.server, identity)
        return agent, agent.hello()

    def of(self, event_type):
        """The log events of one type."""
        return [e for e in self.events if e.get("event_type") == event_type]

    def test_snapshot_in_pages(self):
        """A protocol 3 agent gets the snapshot in pages within the page size."""
        self.create(*range(30))
        agent, [welcome, *pages] = self.connect()
        self.assertGreater(len(pages), 3)
        self.assertEqual(join_pages(pages), self.server.snapshot())
        sizes = [len(p) for p in snapshot_pages(self.server.snapshot(), 4096)]
        self.assertLessEqual(max(sizes), 4096)

    def test_syncs_while_a_snapshot_is_under_way_are_ignored(self):
        """However many syncs a node sends while it does not read, one snapshot waits."""
        self.create(*range(30))
        agent, _ = self.connect()
        agent.protocol.pauseProducing()  # the transport's buffer is full
        for _ in range(1000):
            self.assertEqual(agent.send(SyncRequest()), [])
        self.assertTrue(agent.protocol.streaming)
        self.assertEqual(agent.protocol.unsent, 0)
        agent.protocol.resumeProducing()
        pages = agent.received()
        self.assertEqual(join_pages(pages), self.server.snapshot())
        self.assertFalse(agent.closed)

    def test_node_not_reading_is_dropped(self):
        """A node that lets more than the send limit wait is dropped; others carry on."""
        agent, _ = self.connect()
        other, _ = self.connect(NODE_B)
        agent.protocol.pauseProducing()
        for number in range(40):
            self.create(number)
        self.assertTrue(agent.closed)
        agent.lose()
        self.assertEqual(self.server.connected_nodes, {B})
        [event] = self.of("pyflock:control:channel-overflow")
        self.assertEqual(event["limit"], 20_000)
        self.assertEqual(len([m for m in other.received() if isinstance(m, Diff)]), 40)

    def test_big_diff_goes_as_consecutive_diffs(self):
        """A change too big for a page is pushed as diffs of consecutive versions."""
        agent, _ = self.connect()
        version = self.server.version
        self.create(*range(30))
        diffs = agent.received()
        self.assertGreater(len(diffs), 3)
        self.assertEqual([d.version for d in diffs],
                         list(range(version + 1, self.server.version + 1)))
        self.assertEqual(sorted(e.dataset_id for d in diffs for e in d.datasets),
                         sorted(dataset_id(n) for n in range(30)))

    def test_agent_frame_over_limit_refused(self):
        """An agent's frame announced over 1 MiB is refused before it is read."""
        self.assertEqual(AgentChannelServer(self.h.configuration, self.h.cluster, self.clock,
                                            identify=None).agent_message_limit,
                         AGENT_MESSAGE_LIMIT)
        agent, _ = self.connect()
        agent.protocol.dataReceived(struct.pack("!I", AGENT_MESSAGE_LIMIT + 1))
        [error] = agent.received()
        self.assertEqual(error.code, "too-large")
        self.assertTrue(agent.closed)

    def test_hello_with_bad_address_refused(self):
        """A hello whose address is no IP address or host name is refused clearly."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.send(Hello(node_uuid=A, era="e", address="evil host\n"))
        self.assertEqual(error.code, "bad-message")
        self.assertIn("hello.address must be an IP address or a host name", error.reason)
        self.assertEqual(dict(self.h.cluster.state.nodes), {})

    def test_report_of_unconfigured_datasets_logged_and_ignored(self):
        """A report naming datasets the configuration lacks stores only the others."""
        self.create(1)
        agent, _ = self.connect()
        agent.send(StateReport(node_uuid=A, datasets=tuple(
            DatasetReport(dataset_id=dataset_id(n), state="mounted") for n in range(1000))))
        self.assertEqual(list(self.h.cluster.state.nodes[A].datasets), [dataset_id(1)])
        [event] = self.of("pyflock:control:report-unknown-datasets")
        self.assertEqual((event["count"], len(event["dataset_ids"])), (999, 10))

    def test_node_never_acknowledging_holds_purge_back_until_deadline(self):
        """A node that never acknowledges a view, and one that keeps reporting a deleted
        dataset, hold its purge back only until the deadline."""
        self.create(1)
        a, _ = self.connect()
        b, _ = self.connect(NODE_B)
        a.send(StateReport(node_uuid=A, view=self.server.current, datasets=(
            DatasetReport(dataset_id=dataset_id(1), state="deleting"),)))
        self.successResultOf(self.h.configuration.change(
            [dataset_id(1)], lambda c: c.delete(self.clock.seconds(), dataset_id(1))))
        self.h.clock.advance(0)
        for _ in range(59):
            self.clock.advance(10)
            a.send(StateReport(node_uuid=A, view=self.server.current, datasets=(
                DatasetReport(dataset_id=dataset_id(1), state="deleting"),)))
            b.send(Heartbeat(view=None))
        self.assertIn(dataset_id(1), self.h.configuration.committed.datasets)
        self.clock.advance(10)
        self.assertNotIn(dataset_id(1), self.h.configuration.committed.datasets)


def test_purgeable_rule():
    """A live node holds a purge back by holding or not acknowledging, until the deadline."""
    tombstones = {DS: Tombstone(version=5, seen=100.0)}
    holding = NodeState(uuid=A, host="h", last_seen=0, datasets={
        DS: DatasetReport(dataset_id=DS, state="deleting")})
    idle = NodeState(uuid=B, host="h", last_seen=0)
    assert purgeable(tombstones, [idle], {B: 5}, 101, 60) == [DS]
    assert purgeable(tombstones, [idle], {B: 4}, 101, 60) == []
    assert purgeable(tombstones, [holding], {A: 5}, 101, 60) == []
    assert purgeable(tombstones, [holding, idle], {}, 160, 60) == [DS]
    assert purgeable(tombstones, [], {}, 101, 60) == [DS]


def test_welcome_first_then_pages():
    """The welcome goes before the snapshot's pages (the connection's order)."""
    h = APIHarness()
    server = AgentChannelServer(h.configuration, h.cluster, h.clock,
                                identify=lambda t: AGENT_CHANNEL.admit(t.identity),
                                page_size=2048)
    server.start()
    agent = RawAgent(server, NODE_A)
    messages = agent.hello(known=ViewVersion("old", 1))
    assert isinstance(messages[0], Welcome) and isinstance(messages[1], Snapshot)
    server.stop()
