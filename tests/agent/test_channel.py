"""
The agent channel's client against the real server: snapshot then diffs, resync, control
restarts, reconnection with backoff, heartbeats, state reports and the stored view (in
memory on a Clock); and, over real TLS, two agents and a real ``pyflock-control`` process.
"""

import os
import shutil
import tempfile
import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from pyrsistent import pmap
from twisted.logger import Logger, globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pyflock.agent._backends import MemoryBlockStore
from pyflock.agent._channel import AgentChannel, _ConnectionFactory, control_endpoint
from pyflock.agent._convergence import calculate_changes, view_desire
from pyflock.agent._discovery import discover
from pyflock.agent._loop import ConvergenceLoop
from pyflock.agent._runner import Runner, run_now
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from pyflock.agent._view import AgentView, ViewFile
from pyflock.common._model import MINIMUM_SIZE, Dataset
from pyflock.common._tls import AGENT_CHANNEL, ClusterTLS
from pyflock.common._wire import (
    DatasetReport, Diff, Error, Heartbeat, Node, Snapshot, ViewVersion, Welcome, decode,
    encode, frame,
)
from tests.control.test_agentchannel import frames
from pyflock.control._agentchannel import AgentChannelServer, holders_of, view_datasets
from pyflock.control._clusterstate import ClusterState
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
DS2 = "22222222-3333-4444-8555-666666666666"

CONTROL_ADDRESS = IPv4Address("TCP", "127.0.0.2", 4524)


@implementer(IStreamClientEndpoint)
class Loopback:
    """
    Connects each client to a new protocol of ``server_factory`` over in-memory
    transports (``iosim``); ``flush()`` moves the bytes. With no server, it is refused.
    ``received`` keeps every message the clients got, in order.
    """

    def __init__(self, clock, server_factory, client_host="127.0.0.9"):
        self.clock = clock
        self.server_factory = server_factory
        self.client_host = client_host
        self.pumps = []
        self.received = []
        self.attempts = []

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        if self.server_factory is None:
            return fail(ConnectionRefusedError())
        client_address = IPv4Address("TCP", self.client_host, 50000 + len(self.attempts))
        client = factory.buildProtocol(CONTROL_ADDRESS)
        server = self.server_factory.buildProtocol(client_address)
        received = client.stringReceived

        def tap(payload):
            self.received.append(decode(payload))
            received(payload)
        client.stringReceived = tap
        self.pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, True, CONTROL_ADDRESS, client_address),
            client, iosim.FakeTransport(client, False, client_address, CONTROL_ADDRESS),
            greet=False, clock=self.clock))
        return succeed(client)

    def flush(self):
        """Deliver everything in flight, both ways, until nothing moves."""
        while any(pump.flush() for pump in self.pumps):
            pass
        self.pumps = [p for p in self.pumps
                      if not (p.clientIO.disconnected and p.serverIO.disconnected)]

    def take(self, kind=(Snapshot, Diff)) -> list:
        """The messages of ``kind`` received since last asked."""
        taken = [m for m in self.received if isinstance(m, kind)]
        self.received = []
        return taken


class Events:
    """Captures the structured log events emitted while it is installed."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def of(self, event_type):
        """The events of one type."""
        return [e for e in self.events if e.get("event_type") == event_type]


class ChannelHarness(SynchronousTestCase):
    """Agent channels and the real server, connected in memory, on one Clock."""

    def setUp(self):
        self.h = APIHarness()
        self.clock = self.h.clock
        self.configuration = self.h.configuration
        self.identity = {}
        self.server = self.start_server()
        self.clock.advance(self.h.cluster.node_expiry)
        self.endpoints = []
        self.channels = []
        self.events = Events(self)

    def tearDown(self):
        for channel in self.channels:
            channel.stop()
        self.flush()
        self.server.stop()
        self.flush()

    def start_server(self):
        """A started server whose peers are identified by the node their endpoint names."""
        server = AgentChannelServer(self.configuration, self.h.cluster, self.clock,
                                    identify=lambda transport: AGENT_CHANNEL.admit(
                                        self.identity[transport.getPeer().host]))
        server.start()
        return server

    def channel(self, identity=NODE_A, host="127.0.0.9", start=True, on_view=None,
                **kwargs):
        """
        A channel for ``identity`` whose views are collected in ``channel.views`` (and
        handed to ``on_view``, if given).
        """
        self.identity[host] = identity
        endpoint = Loopback(self.clock, self.server.factory(), host)
        views = []
        kwargs.setdefault("retry_policy", lambda failures: 10.0 * failures)

        def collect(view):
            views.append(view)
            if on_view is not None:
                on_view(view)
        channel = AgentChannel(self.clock, endpoint, identity.node_uuid, f"era-{host}",
                               collect, **kwargs)
        channel.views = views
        channel.loopback = endpoint
        self.endpoints.append(endpoint)
        self.channels.append(channel)
        if start:
            channel.start()
            self.flush()
        return channel

    def flush(self):
        """Deliver every message in flight on every connection."""
        for _ in range(5):
            for endpoint in self.endpoints:
                endpoint.flush()

    def advance(self, seconds):
        """Let ``seconds`` pass, delivering messages as they are sent."""
        for _ in range(int(seconds)):
            self.clock.advance(1)
            self.flush()

    def change(self, dataset_id, transform):
        """Change the configuration and deliver the pushes."""
        config = self.successResultOf(self.configuration.change([dataset_id], transform))
        self.flush()
        return config

    def create(self, dataset_id=DS, primary=A, name="db"):
        """Create a dataset and deliver the pushes."""
        return self.change(dataset_id, lambda c: c.create(Dataset(
            dataset_id=dataset_id, primary=primary, maximum_size=MINIMUM_SIZE,
            metadata={"name": name})))

    def assertInStep(self, channel):
        """The channel's view is the control service's view, at its version."""
        self.assertEqual(dict(channel.view.datasets),
                         view_datasets(self.configuration.committed,
                                       holders_of(self.h.cluster.state)))
        self.assertEqual(channel.view.current, self.server.current)
        self.assertEqual(dict(channel.view.nodes), {n.uuid: n for n in
                                                    self.server.snapshot().nodes})



class ChannelTests(ChannelHarness):
    """An agent channel and the real server, connected in memory, on one Clock."""

    # the view

    def test_snapshot_then_diffs(self):
        """A snapshot arrives first; a create, a move and a renewal each as a small diff."""
        self.create()
        a = self.channel()
        b = self.channel(NODE_B, host="127.0.0.10")
        self.assertEqual([type(m) for m in a.loopback.take()], [Snapshot, Diff])
        self.assertInStep(a)
        self.assertEqual(a.view.by_name("db").dataset_id, DS)
        self.assertEqual(a.view.node(B), Node(uuid=B, host="127.0.0.10",
                                                   peer_port=4525, alive=True))
        now = self.clock.seconds()

        self.create(DS2, name="logs")
        [diff] = a.loopback.take()
        self.assertEqual([d.dataset_id for d in diff.datasets], [DS2])
        self.assertEqual(a.views[-1].by_name("logs").primary, A)

        self.change(DS2, lambda c: c.update(now, DS2, primary=B))
        [diff] = a.loopback.take()
        self.assertEqual([d.primary for d in diff.datasets], [B])

        self.change(DS, lambda c: c.acquire_lease(now, DS, A, 60))
        self.advance(20)
        self.change(DS, lambda c: c.acquire_lease(self.clock.seconds(), DS, A, 60))
        [_, renewal] = a.loopback.take()
        self.assertEqual(([d.dataset_id for d in renewal.datasets], renewal.removed,
                          renewal.nodes), ([DS], (), ()))
        self.assertEqual(a.view.dataset(DS).lease.expiration, self.clock.seconds() + 60)
        self.assertLess(len(encode(renewal)), 400)
        self.assertInStep(a)
        self.assertInStep(b)

    def test_address_defaults_to_local_address(self):
        """Without an address, peers are told the local address of the connection."""
        self.channel(host="127.0.0.33")
        self.assertEqual(self.h.cluster.state.nodes[A].host, "127.0.0.33")
        self.assertEqual(self.server.snapshot().nodes[0].host, "127.0.0.33")

    def test_address_configured(self):
        """A configured address and peer port are what peers are told."""
        self.channel(address="10.1.2.3", peer_port=14525)
        self.assertEqual(self.server.snapshot().nodes,
                         (Node(uuid=A, host="10.1.2.3", peer_port=14525),))

    def test_out_of_step_resyncs(self):
        """A diff that does not follow the agent's view makes it ask for a snapshot."""
        a = self.channel()
        a.loopback.take()
        a.view = a.view.set(version=a.view.version - 1)
        self.create()
        self.assertEqual([type(m) for m in a.loopback.take()], [Diff, Snapshot])
        self.assertEqual(len(self.events.of("pyflock:agent:view-out-of-step")), 1)
        self.assertInStep(a)

    def test_heartbeat_mismatch_resyncs(self):
        """A heartbeat naming another version than the agent's makes it resync."""
        a = self.channel()
        a.view = AgentView()
        self.clock.advance(self.server.heartbeat)
        self.flush()
        self.assertInStep(a)
        self.assertEqual(len(self.events.of("pyflock:agent:view-out-of-step")), 1)

    def test_heartbeats_before_a_waiting_snapshot_do_not_resync(self):
        """Issue 12: heartbeats that reach an agent while its snapshot waits for a turn
        are ahead of its view by design; it asks for no sync, and gets one snapshot."""
        self.create()
        self.server.catchup.turns.width = 1
        self.server.catchup.turns.request("busy", lambda: None)  # the only turn, taken
        a = self.channel()
        self.assertEqual(a.loopback.take(), [])
        self.advance(2 * self.server.heartbeat)
        self.assertEqual(self.events.of("pyflock:agent:view-out-of-step"), [])
        self.server.catchup.turns.done("busy")
        self.flush()
        self.assertEqual([type(m) for m in a.loopback.take()], [Snapshot])
        self.assertInStep(a)
        self.advance(self.server.heartbeat)
        self.assertEqual(self.events.of("pyflock:agent:view-out-of-step"), [])

    def test_control_restart_resyncs(self):
        """After a control restart (a new epoch) the agent reconnects and gets a snapshot."""
        self.create()
        a = self.channel()
        old = a.view
        self.server.stop()
        self.flush()
        self.assertFalse(a.connected)
        self.h.cluster.update(ClusterState())
        self.server = self.start_server()
        a.loopback.server_factory = self.server.factory()
        self.clock.advance(10)
        self.flush()
        self.assertTrue(a.connected)
        self.assertNotEqual(a.view.epoch, old.epoch)
        self.assertEqual(a.view.datasets, old.datasets)
        self.assertInStep(a)

    def test_current_view_not_resent(self):
        """An agent that reconnects with the current view gets no snapshot."""
        a = self.channel()
        a.loopback.take()
        stopped = a.stop()
        self.flush()
        self.successResultOf(stopped)
        again = self.channel(view=a.view)
        self.assertEqual(again.loopback.take(), [])
        self.assertTrue(again.connected)

    def test_view_callback_failure_logged(self):
        """A failing view callback is logged and the channel carries on."""
        def broken(view):
            raise RuntimeError("boom")
        a = self.channel(start=False)
        a._on_view = broken
        a.start()
        self.flush()
        self.create()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertInStep(a)

    # connecting

    def test_refused_retries_with_backoff(self):
        """A refused agent logs why and retries ever later; once accepted it is reset."""
        a = self.channel(start=False)
        self.identity["127.0.0.9"] = NODE_B
        a.start()
        self.flush()
        [refused] = self.events.of("pyflock:agent:channel-refused")
        self.assertEqual(refused["code"], "identity")
        self.assertIn(f"cannot speak for node {A}", refused["reason"])
        for delay in (10, 20, 30):
            self.clock.advance(delay - 0.5)
            self.flush()
            self.assertEqual(len(a.loopback.attempts), delay // 10)
            self.clock.advance(0.5)
            self.flush()
        self.identity["127.0.0.9"] = NODE_A
        self.clock.advance(40)
        self.flush()
        self.assertTrue(a.connected)
        self.server.stop()
        self.server = self.start_server()
        a.loopback.server_factory = self.server.factory()
        self.flush()
        self.clock.advance(10)
        self.flush()
        self.assertTrue(a.connected)

    def test_unreachable_retries_with_backoff(self):
        """An unreachable control service is retried with growing delays."""
        a = self.channel(start=False)
        a.loopback.server_factory = None
        a.start()
        for delay in (10, 20, 30):
            self.clock.advance(delay)
        starts = a.loopback.attempts
        self.assertEqual([later - earlier for earlier, later in zip(starts, starts[1:])],
                         [10, 20, 30])
        self.assertEqual(len(self.events.of("pyflock:agent:control-unreachable")), 4)

    def test_silent_control_given_up(self):
        """A control service silent for the timeout is disconnected from and retried."""
        a = self.channel(timeout=12)
        self.server._heartbeats.stop()
        self.clock.advance(12)
        self.flush()
        self.assertEqual(len(self.events.of("pyflock:agent:control-silent")), 1)
        self.clock.advance(10)
        self.flush()
        self.assertEqual(len(a.loopback.attempts), 2)
        self.assertTrue(a.connected)

    def test_stop(self):
        """Stopping closes the connection and stops retrying."""
        a = self.channel()
        d = a.stop()
        self.flush()
        self.successResultOf(d)
        self.clock.advance(1000)
        self.flush()
        self.assertEqual(len(a.loopback.attempts), 1)
        self.assertEqual(self.server.connected_nodes, frozenset())

    # heartbeats and state

    def test_heartbeats_keep_node_alive(self):
        """A connected agent's heartbeats keep its node alive; once stopped it dies."""
        a = self.channel()
        b = self.channel(NODE_B, host="127.0.0.10")
        self.advance(100)
        nodes = self.h.cluster.state.nodes
        self.assertTrue(self.h.cluster.is_alive(nodes[A]))
        a.stop()
        self.flush()
        self.advance(30)
        self.assertFalse(self.h.cluster.is_alive(self.h.cluster.state.nodes[A]))
        self.assertFalse(b.view.node(A).alive)

    def test_report_state(self):
        """Reported state reaches the cluster state; a report made offline is sent later."""
        self.create()
        self.create(DS2, name="logs")
        a = self.channel(start=False)
        reports = [DatasetReport(dataset_id=DS, state="mounted", path="/m/ds")]
        a.report_state(reports)
        a.start()
        self.flush()
        self.assertEqual(list(self.h.cluster.state.nodes[A].datasets), [DS])
        a.report_state(reports + [DatasetReport(dataset_id=DS2, state="creating")])
        self.flush()
        self.assertEqual(sorted(self.h.cluster.state.nodes[A].datasets), [DS, DS2])
        r = self.h.request(self, "GET", "/v1/state/datasets", identity=ALICE)
        self.assertEqual(len(r.json), 2)

    def test_holders_pushed(self):
        """
        A report that adds or drops a dataset reaches every agent as a diff naming the
        nodes holding it; a report that only changes its state there pushes nothing.
        """
        self.create()
        a = self.channel()
        b = self.channel(NODE_B, host="127.0.0.10")
        a.loopback.take()
        b.loopback.take()
        a.report_state([DatasetReport(dataset_id=DS, state="creating")])
        self.flush()
        [diff] = b.loopback.take()
        self.assertEqual(([d.holders for d in diff.datasets], diff.nodes), ([(A,)], ()))
        a.report_state([DatasetReport(dataset_id=DS, state="mounted", path="/m")])
        self.flush()
        self.assertEqual(b.loopback.take(), [])
        b.report_state([DatasetReport(dataset_id=DS, state="moving")])
        self.flush()
        self.assertEqual(b.view.dataset(DS).holders, tuple(sorted([A, B])))
        a.report_state([])
        self.flush()
        self.assertEqual([d.holders for m in b.loopback.take() for d in m.datasets],
                         [tuple(sorted([A, B])), (B,)])
        self.assertEqual(a.view.dataset(DS).holders, (B,))
        self.assertInStep(a)
        self.assertInStep(b)

    def test_deleted_dataset_purged(self):
        """Once every agent stored a view showing a deletion and lets go, it is purged."""
        self.create()
        a = self.channel()
        b = self.channel(NODE_B, host="127.0.0.10")
        a.report_state([DatasetReport(dataset_id=DS, state="mounted", path="/m")])
        b.report_state([])
        self.flush()
        self.change(DS, lambda c: c.delete(self.clock.seconds(), DS))
        self.assertTrue(a.view.dataset(DS).deleted)
        self.assertIsNone(a.view.by_name("db"))
        a.report_state([])
        self.flush()
        self.assertIn(DS, self.configuration.committed.datasets)
        self.clock.advance(self.server.heartbeat)
        self.flush()
        self.assertNotIn(DS, self.configuration.committed.datasets)
        self.assertIsNone(a.view.dataset(DS))
        self.assertIsNone(b.view.dataset(DS))

    def test_unstored_view_not_acknowledged(self):
        """The agent vouches only for views stored; a deletion unstored blocks the purge."""
        self.create()
        saves = []
        a = self.channel(save_view=lambda view: saves.append(Deferred()) or saves[-1])
        a.report_state([])
        self.flush()
        self.change(DS, lambda c: c.delete(self.clock.seconds(), DS))
        self.clock.advance(self.server.heartbeat)
        self.flush()
        self.assertIn(DS, self.configuration.committed.datasets)
        for d in saves:
            d.callback(None)
        self.clock.advance(self.server.heartbeat)
        self.flush()
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_view_persisted_and_reloaded(self):
        """The view is saved as it changes; an agent restarted from it is in step."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "view.json")
        view_file = ViewFile(path, self.clock, run_in_thread=lambda f, *a: f(*a))
        self.create()
        a = self.channel(save_view=view_file.save)
        self.create(DS2, name="logs")
        stopped = a.stop()
        self.flush()
        self.successResultOf(stopped)
        loaded = self.successResultOf(view_file.load())
        self.assertEqual(loaded, a.view)
        self.assertEqual(loaded.by_name("logs").dataset_id, DS2)
        again = self.channel(view=loaded, save_view=view_file.save)
        self.assertEqual(again.loopback.take(), [])
        self.assertInStep(again)


class ConvergenceOverChannelTests(ChannelHarness):
    """
    Two agents' convergence loops over one memory block store, fed by their channels to
    the real server, all on one Clock: what one node's report tells the other.
    """

    def setUp(self):
        super().setUp()
        self.store = MemoryBlockStore()
        self.disks = MemoryDisks(self.store)
        self.events = []
        self.nodes = {identity.node_uuid: self.node(identity, host)
                      for identity, host in [(NODE_A, "127.0.0.9"), (NODE_B, "127.0.0.10")]}

    def node(self, identity, host):
        """A started loop whose views come from its channel and whose reports go to it."""
        node = identity.node_uuid
        backend = self.store.backend(node)
        fs = MemoryFilesystems(self.disks, backend)
        log = Logger(observer=self.events.append)
        reports = []
        channel = None

        def report(states):
            reports.append(states)
            channel.report_state(states.values())
        loop = ConvergenceLoop(
            self.clock, lambda: run_now(discover, backend, fs, f"/mnt/{node}"),
            calculate_changes, Runner(backend, fs, run_now, logger=log).run, report,
            desire=view_desire(node), logger=log, node_uuid=node)
        loop.start()
        self.addCleanup(loop.stop)
        channel = self.channel(identity, host, on_view=loop.update)
        channel.loop, channel.fs, channel.reports = loop, fs, reports
        return channel

    def test_move_target_woken_by_release(self):
        """
        The new primary of a moved dataset, which saw it still held by the old one,
        mounts it as soon as the old node's report of letting go is pushed, with no
        clock advance: its poll is only a safety net.
        """
        a, b = self.nodes[A], self.nodes[B]
        self.create(primary=A)
        self.assertEqual({f"/mnt/{A}/{DS}"}, set(a.fs.table))
        self.assertEqual(a.view.dataset(DS).holders, (A,))
        now = self.clock.seconds()

        self.successResultOf(self.configuration.change(
            [DS], lambda c: c.update(now, DS, primary=B)))
        # B hears of the move first: A still holds the volume, so B waits.
        b.loopback.flush()
        self.assertEqual(("moving", {}), (b.reports[-1][DS].state, b.fs.table))
        self.assertEqual(b.loop.next_wake, now + b.loop.poll_interval)
        self.assertEqual(b.view.dataset(DS).holders, tuple(sorted([A, B])))

        self.flush()
        self.assertEqual(self.clock.seconds(), now)
        self.assertEqual(({}, pmap()), (a.fs.table, a.reports[-1]))
        self.assertEqual({f"/mnt/{B}/{DS}"}, set(b.fs.table))
        self.assertEqual("mounted", b.reports[-1][DS].state)
        self.assertEqual(b.view.dataset(DS).holders, (B,))
        self.assertEqual(b.loop.next_wake, now + b.loop.interval)
        self.assertEqual(list(self.h.cluster.state.nodes[B].datasets), [DS])


# -- over real TLS, with a real pyflock-control ----------------------------------------------


class PagedSnapshotTests(ChannelHarness):
    """A snapshot in pages (protocol 3, issue 8) becomes the agent's view at its last page."""

    def start_server(self):
        """A server sending pages of 4 KiB."""
        server = AgentChannelServer(self.configuration, self.h.cluster, self.clock,
                                    identify=lambda transport: AGENT_CHANNEL.admit(
                                        self.identity[transport.getPeer().host]),
                                    page_size=4096)
        server.start()
        return server

    def test_pages_make_one_view(self):
        """Fifty datasets come in many pages and make one view, the control service's."""
        def transform(config):
            for number in range(50):
                config = config.create(Dataset(
                    dataset_id=f"{number:08x}-0000-4000-8000-000000000000", primary=A,
                    metadata={"name": f"v{number}", "note": "\u00e9" * 250}))
            return config
        ids = [f"{number:08x}-0000-4000-8000-000000000000" for number in range(50)]
        self.successResultOf(self.configuration.change(ids, transform))
        channel = self.channel()
        pages = channel.loopback.take(Snapshot)
        self.assertGreater(len(pages), 5)
        self.assertEqual(len(channel.views), 1)
        self.assertInStep(channel)

    def test_other_message_before_the_last_page_refused(self):
        """Anything but a page before the last page of a snapshot is a bad message."""
        channel = self.channel(start=False)
        channel._connection = connection = channel_connection(channel)
        transport = connection.transport
        connection.dataReceived(frame(encode(Welcome(epoch="e", version=1))))
        connection.dataReceived(frame(encode(Snapshot(epoch="e", version=1, more=True))))
        connection.dataReceived(frame(encode(Heartbeat(view=ViewVersion("e", 1)))))
        errors = [m for m in frames(transport) if isinstance(m, Error)]
        self.assertEqual([e.code for e in errors], ["bad-message"])
        self.assertIn("before the last page of a snapshot", errors[0].reason)
        channel._heartbeats.stop()


def channel_connection(channel):
    """A connection of ``channel`` on a StringTransport, its hello already taken."""
    protocol = _ConnectionFactory(channel).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()
    return protocol


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


class Watcher:
    """Collects an agent's views; ``wait(predicate)`` fires once a view satisfies it."""

    def __init__(self):
        self.views = []
        self._waiting = []

    def __call__(self, view):
        self.views.append((time.monotonic(), view))
        for predicate, d in list(self._waiting):
            if predicate(view):
                self._waiting.remove((predicate, d))
                d.callback((time.monotonic(), view))

    def wait(self, reactor, predicate, timeout=30.0) -> Deferred:
        """Fires with (when, view) for the first view, already seen or not, that passes."""
        for when, view in self.views:
            if predicate(view):
                return succeed((when, view))
        d = Deferred()
        self._waiting.append((predicate, d))
        return d.addTimeout(timeout, reactor)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_two_agents_and_real_control(reactor, tmp_path):
    """
    Two agents over real TLS get a dataset created via REST, their reports show in the
    state API, they resync after a control restart, and a stopped agent's node dies.
    """
    from tests.harness.certificates import make_cluster_certificates
    from tests.harness.control import APIClient, ControlProcess, free_address

    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=2, control_host=host)
    control = ControlProcess(tmp_path / "data", folder, host=host,
                             log_directory=tmp_path / "logs",
                             extra_arguments=["--heartbeat", "0.5", "--node-expiry", "2"])
    channels = []
    client = APIClient(reactor, control.url, folder, "alice")
    try:
        control.start()
        watchers = {}
        for number, node_uuid in enumerate(cluster.node_uuids):
            watcher = watchers[node_uuid] = Watcher()
            view_file = ViewFile(tmp_path / f"view-{number}.json", reactor)
            channel = AgentChannel(
                reactor, control_endpoint(reactor, host, control.agent_port, ClusterTLS.load(
                    cluster.node_directory(node_uuid), "node")),
                node_uuid, f"era-{number}", watcher, save_view=view_file.save,
                peer_port=4525 + number, heartbeat=0.5, timeout=2.0,
                retry_policy=lambda failures: 0.2)
            channel.start()
            channels.append(channel)
        a, b = cluster.node_uuids
        for watcher in watchers.values():
            await watcher.wait(reactor, lambda v: len(v.nodes) == 2)

        from_request, from_answer = [], []
        for round_ in range(10):
            dataset_id = str(uuid4())
            sent = time.monotonic()
            response = await client.post("/v1/configuration/datasets", {
                "primary": a, "dataset_id": dataset_id, "maximum_size": MINIMUM_SIZE,
                "metadata": {"name": f"db-{round_}"}})
            answered = time.monotonic()
            assert response.code == 201, response
            for watcher in watchers.values():
                when, view = await watcher.wait(
                    reactor, lambda v, i=dataset_id: v.dataset(i) is not None)
                assert view.by_name(f"db-{round_}").primary == a
                from_request.append(when - sent)
                from_answer.append(when - answered)
        # Negative "after the 201" means the agents had the dataset before the client
        # had its answer: the push leaves as soon as the store has committed.
        print(f"\npush latency over real TLS, {len(from_request)} samples (2 agents x 10 "
              f"creates): POST sent -> agent view callback: min "
              f"{min(from_request) * 1000:.2f} ms, max {max(from_request) * 1000:.2f} ms; "
              f"201 received -> agent view callback: min {min(from_answer) * 1000:.2f} ms,"
              f" max {max(from_answer) * 1000:.2f} ms")

        channels[0].report_state([DatasetReport(dataset_id=dataset_id, state="mounted",
                                                path=f"/mnt/{dataset_id}",
                                                maximum_size=MINIMUM_SIZE)])
        await control.wait_for_event(reactor, "pyflock:control:node-state",
                                     lambda e: e["node_uuid"] == a)
        state = await client.get("/v1/state/datasets")
        assert state.json == [{"dataset_id": dataset_id, "primary": a,
                               "maximum_size": MINIMUM_SIZE, "state": "mounted",
                               "path": f"/mnt/{dataset_id}"}]
        nodes = {n["uuid"]: n for n in (await client.get("/v1/state/nodes")).json}
        assert {u: n["alive"] for u, n in nodes.items()} == {a: True, b: True}
        assert all(n["host"].startswith("127.") for n in nodes.values())
        era = await client.get("/v1/state/nodes/by_era/era-1")
        assert era.json == {"uuid": b}
        _, view = await watchers[b].wait(reactor, lambda v: v.node(a) is not None)
        assert view.node(a).peer_port == 4525

        epoch = view.epoch
        assert control.stop() == 0
        control.start()
        # Issue 12: the view goes on across a clean restart: each agent resumes from its
        # version (same epoch, no snapshot).
        for uuid in watchers:
            connected = await control.wait_for_event(
                reactor, "pyflock:control:agent-connected", lambda e: e["node_uuid"] == uuid)
            assert connected["snapshot"] is False
        for channel in channels:
            assert channel.view.epoch == epoch
            assert channel.view.by_name("db-9").dataset_id == dataset_id

        await channels[0].stop()
        _, view = await watchers[b].wait(
            reactor, lambda v: v.node(a) is not None and not v.node(a).alive)
        await control.wait_for_event(reactor, "pyflock:control:node-dead",
                                     lambda e: e["node_uuid"] == a)
        assert (await client.get("/v1/state/datasets")).json == []
    finally:
        for channel in channels:
            await channel.stop()
        await client.close()
        control.close()
