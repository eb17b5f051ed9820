"""
The agent channel follows control service replicas (issue 9): two real channel servers
on one configuration and cluster state (as two replicas on one etcd), connected in memory
on one Clock.
"""

from tests.agent.test_channel import ChannelHarness, Loopback
from pyflock.agent._channel import DEFAULT_HEARTBEAT, AgentChannel
from pyflock.control.testing import NODE_A


class FailoverTests(ChannelHarness):
    """An agent given two replicas moves between them."""

    def setUp(self):
        super().setUp()
        self.other = self.start_server()
        self.addCleanup(self.other.stop)

    def replicated_channel(self, first=None, second=None, **kwargs):
        """A started channel to replica-0 (``self.server``) then replica-1 (``self.other``)."""
        host = "127.0.0.9"
        self.identity[host] = NODE_A
        loops = [Loopback(self.clock, (first or self.server).factory(), host),
                 Loopback(self.clock, (second or self.other).factory(), host)]
        self.endpoints.extend(loops)
        views = []
        kwargs.setdefault("retry_policy", lambda rounds: 10.0 * rounds)
        channel = AgentChannel(self.clock, loops, NODE_A.node_uuid, "era-a", views.append,
                               names=["c1", "c2"], chance=lambda: 0.0, **kwargs)
        channel.views, channel.loops = views, loops
        self.channels.append(channel)
        channel.start()
        self.flush()
        return channel

    def switched(self):
        """The (from, to) of every control-switched event."""
        return [(e["from"], e["to"]) for e in self.events.of("pyflock:agent:control-switched")]

    def test_closed_replica_left_at_once(self):
        """When its replica closes the connection the agent is on the other one with no
        wait, and holds the same datasets in the new replica's view."""
        self.create()
        a = self.replicated_channel()
        self.assertEqual((a.replica, a.view.epoch), ("c1", self.server.epoch))
        before = self.clock.seconds()
        self.server.stop()
        self.flush()
        self.clock.advance(0)
        self.flush()
        self.assertTrue(a.connected)
        self.assertEqual((a.replica, a.view.epoch, self.clock.seconds()),
                         ("c2", self.other.epoch, before))
        self.assertEqual(self.switched(), [("c1", "c2")])
        self.assertEqual(a.view.datasets, a.views[0].datasets)
        self.assertEqual(a.view.current, self.other.current)

    def test_silent_replica_left_within_two_heartbeats(self):
        """A replica that stops talking is left for the other within two heartbeats."""
        a = self.replicated_channel()
        self.server._heartbeats.stop()
        self.advance(2 * DEFAULT_HEARTBEAT)
        self.clock.advance(0)
        self.flush()
        self.assertEqual(len(self.events.of("pyflock:agent:control-silent")), 1)
        self.assertTrue(a.connected)
        self.assertEqual(a.replica, "c2")
        self.create()
        self.assertEqual(a.view.current, self.other.current)

    def test_refused_replica_skipped_then_backoff_after_a_round(self):
        """An unreachable replica is skipped at once; when both fail the agent waits."""
        a = self.replicated_channel()
        first, second = a.loops
        a.stop()
        self.flush()
        first.server_factory = None
        a.start()
        self.clock.advance(0)
        self.flush()
        self.assertEqual((a.connected, a.replica), (True, "c2"))
        second.server_factory = None
        self.other.stop()
        self.flush()
        self.clock.advance(0)  # c1 refuses at once: a full round failed
        self.assertEqual((len(first.attempts), len(second.attempts)), (3, 1))
        self.clock.advance(9.5)
        self.assertEqual(len(second.attempts), 1)
        self.clock.advance(0.5)  # the first round's wait: retry_policy(1)
        self.clock.advance(0)
        self.assertEqual((len(first.attempts), len(second.attempts)), (4, 2))
        self.clock.advance(19.5)  # then retry_policy(2) before the next round
        self.assertEqual(len(second.attempts), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(second.attempts), 3)

    def test_names_must_match_endpoints(self):
        """A channel given a different number of names than endpoints is refused."""
        with self.assertRaises(ValueError):
            AgentChannel(self.clock, [object(), object()], NODE_A.node_uuid, "e",
                         lambda view: None, names=["only"])
